import pytest
import torch
from conftest import tiny_model_config

from vqgan.config import quantizer_config
from vqgan.quantizers import VectorQuantizer, nearest_code
from vqgan.quantizers import vq as vq_module
from vqgan.tokenizers import VQModel


def brute_force(z, codebook):
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize("n,k,d", [(100, 64, 8), (257, 1000, 3), (5, 1, 4)])
def test_nearest_code_matches_brute_force(n, k, d):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    assert torch.equal(nearest_code(z, codebook), brute_force(z, codebook))


def test_nearest_code_chunked_path_is_identical(monkeypatch):
    z, codebook = torch.randn(300, 8), torch.randn(50, 8)
    full = nearest_code(z, codebook)
    monkeypatch.setattr(vq_module, "_DISTANCE_BLOCK", 50 * 7)  # 7 rows per chunk
    assert torch.equal(nearest_code(z, codebook), full)


def test_quantized_output_is_the_lookup_of_its_own_indices():
    q = VectorQuantizer(quantizer_config(n_embed=32, embed_dim=4))
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(2, 4, 3, 5)
    out = q(z)
    assert out.indices.shape == (2, 3, 5, 1) and out.indices.dtype == torch.int64
    torch.testing.assert_close(out.quantized, q.decode_indices(out.indices), atol=1e-6, rtol=0)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(out.indices.reshape(-1), brute_force(flat, q.embedding.weight))


def test_loss_weights_commitment_by_beta_and_legacy_flag_swaps():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    for legacy in (False, True):
        q = VectorQuantizer(quantizer_config(n_embed=16, embed_dim=4, beta=0.25, legacy_beta=legacy))
        torch.nn.init.normal_(q.embedding.weight)
        z.grad = None
        q.embedding.weight.grad = None
        out = q(z)
        out.loss.backward()
        mse = ((out.quantized.detach() - z.detach()) ** 2).mean()
        # encoder gradient is 2 * w_commit * (z - e) / numel; the commitment weight is beta unless legacy
        w_commit = 1.0 if legacy else 0.25
        expected = 2 * w_commit * (z.detach() - out.quantized.detach()) / z.numel()
        torch.testing.assert_close(z.grad, expected)
        torch.testing.assert_close(out.loss, 1.25 * mse)  # same value either way


def test_straight_through_gradients_reach_the_encoder():
    model = VQModel(tiny_model_config())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, codebook_loss, info = model(x)
    rec.abs().mean().backward()  # reconstruction only: the encoder learns through the straight-through path
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # no codebook gradient from the reconstruction alone


def test_stats_report_usage_and_perplexity():
    q = VectorQuantizer(quantizer_config(n_embed=8, embed_dim=2))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.arange(16, dtype=torch.float32).view(8, 2) * 10)
    z = q.embedding.weight[:4].t().reshape(1, 2, 2, 2).clone()  # exactly codes 0..3, once each
    out = q(z)
    assert float(out.stats["usage"]) == pytest.approx(0.5)
    assert float(out.stats["perplexity"]) == pytest.approx(4.0)


def test_gumbel_quantizer_contract_training_and_eval():
    from vqgan.quantizers import GumbelQuantizer

    q = GumbelQuantizer(quantizer_config(kind="gumbel", n_embed=16, embed_dim=4), in_channels=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q.train()
    out = q(z)
    (out.quantized.square().mean() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and q.proj.weight.grad is not None
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.indices, b.indices)  # eval is deterministic: argmax, no noise
    torch.testing.assert_close(a.quantized, q.decode_indices(a.indices))


def test_gumbel_model_trains(tmp_path):
    from conftest import tiny_train_config

    from vqgan.train.stage1 import TokenizerTrainer

    cfg = tiny_train_config(tmp_path, model={"quantizer": {"kind": "gumbel", "n_embed": 32, "embed_dim": 16}},
                            train={"steps": 2})
    assert TokenizerTrainer(cfg, progress=False).fit()["step"] == 2


def test_rotation_trick_gives_the_codes_and_the_rotated_gradient():
    """estimator: rotation (Fifty et al. 2024): the output is the codes exactly; the latent's gradient is
    lambda R^T g, R the rotation of the latent's direction onto its code's (a full D x D matrix here), lambda =
    |code| / |latent|; straight-through passes g unchanged."""
    from vqgan.quantizers.vq import rotation_trick, straight_through

    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    g = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    out = rotation_trick(x, q)
    torch.testing.assert_close(out, q)
    out.backward(g)
    for b, i, j in [(0, 0, 0), (1, 1, 0), (2, 1, 1)]:
        e, c = x.detach()[b, :, i, j], q[b, :, i, j]
        u, w = e / e.norm(), c / c.norm()
        r = (u + w) / (u + w).norm()
        rot = torch.eye(5, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(w, u)
        torch.testing.assert_close(rot @ u, w)  # it is the rotation onto the code's direction
        torch.testing.assert_close(rot.T @ rot, torch.eye(5, dtype=torch.float64))
        torch.testing.assert_close(x.grad[b, :, i, j], c.norm() / e.norm() * rot.T @ g[b, :, i, j])
    x.grad = None
    straight_through(x, q).backward(g)
    torch.testing.assert_close(x.grad, g)


@pytest.mark.parametrize("kind", ["vq", "ema", "residual"])
def test_rotation_estimator_trains_through_every_nearest_neighbour_kind(kind):
    from vqgan.config import quantizer_config
    from vqgan.quantizers import build_quantizer

    extra = {"depth": 2} if kind == "residual" else {}
    q = build_quantizer(quantizer_config(kind, n_embed=16, embed_dim=8, estimator="rotation", **extra), 8).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    torch.testing.assert_close(out.quantized, q.decode_indices(out.indices), atol=1e-5, rtol=1e-5)
    out.quantized.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["vq", "ema", "residual"])
def test_an_unknown_estimator_is_a_one_line_error(kind):
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.errors import UserError

    with pytest.raises(UserError, match=r"model\.quantizer\.estimator must be one of straight_through, rotation"):
        load_config(TokenizerTrainConfig, {"model": {"quantizer": {"kind": kind, "estimator": "sideways"}}})
