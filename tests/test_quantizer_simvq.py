"""`vq` with `linear_codebook` (SimVQ, Zhu et al. 2024): codes = a frozen random basis times one learnt map."""
import pytest
import torch
from conftest import tiny_train_config

from vqgan.config import CodebookCareConfig, quantizer_config
from vqgan.errors import UserError
from vqgan.quantizers import build_quantizer


def make(**options):
    torch.manual_seed(0)
    cfg = quantizer_config("vq", **{"n_embed": 32, "embed_dim": 8, "linear_codebook": True, **options})
    cfg.validate()
    q = build_quantizer(cfg, cfg.code_width).train()
    q.start_upkeep(CodebookCareConfig(), total_steps=10)
    return q


def test_codes_are_the_frozen_basis_times_the_map():
    q = make()
    basis, codes = q.embedding.weight, q.codebook()
    assert not basis.requires_grad and q.codebook_map.weight.requires_grad
    torch.testing.assert_close(codes, basis @ q.codebook_map.weight.t())
    torch.testing.assert_close(codes, basis)  # the map starts as the identity
    assert basis.std().item() == pytest.approx(8 ** -0.5, rel=0.2)
    assert q.trainable_codebook() is basis  # data init and restarts rewrite the basis
    z = torch.randn(2, 8, 3, 5)
    out = q(z)
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized)


def test_a_step_moves_every_code_where_plain_vq_moves_only_the_used_ones():
    """The point of the map: codes no latent chose still move with the ones that were chosen."""
    z = torch.randn(1, 8, 1, 3)  # three latents: at most three codes chosen
    for linear in (True, False):
        q = make(linear_codebook=linear)
        if not linear:
            torch.nn.init.normal_(q.embedding.weight, std=8 ** -0.5)
        before = q.codebook().detach().clone()
        out = q(z)
        out.loss.backward()
        torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.5).step()
        moved = (q.codebook().detach() - before).norm(dim=1) > 1e-6
        chosen = out.codes.unique().numel()
        assert moved.sum() == (32 if linear else chosen), (linear, moved.sum(), chosen)
        assert not linear or (q.embedding.weight.grad is None)  # the basis itself never learns


def test_linear_codebook_with_moving_averages_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="linear_codebook") as err:
        tiny_train_config(tmp_path, model={"quantizer": {"kind": "ema", "n_embed": 64, "embed_dim": 16,
                                                         "linear_codebook": True}})
    assert "\n" not in str(err.value) and "model.quantizer." in str(err.value)


def test_data_init_and_restarts_rewrite_the_basis():
    """Codes from data: written into the basis while the map is the identity, so the codes are encoder outputs;
    a dead code's restart rewrites its basis row (the map then carries it with the others)."""
    q = make()
    q.upkeep.config = CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0)
    latents = torch.randn(256, 8) * 3 + 5
    q.initialize_from(latents)
    nearest = torch.cdist(q.codebook().detach(), latents).min(1).values
    assert nearest.max() < 0.5  # each code an encoder output, plus the init's little noise
    z = latents[:6].t().reshape(1, 8, 1, 6)
    before = q.embedding.weight.clone()
    stats = q.maintain(0, z, q(z).codes)
    q.maintain(1, z, q(z).codes)
    assert (q.embedding.weight != before).any(1).sum() > 0 and stats["restarted"] >= 0
    assert not q.embedding.weight.requires_grad


def test_a_saved_tokenizer_keeps_its_basis_and_map(tmp_path):
    from conftest import tiny_model_config

    from vqgan.checkpoint import load_model, save_model
    from vqgan.tokenizers import VQModel

    torch.manual_seed(0)
    model = VQModel(tiny_model_config(linear_codebook=True)).eval()
    with torch.no_grad():
        model.quantize.codebook_map.weight.add_(0.1 * torch.randn(16, 16))
    save_model(model, tmp_path / "tok")
    loaded = load_model(tmp_path / "tok").eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert not loaded.quantize.embedding.weight.requires_grad
