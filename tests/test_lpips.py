import warnings

import pytest
import torch

from vqgan.losses.lpips import BACKBONES, CHANNELS, LPIPS, PerceptualWeightsMissing, build_lpips, default_vgg16_path


def torchvision_vgg16_state_dict():
    """Random weights in the exact key layout of torchvision's vgg16 (features + classifier)."""
    tv = pytest.importorskip("torchvision")
    return tv.models.vgg16(weights=None).state_dict()


def lpips_heads_state_dict():
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}


def test_loads_torchvision_and_lpips_layouts_from_explicit_paths(tmp_path):
    vgg = torchvision_vgg16_state_dict()
    torch.save(vgg, tmp_path / "vgg16.pth")
    heads = lpips_heads_state_dict()
    torch.save(heads, tmp_path / "vgg.pth")
    model = build_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    sd = model.state_dict()
    torch.testing.assert_close(sd["net.slice1.0.weight"], vgg["features.0.weight"])
    torch.testing.assert_close(sd["net.slice5.28.bias"], vgg["features.28.bias"])
    torch.testing.assert_close(sd["lin3.model.1.weight"], heads["lin3.model.1.weight"])
    assert "vgg16.pth" in model.description and "vgg.pth" in model.description
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d_same, d_other = model(x, x), model(x, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_other > 0).all()


def test_loads_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = default_vgg16_path()
    assert target == tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    target.parent.mkdir(parents=True)
    torch.save(torchvision_vgg16_state_dict(), target)
    torch.save(lpips_heads_state_dict(), tmp_path / "heads.pth")
    model = build_lpips(heads=str(tmp_path / "heads.pth"))
    assert str(target) in model.description


def test_missing_backbone_is_a_clear_error_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(PerceptualWeightsMissing, match="perceptual_weight=0"):
        build_lpips()
    with pytest.raises(PerceptualWeightsMissing, match="no file"):
        build_lpips(backbone_weights=str(tmp_path / "nope.pth"))
    with pytest.warns(UserWarning, match="random weights"):
        model = build_lpips(allow_random=True)
    assert "RANDOM VGG16" in model.description


def test_lpips_is_frozen_and_stays_in_eval_mode():
    model = LPIPS()
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_shipped_lpips_heads_are_found_when_the_package_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    from vqgan.losses.lpips import default_heads_path

    heads = default_heads_path()
    assert heads is not None and heads.is_file()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_lpips(allow_random=True)  # backbone random, heads real
    assert "RANDOM VGG16" in model.description and "heads from" in model.description


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_lpips_package_on_the_same_weights(net, tmp_path):
    """Ours against the lpips package itself (an independent implementation): its network with a random backbone
    (no download) and its shipped v0.1 heads; the backbone saved in torchvision's layout and loaded into ours."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    path = tmp_path / BACKBONES[net].file
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}, path)
    ours = build_lpips(str(path), net=net)
    assert BACKBONES[net].title in ours.description
    x, y = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y)
    assert (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
