"""`vqgan eval`: per-image metrics against their references (closed form, scikit-image, pytorch-msssim), weights
that are absent are "not computed", the command's outputs agree with each other, bad input, torchrun."""
from __future__ import annotations

import csv
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgan.cli import main
from vqgan.codes import CodeSpec
from vqgan.errors import UserError
from vqgan.eval import similarity
from vqgan.eval.usage import CodeUsage
from vqgan.eval.weights import load_lpips_or_reason


def _photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    return [getattr(skimage_data, n)()[:200, :240] for n in ("astronaut", "coffee", "chelsea", "rocket")]


def _distorted(img: np.ndarray, seed: int) -> np.ndarray:
    """Noise plus a blur and a JPEG round trip: a realistic, not-too-good reconstruction."""
    import io

    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    noisy = np.clip(img.astype(int) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(1)).save(buf, "JPEG", quality=40)
    return np.asarray(Image.open(buf).convert("RGB"))


def _batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_psnr_of_a_known_perturbation_is_the_closed_form(k):
    rng = np.random.default_rng(k)
    x = torch.from_numpy(rng.integers(k, 256 - k, (3, 3, 20, 24), dtype=np.uint8))
    sign = torch.from_numpy(rng.choice([-1, 1], x.shape))
    y = (x.int() + k * sign).to(torch.uint8)  # +-k everywhere, no clipping
    expected = 10 * math.log10(255 ** 2 / k ** 2)
    assert torch.allclose(similarity.psnr(x, y), torch.full((3,), expected, dtype=torch.float64), atol=1e-10)
    # per image, never per batch: a perfect image beside a bad one keeps its own (floored) score
    both = similarity.psnr(torch.stack([x[0], x[1]]), torch.stack([x[0], y[1]]))
    assert both[1] == pytest.approx(expected) and both[0] > 140


def test_ssim_matches_scikit_image_on_real_photos():
    from skimage.metrics import structural_similarity

    photos = _photos()
    distorted = [_distorted(p, i) for i, p in enumerate(photos)]
    ours = similarity.ssim(_batch(photos), _batch(distorted))
    for i, (a, b) in enumerate(zip(photos, distorted)):
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255, channel_axis=-1)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert float(similarity.ssim(_batch(photos[:1]), _batch(photos[:1]))) == pytest.approx(1.0)


def test_ms_ssim_matches_pytorch_msssim_and_needs_161_px():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    photos = _photos()
    x, y = _batch(photos), _batch([_distorted(p, 7 + i) for i, p in enumerate(photos)])
    ref = pytorch_msssim.ms_ssim(x.double(), y.double(), data_range=255, size_average=False)
    assert torch.allclose(similarity.ms_ssim(x, y), ref, atol=1e-6)
    assert not similarity.ms_ssim_fits(160, 240) and similarity.ms_ssim_fits(161, 161)
    with pytest.raises(ValueError, match="161"):
        similarity.ms_ssim(x[..., :160, :], y[..., :160, :])


@pytest.mark.parametrize("net, file, option", [("vgg", "vgg16-397923af.pth", "--vgg-weights"),
                                               ("alex", "alexnet-owt-7be5be79.pth", "--alexnet-weights")])
def test_lpips_is_not_computed_without_weights(net, file, option, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    model, record = load_lpips_or_reason(net, None, None, torch.device("cpu"))
    assert model is None and record.startswith("not computed") and file in record and option in record
    with pytest.raises(UserError, match=option):
        load_lpips_or_reason(net, str(tmp_path / "nope.pth"), None, torch.device("cpu"))


def test_weights_under_a_released_name_are_checked_against_its_hash(tmp_path, caplog, monkeypatch):
    """torch hub names released weights `name-<sha256 prefix>.pth`: a file that does not hash to its name is not
    the published network, and the record and a warning say so (random test weights under the real name, here)."""
    import hashlib

    from vqgan.eval import weights

    fake = tmp_path / "vgg16-397923af.pth"
    torch.save({"w": torch.zeros(3)}, fake)
    with caplog.at_level("WARNING", logger="vqgan.eval"):
        assert weights.network_record(fake, warn=False)["matches_name"] is False
        assert not caplog.text  # processes other than 0 stay quiet
        record = weights.network_record(fake)
    assert record["matches_name"] is False and "397923af" in caplog.text and "not the published" in caplog.text
    prefix = hashlib.sha256(fake.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(weights.HASH_NAMED_FILES, f"mine-{prefix}.pth", prefix)
    assert weights.network_record(fake.rename(tmp_path / f"mine-{prefix}.pth"))["matches_name"] is True
    assert "matches_name" not in weights.network_record(fake.with_name(f"mine-{prefix}.pth").rename(
        tmp_path / "pt_inception-2015-12-05-6726825d.pth"))  # pytorch-fid's name: not known to hash to it


def test_lpips_network_choice_and_its_smallest_images(tmp_path, monkeypatch):
    from vqgan.eval.reconstruction import EvalOptions

    assert EvalOptions().lpips_choice() == ("alex", None)
    assert EvalOptions(vgg_weights="v.pth").lpips_choice() == ("vgg", "v.pth")  # only VGG16 weights given: VGG16
    assert EvalOptions(lpips_net="alex", alexnet_weights="a.pth").lpips_choice() == ("alex", "a.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for net, too_small in (("alex", 30), ("vgg", 15)):  # AlexNet's pools leave nothing of 30 px, VGG16's of 15
        model, reason = load_lpips_or_reason(net, None, None, torch.device("cpu"), resolution=too_small)
        assert model is None and reason.startswith("not computed") and "at least" in reason


def test_fid_statistics_files_are_checked_and_fid_is_never_negative(tmp_path):
    from vqgan.eval.fid import frechet_distance, load_stats

    (tmp_path / "notes.txt").write_text("not statistics")
    with pytest.raises(UserError, match="not an .npz"):
        load_stats(tmp_path / "notes.txt")
    x = np.random.default_rng(0).normal(size=(50, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    for scale in (1.0, 1e3, 1e-3):  # rounding leaves +-1e-13 relative; a squared distance is reported >= 0
        assert 0.0 <= frechet_distance(mu * scale, sigma * scale**2, mu * scale, sigma * scale**2) < 1e-9 * scale**2


def test_codebook_usage_per_stream_over_the_set():
    spec = CodeSpec.single(4, (4, 8))  # one level, two depths (a residual quantizer)
    usage = CodeUsage(spec)
    tokens = torch.zeros(2, 2, 2, 2, dtype=torch.long)
    tokens[..., 0] = torch.tensor([0, 1, 2, 3]).view(1, 2, 2)  # depth 0: 4 codes, uniform: 2 bits
    usage.update(tokens)
    s = usage.summary(8, 8)
    first, second = s["streams"]
    assert (first["usage"], first["entropy_bits"], first["perplexity"]) == (1.0, 2.0, 4.0)
    assert (second["codes_used"], second["entropy_bits"]) == (1, 0.0)
    assert s["bits_per_position"] == 2 + 3 and s["bits_per_image"] == 4 * 5
    assert s["entropy_bits_per_image"] == 4 * 2.0


# -- the command --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_and_photos(tmp_path_factory):
    from conftest import photo_crops, tiny_model_config

    from vqgan.checkpoint import save_model
    from vqgan.tokenizers import VQModel

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_model(VQModel(tiny_model_config()), root / "tok")
    photos = photo_crops(root / "photos", step=32)  # 4 photos x 3 x 3 crops of 32 px
    (photos / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return root / "tok", photos


def _fake_fid_layer(monkeypatch):
    """Stand-ins for the Inception layer (`eval/inception.py`, `eval/fid.py`): a fixed projection of the pixels as
    features, and numpy statistics. They test the plumbing (what is gathered, saved, compared), not FID."""
    from scipy import linalg

    class Stats:
        def __init__(self):
            self.sum, self.outer, self.count = 0.0, 0.0, 0

        def update(self, f):
            f = f.cpu().double()
            self.sum, self.outer, self.count = self.sum + f.sum(0), self.outer + f.T @ f, self.count + len(f)

        def all_reduce(self):
            import torch.distributed as dist

            for t in (self.sum, self.outer):
                dist.all_reduce(t)

        def mean_cov(self):
            mu = self.sum / self.count
            return mu.numpy(), ((self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)).numpy()

    def frechet(mu1, s1, mu2, s2):
        covmean = linalg.sqrtm(s1 @ s2).real
        return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

    fid = types.SimpleNamespace(FeatureStats=Stats, frechet_distance=frechet,
                                save_stats=lambda p, mu, sigma: np.savez(p, mu=mu, sigma=sigma),
                                load_stats=lambda p: (np.load(p)["mu"], np.load(p)["sigma"]))
    monkeypatch.setitem(sys.modules, "vqgan.eval.fid", fid)
    projection = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def features(images):
        small = torch.nn.functional.adaptive_avg_pool2d(images.double(), 8).flatten(1)
        return {"pool": small @ projection}

    monkeypatch.setattr("vqgan.eval.reconstruction.load_inception_or_reason",
                        lambda path, device, needed_by, warn: (features, {"file": "fake.pth", "sha256": "0" * 64,
                                                                          "matches_name": False}))
    monkeypatch.setattr("vqgan.eval.reconstruction.load_lpips_or_reason",
                        lambda net, weights, heads, device, resolution, warn: (
                            (lambda x, y: (x - y).abs().mean((1, 2, 3))), {"version": "a stand-in"}))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_flat_image_codes_count_distinct_codes_per_flat_image():
    """Codes of content alone: one per flat image; codes of position: one per position; multi-level: the first."""
    from vqgan.eval.usage import flat_image_codes

    class Stub:
        config = types.SimpleNamespace(resolution=32)

        def __init__(self, by_position: bool, levels: int = 1):
            self.by_position, self.levels = by_position, levels

        def encode(self, x):
            b = x.shape[0]
            colour = (x[:, 0, 0, 0] * 100).long().view(b, 1, 1).expand(b, 4, 4)
            tokens = (torch.arange(16).view(1, 4, 4).expand(b, 4, 4) if self.by_position else colour)[..., None]
            return tokens if self.levels == 1 else [tokens, torch.zeros(b, 8, 8, 1, dtype=torch.long)]

    assert flat_image_codes(Stub(False)) == (1.0, 16)
    assert flat_image_codes(Stub(True)) == (16.0, 16)
    assert flat_image_codes(Stub(True, levels=2), colours=3) == (16.0, 16)


def test_eval_command_writes_consistent_outputs(tokenizer_and_photos, tmp_path, monkeypatch):
    tok, photos = tokenizer_and_photos
    out = tmp_path / "out"
    assert main(["eval", str(tok), str(photos), "--out", str(out), "--no-progress", "--batch-size", "5",
                 "--show", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = _read_csv(out / "per_image.csv")
    assert summary["data"]["images"] == len(rows) == 36 and summary["data"]["skipped"] == 1
    assert [Path(f).name for f in summary["data"]["skipped_files"]] == ["corrupt.png"]
    assert "AlexNet" in summary["protocol"]["lpips"]  # the lpips package's default network for measuring
    m = summary["metrics"]
    assert np.mean([float(r["psnr"]) for r in rows]) == pytest.approx(m["psnr"], abs=1e-5)
    assert np.mean([float(r["ssim"]) for r in rows]) == pytest.approx(m["ssim"], abs=1e-5)
    for key in ("ms_ssim", "lpips", "rfid"):  # 32 px, no VGG16 weights under the tests' TORCH_HOME, no Inception
        assert m[key].startswith("not computed") and all(r.get(key, "") == "" for r in rows)
    assert summary["weights"]["lpips"].startswith("not computed")
    assert summary["protocol"]["resize_filter"] == "lanczos" and "LANCZOS" in summary["protocol"]["resize"]
    assert 0 < m["codebook"]["usage"] <= 1 and m["codebook"]["bits_per_image"] == 16 * 16 * 6
    assert 0 < m["speed"]["tokenizer_share"] < 1 and m["speed"]["images_per_s"] > 0
    assert len(summary["tokenizer"]["weights"]["sha256"]) == 64 and summary["tokenizer"]["kind"] == "vqgan"
    report = (out / "report.html").read_text()
    assert "3 worst" in report and "3 best" in report and "psnr_histogram.png" in report
    for png in ("worst.png", "best.png", "psnr_histogram.png"):
        assert (out / png).is_file()
    worst = Image.open(out / "worst.png")
    assert worst.size[1] > 2 * 32

    # with LPIPS and Inception (stand-ins): the columns, rFID, and the statistics written and compared against
    _fake_fid_layer(monkeypatch)
    assert main(["eval", str(tok), str(photos), "--out", str(tmp_path / "out2"), "--no-progress",
                 "--save-stats", str(tmp_path / "ref.npz")]) == 0
    assert main(["eval", str(tok), str(photos), "--out", str(tmp_path / "out3"), "--no-progress",
                 "--reference-stats", str(tmp_path / "ref.npz")]) == 0
    m2 = json.loads((tmp_path / "out2" / "summary.json").read_text())["metrics"]
    m3 = json.loads((tmp_path / "out3" / "summary.json").read_text())["metrics"]
    rows = _read_csv(tmp_path / "out2" / "per_image.csv")
    assert np.mean([float(r["lpips"]) for r in rows]) == pytest.approx(m2["lpips"], abs=1e-5)
    assert m2["rfid"] > 0 and m2["psnr"] == pytest.approx(m["psnr"])
    assert m3["inputs_fid_vs_reference"] == pytest.approx(0.0, abs=1e-4)  # the same images as the reference
    assert m3["fid_vs_reference"] == pytest.approx(m2["rfid"], rel=1e-6)
    report = (tmp_path / "out3" / "report.html").read_text()
    assert "FID vs reference" in report and "fake.pth" in report and "not the published weights" in report

    # one readable image: no covariance, so no FID ("not computed"), and no statistics to save (one line)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((photos / sorted(p.name for p in photos.glob("*.png"))[0]).read_bytes())
    assert main(["eval", str(tok), str(one), "--out", str(tmp_path / "out4"), "--no-progress",
                 "--reference-stats", str(tmp_path / "ref.npz")]) == 0
    m4 = json.loads((tmp_path / "out4" / "summary.json").read_text())["metrics"]
    assert m4["rfid"].startswith("not computed") and "at least 2 images" in m4["rfid"]
    assert m4["fid_vs_reference"].startswith("not computed") and m4["psnr"] > 0
    assert main(["eval", str(tok), str(one), "--out", str(tmp_path / "out5"), "--no-progress",
                 "--save-stats", str(tmp_path / "one.npz")]) == 2
    assert not (tmp_path / "one.npz").exists()
    # two files pass the scan but one fails to decode: refused after the work, which is written all the same
    full = (one / "a.png").read_bytes()
    (one / "z_truncated.png").write_bytes(full[: len(full) // 2])  # a valid header, the data cut
    assert main(["eval", str(tok), str(one), "--out", str(tmp_path / "out5"), "--no-progress",
                 "--save-stats", str(tmp_path / "one.npz")]) == 2
    m5 = json.loads((tmp_path / "out5" / "summary.json").read_text())["metrics"]
    assert m5["saved_stats"].startswith("not saved") and m5["psnr"] > 0 and not (tmp_path / "one.npz").exists()
    (one / "z_truncated.png").unlink()

    # images under the resolution are enlarged by the protocol's resize: counted, not silent
    Image.open(one / "a.png").resize((20, 24)).save(one / "b.png")
    assert main(["eval", str(tok), str(one), "--out", str(tmp_path / "out6"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "out6" / "summary.json").read_text())["data"]
    assert data["upscaled"] == 1 and data["images"] == 2


def test_eval_refuses_bad_input_in_one_line(tokenizer_and_photos, tmp_path, capsys):
    tok, photos = tokenizer_and_photos
    (tmp_path / "empty").mkdir()
    cases = [([str(tok), str(tmp_path / "empty")], "no images"),
             ([str(tok), str(photos), "--resolution", "33"], "grid factor"),
             ([str(tok), str(photos), "--resize-filter", "nearest"], "--resize-filter"),
             ([str(tok), str(photos), "--inception-weights", str(tmp_path / "nope.pth")], "--inception-weights"),
             ([str(tok), str(photos), "--lpips-net", "alex", "--vgg-weights", str(tmp_path / "v.pth")],
              "--lpips-net"),
             ([str(tmp_path / "nothing"), str(photos)], "does not exist")]
    for args, message in cases:
        assert main(["eval", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_protocol_resize_is_the_named_filter_then_the_centre_crop(tmp_path):
    from vqgan.data.images import ImageSource
    from vqgan.eval.protocol import RESIZE_FILTERS, ProtocolImages

    img = Image.fromarray(_photos()[0]).resize((90, 60))
    for name, (resample, _) in RESIZE_FILTERS.items():
        ds = ProtocolImages([ImageSource("x", lambda: img)], 32, resample)
        expected = np.asarray(img.resize((48, 32), resample).crop((8, 0, 40, 32)))
        assert ds.read(0).dtype == torch.uint8
        assert np.array_equal(ds.read(0).permute(1, 2, 0).numpy(), expected), name


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tokenizer_and_photos, tmp_path):
    """torchrun (gloo, two processes, each a shard) against one process: the same rows and histograms."""
    from conftest import run_one_process, run_two_processes

    tok, photos = tokenizer_and_photos
    args = ["-m", "vqgan.cli", "eval", str(tok), str(photos), "--no-progress", "--batch-size", "4"]
    run_two_processes(*args, "--out", str(tmp_path / "two"))
    run_one_process(*args, "--out", str(tmp_path / "one"))
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["metrics"]["speed"]["processes"] == 2
    assert one["data"] == two["data"]
    for key in ("psnr", "psnr_std", "ssim"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-9)
    assert one["metrics"]["codebook"] == two["metrics"]["codebook"]
    rows_one, rows_two = _read_csv(tmp_path / "one" / "per_image.csv"), _read_csv(tmp_path / "two" / "per_image.csv")
    assert rows_one == rows_two


@pytest.mark.slow
def test_rfid_through_the_real_inception_layer(tokenizer_and_photos, inception_weights, tmp_path):
    """The Inception network (random weights in the real key layout: the number is not an FID of any meaning)
    and the FID code of `vqgan.eval.inception` / `vqgan.eval.fid`, end to end: the summary names the file and
    its sha256, the inputs' statistics are written, and the inputs against their own statistics give ~0."""
    from vqgan.eval.inception import FID_WEIGHTS_FILES

    tok, photos = tokenizer_and_photos
    common = ["--no-progress", "--batch-size", "12", "--inception-weights", str(inception_weights)]
    assert main(["eval", str(tok), str(photos), "--out", str(tmp_path / "a"), "--save-stats",
                 str(tmp_path / "ref.npz"), *common]) == 0
    assert main(["eval", str(tok), str(photos), "--out", str(tmp_path / "b"), "--reference-stats",
                 str(tmp_path / "ref.npz"), *common]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["metrics"]["rfid"] > 0 and b["metrics"]["rfid"] == pytest.approx(a["metrics"]["rfid"], rel=1e-6)
    assert b["metrics"]["inputs_fid_vs_reference"] == pytest.approx(0.0, abs=1e-3)
    assert FID_WEIGHTS_FILES[0] in json.dumps(a["weights"]) and "sha256" in json.dumps(a["weights"])
