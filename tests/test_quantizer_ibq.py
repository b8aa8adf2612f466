"""`vq` with `estimator: index_backprop` (IBQ, Shi et al. 2024): nearest codes, gradients through the soft assignment."""
import pytest
import torch
from conftest import tiny_train_config

from vqgan.config import quantizer_config
from vqgan.errors import UserError
from vqgan.quantizers import build_quantizer


def make(**options):
    torch.manual_seed(0)
    cfg = quantizer_config("vq", **{"n_embed": 32, "embed_dim": 8, "estimator": "index_backprop", **options})
    cfg.validate()
    q = build_quantizer(cfg, cfg.code_width).train()
    torch.nn.init.normal_(q.embedding.weight)
    return q


@pytest.mark.parametrize("options", [{}, {"codebook_dim": 4, "l2_norm": True, "index_temperature": 0.05}])
def test_values_are_the_nearest_codes_and_gradients_those_of_the_soft_assignment(options):
    """Forward: the codes of the plain lookup. Backward: IBQ's (onehot - sg[p] + p) @ codebook with
    p = softmax(-||z - e||^2 / t), written here in float64 with cdist, for the latent and every parameter."""
    q = make(**options)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    torch.testing.assert_close(out.quantized, q.decode_indices(out.indices), atol=1e-5, rtol=1e-5)
    assert out.quantized.requires_grad and q.embedding.weight.grad is None
    g = torch.randn_like(out.quantized)
    params = [p for p in q.parameters() if p.requires_grad]
    got = torch.autograd.grad((out.quantized * g).sum(), [z, *params])

    t = q.config.index_temperature

    def soft_output(z, *weights):
        state = dict(zip([n for n, p in q.named_parameters() if p.requires_grad], weights))
        latent = z.double().permute(0, 2, 3, 1).reshape(-1, 8)
        codes = state["embedding.weight"].double()
        if "project_in.weight" in state:
            latent = latent @ state["project_in.weight"].double().t() + state["project_in.bias"].double()
        if q.config.l2_norm:
            latent, codes = torch.nn.functional.normalize(latent, dim=1), torch.nn.functional.normalize(codes, dim=1)
        p = torch.softmax(-torch.cdist(latent, codes).square() / t, dim=1)
        onehot = torch.nn.functional.one_hot(out.codes.reshape(-1), 32).double()
        rows = (onehot - p.detach() + p) @ codes
        if "project_out.weight" in state:
            rows = rows @ state["project_out.weight"].double().t() + state["project_out.bias"].double()
        return rows.view(2, 3, 3, 8).permute(0, 3, 1, 2)

    weights = [p.detach().double().requires_grad_() for p in params]
    zz = z.detach().double().requires_grad_()
    want = torch.autograd.grad((soft_output(zz, *weights) * g.double()).sum(), [zz, *weights])
    names = [n for n, p in q.named_parameters() if p.requires_grad]
    for name, a, b in zip(["z", *names], got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4, msg=name)


def test_every_code_moves_where_straight_through_moves_only_the_chosen():
    z = torch.randn(1, 8, 1, 3)  # three latents: at most three codes chosen
    for estimator in ("index_backprop", "straight_through"):
        q = make(estimator=estimator)
        out = q(z)
        (out.quantized.square().sum() + out.loss).backward()
        moved = (q.embedding.weight.grad.norm(dim=1) > 0).sum().item()
        assert moved == (32 if estimator == "index_backprop" else out.codes.unique().numel()), (estimator, moved)


def test_it_trains_a_tokenizer(tmp_path):
    from vqgan.train.stage1 import TokenizerTrainer

    cfg = tiny_train_config(tmp_path, model={"quantizer": {"n_embed": 32, "embed_dim": 16,
                                                           "estimator": "index_backprop"}}, train={"steps": 2})
    assert TokenizerTrainer(cfg, progress=False).fit()["step"] == 2


@pytest.mark.parametrize("model,match", [
    ({"quantizer": {"kind": "ema", "n_embed": 64, "embed_dim": 16, "estimator": "index_backprop"}},
     r"model\.quantizer\.estimator: index_backprop .* kind ema"),
    ({"quantizer": {"n_embed": 64, "embed_dim": 16, "estimator": "index_backprop", "index_temperature": 0}},
     r"model\.quantizer\.index_temperature must be > 0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, model, match):
    with pytest.raises(UserError, match=match) as err:
        tiny_train_config(tmp_path, model=model)
    assert "\n" not in str(err.value)
