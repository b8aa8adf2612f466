"""The contract every registered quantizer kind honours (a new kind joins these tests by registering), and the
check that a new quantizer needs only its file and its registry line to train."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config

from vqgan.checkpoint import load_model
from vqgan.config import CodebookCareConfig, QuantizerConfig
from vqgan.quantizers import Quantizer, QuantizerOutput, build_quantizer, codebook_stats
from vqgan.registry import QUANTIZERS
from vqgan.train.stage1 import TokenizerTrainer


@QUANTIZERS.register("toy-sign")  # the registry line: nothing else in the package learns about this kind
class SignQuantizer(Quantizer):
    """A toy: the signs of the first log2(n_embed) channels are the bits of the token (the rest are zeroed)."""

    def __init__(self, config: QuantizerConfig, in_channels: int):
        super().__init__()
        self.n_embed, self.bits, self.beta = config.n_embed, config.n_embed.bit_length() - 1, config.beta
        assert 2 ** self.bits == config.n_embed <= 2 ** in_channels
        self.rest = in_channels - self.bits  # channels after the bits, zeroed
        self.register_buffer("weights", 2 ** torch.arange(self.bits))  # bit i of the token: channel i

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        head = z[:, :self.bits]
        signs = torch.where(head > 0, 1.0, -1.0).to(z.dtype)
        quantized = torch.cat([head + (signs - head).detach(), torch.zeros_like(z[:, self.bits:])], 1)
        indices = ((signs > 0).long() * self.weights[:, None, None]).sum(1)  # (B, h, w)
        loss = self.beta * F.mse_loss(head.float(), signs.float())
        return QuantizerOutput(quantized, indices, loss, codebook_stats(indices, self.n_embed))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices.long()[:, None] // self.weights[:, None, None]) % 2  # (B, bits, h, w)
        signs = bits.float() * 2 - 1
        b, _, h, w = signs.shape
        return torch.cat([signs, signs.new_zeros(b, self.rest, h, w)], 1)


def make(kind: str, channels: int = 8) -> Quantizer:
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind=kind, n_embed=32, embed_dim=channels), channels)
    if q.trainable_codebook() is not None:
        torch.nn.init.normal_(q.trainable_codebook())  # codes spread like the latents
    return q


KINDS = QUANTIZERS.kinds()


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_its_own_indices_gives_its_quantized_output(kind):
    q = make(kind).eval()
    out = q(torch.randn(2, 8, 3, 5))
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_ranges(kind):
    q = make(kind)
    z = torch.randn(2, 8, 3, 5)
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.n_embed
    assert out.codes.shape == (2, 3, 5) and 0 <= int(out.codes.min()) and int(out.codes.max()) < q.codebook_size
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"usage", "perplexity"} <= set(out.stats)  # the trainer logs them


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_encoder_output(kind):
    q = make(kind).train()
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = q(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips(kind):
    q = make(kind).eval()
    other = make(kind)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    other.load_state_dict(copy.deepcopy(q.state_dict()))
    other.eval()
    z = torch.randn(2, 8, 3, 5)
    a, b = q(z), other(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_is_deterministic(kind):
    q = make(kind).eval()
    z = torch.randn(2, 8, 3, 5)
    torch.manual_seed(1)
    a = q(z)
    torch.manual_seed(2)
    b = q(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)


@pytest.mark.parametrize("kind", KINDS)
def test_upkeep_runs_and_its_state_round_trips(kind):
    q = make(kind).train()
    care = CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0)
    upkeep = q.start_upkeep(care, total_steps=10, seed=0)
    z = torch.randn(4, 8, 4, 4)
    q.initialize_from(z.permute(0, 2, 3, 1).reshape(-1, 8))
    assert upkeep.initialized
    for step in range(3):
        logs = q.maintain(step, z, q(z).codes)
        assert set(logs) == {"usage_window", "restarted"} and 0 <= logs["usage_window"] <= 1
    saved = copy.deepcopy(upkeep.state_dict())
    again = make(kind)
    again.start_upkeep(care, total_steps=10, seed=0).load_state_dict(saved)
    assert torch.equal(again.upkeep.last_used, upkeep.last_used)


def test_a_quantizer_in_its_own_file_trains_through_the_trainer(tmp_path):
    """SignQuantizer above is one class plus its registry line; nothing else was told about it."""
    quantizer = {"kind": "toy-sign", "n_embed": 64, "embed_dim": 16}
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer}, train={"steps": 2, "ckpt_every": 2})
    result = TokenizerTrainer(cfg, progress=False).fit()
    assert result["step"] == 2
    model = load_model(tmp_path / "run")  # its config.yaml names the kind; the registry builds it
    assert type(model.quantize) is SignQuantizer
    tokens = model.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert tokens.max() < 64 and model.decode(tokens).shape == (1, 3, 32, 32)
