"""The contract every registered quantizer kind honours (a new kind joins these tests by registering), and the
check that a new quantizer needs only its file and its registry line to train."""
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config

from vqgan.checkpoint import load_model
from vqgan.config import CodebookCareConfig, QuantizerConfig, quantizer_config
from vqgan.quantizers import Quantizer, QuantizerOutput, build_quantizer, codebook_stats
from vqgan.registry import QUANTIZERS
from vqgan.train.stage1 import TokenizerTrainer


@dataclass
class ToySignConfig(QuantizerConfig):
    kind: str = "toy-sign"
    bits: int = 4  # 2^bits codes per position, split over `depth` codes of bits/depth bits each
    depth: int = 2
    beta: float = 0.25

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (2 ** (self.bits // self.depth),) * self.depth


@QUANTIZERS.register("toy-sign", config=ToySignConfig)  # the registry line: nothing else learns about this kind
class SignQuantizer(Quantizer):
    """A toy with several codes per position: the signs of the first `bits` channels, in `depth` groups; group d
    is the code at depth d (the rest of the channels are zeroed)."""

    def __init__(self, config: ToySignConfig, in_channels: int):
        super().__init__()
        self.config, self.bits, self.depth_ = config, config.bits, config.depth
        assert config.bits <= in_channels and config.bits % config.depth == 0
        self.rest = in_channels - self.bits  # channels after the bits, zeroed
        per = config.bits // config.depth
        self.register_buffer("weights", (2 ** torch.arange(per)).repeat(config.depth))  # bit weights within a group

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        head = z[:, :self.bits]
        signs = torch.where(head > 0, 1.0, -1.0).to(z.dtype)
        quantized = torch.cat([head + (signs - head).detach(), torch.zeros_like(z[:, self.bits:])], 1)
        b, _, h, w = z.shape
        bits = (signs > 0).long() * self.weights[:, None, None]  # (B, bits, h, w)
        indices = bits.view(b, self.depth_, -1, h, w).sum(2).permute(0, 2, 3, 1)  # (B, h, w, depth)
        loss = self.config.beta * F.mse_loss(head.float(), signs.float())
        return QuantizerOutput(quantized, indices, loss, codebook_stats(indices, max(self.vocab_per_depth)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.check_indices(indices).permute(0, 3, 1, 2)  # (B, depth, h, w)
        per = self.bits // self.depth_
        bits = (codes.repeat_interleave(per, 1) // self.weights[:, None, None]) % 2  # (B, bits, h, w)
        signs = bits.float() * 2 - 1
        b, _, h, w = signs.shape
        return torch.cat([signs, signs.new_zeros(b, self.rest, h, w)], 1)


# small settings per kind for these tests; a kind not listed is tested with its section's defaults
SMALL = {"vq": {"n_embed": 32, "embed_dim": 8}, "gumbel": {"n_embed": 32, "embed_dim": 8},
         "toy-sign": {"bits": 4, "depth": 2, "embed_dim": 8}}


def make(kind: str) -> Quantizer:
    torch.manual_seed(0)
    cfg = quantizer_config(kind, **SMALL.get(kind, {}))
    q = build_quantizer(cfg, cfg.code_width)
    if q.trainable_codebook() is not None:
        torch.nn.init.normal_(q.trainable_codebook())  # codes spread like the latents
    return q


def latents(q: Quantizer, b: int = 2, h: int = 3, w: int = 5) -> torch.Tensor:
    return torch.randn(b, q.config.code_width, h, w)


KINDS = QUANTIZERS.kinds()


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_its_own_indices_gives_its_quantized_output(kind):
    q = make(kind).eval()
    z = latents(q)
    out = q(z)
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
    assert torch.equal(q.indices_of(z), out.indices)  # the tokenizing shortcut gives the same codes


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_ranges(kind):
    q = make(kind)
    z = latents(q)
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    depth = len(q.vocab_per_depth)
    assert out.indices.shape == (2, 3, 5, depth) and out.indices.dtype == torch.int64
    for d, vocab in enumerate(q.vocab_per_depth):
        assert 0 <= int(out.indices[..., d].min()) and int(out.indices[..., d].max()) < vocab
    assert out.codes.shape == (2, 3, 5, depth) and 0 <= int(out.codes.min()) and int(out.codes.max()) < q.codebook_size
    assert q.vocab_per_depth == q.config.vocab_per_depth  # the config alone says what the codes are
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"usage", "perplexity"} <= set(out.stats)  # the trainer logs them


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_encoder_output(kind):
    q = make(kind).train()
    z = latents(q).requires_grad_(True)
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
    z = latents(q)
    a, b = q(z), other(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_is_deterministic(kind):
    q = make(kind).eval()
    z = latents(q)
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
    z = latents(q, 4, 4, 4)
    q.initialize_from(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
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
    quantizer = {"kind": "toy-sign", "bits": 6, "depth": 2, "embed_dim": 16}
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer}, train={"steps": 2, "ckpt_every": 2})
    result = TokenizerTrainer(cfg, progress=False).fit()
    assert result["step"] == 2
    model = load_model(tmp_path / "run")  # its config.yaml names the kind; the registry builds it
    assert type(model.quantize) is SignQuantizer
    tokens = model.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert tokens.shape[-1] == 2 and tokens.max() < 8 and model.decode(tokens).shape == (1, 3, 32, 32)
