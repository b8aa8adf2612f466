"""FSQ (Mentzer et al. 2023) and LFQ (Yu et al. 2023, MAGVIT-v2): exact token round trips, the entropies
against their direct definitions, settings errors, presets, and tiny trainings on real photographs.
(The shared contract is tests/test_quantizer_contract.py, which runs both kinds.)"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import grid_model, photo_crops, start_inside_one_cell, tiny_train_config

from vqgan.checkpoint import load_model
from vqgan.config import CodebookCareConfig, TokenizerTrainConfig, load_config, quantizer_config
from vqgan.errors import UserError
from vqgan.presets import resolve_config_path
from vqgan.quantizers import build_quantizer, entropy, lfq
from vqgan.quantizers.grid_start import START_STD, is_stuck
from vqgan.tokenizers.model import VQModel
from vqgan.train.stage1 import TokenizerTrainer


def make(kind: str, **options):
    cfg = quantizer_config(kind, **options)
    cfg.validate()
    return build_quantizer(cfg, cfg.code_width)


# -- FSQ ---------------------------------------------------------------------------------------------
def fsq_latents_for_every_code(q) -> torch.Tensor:
    """(1, C, 1, prod(levels)) latents, one per code in token order: per channel, a z whose bound rounds to
    each level (found on a fine grid with the quantizer's own bound)."""
    grid = torch.linspace(-6, 6, 2401)
    bounded = torch.round(q.bound(grid.view(1, 1, -1, 1).expand(1, len(q.config.levels), -1, 1)))[0, :, :, 0]
    per_channel = []
    for c, level in enumerate(q.config.levels):
        values = sorted(set(bounded[c].tolist()))
        assert len(values) == level  # every level reachable, nothing outside
        per_channel.append([float(grid[(bounded[c] == v).nonzero()[len((bounded[c] == v).nonzero()) // 2]])
                            for v in values])
    # token order: channel 0 least significant
    combos = itertools.product(*reversed(per_channel))
    z = torch.tensor([list(reversed(c)) for c in combos])  # (vocab, C)
    return z.t().reshape(1, len(q.config.levels), 1, -1)


def test_fsq_8555_gives_1000_codes_with_mixed_radix_ids_that_round_trip():
    q = make("fsq", levels=[8, 5, 5, 5]).eval()
    assert q.vocab_per_depth == (1000,) and q.config.code_width == 4
    out = q(fsq_latents_for_every_code(q))
    assert torch.equal(out.indices.view(-1), torch.arange(1000))  # every code, in mixed-radix order
    decoded = q.decode_indices(torch.arange(1000).view(1, 1, 1000, 1))
    assert torch.equal(decoded, out.quantized)  # bit for bit
    assert len({tuple(v) for v in decoded[0, :, 0].t().tolist()}) == 1000
    # digits (7, 0, 4, 2) -> 7 + 0 * 8 + 4 * 40 + 2 * 200; values (digit - L // 2) / (L // 2)
    token = torch.tensor(7 + 4 * 40 + 2 * 200).view(1, 1, 1, 1)
    assert q.decode_indices(token).view(-1).tolist() == [0.75, -1.0, 1.0, 0.0]
    assert decoded.min() == -1 and decoded.max() == 1


@pytest.mark.parametrize("levels", [[2, 3], [4, 6, 7], [8, 8, 8, 5, 5, 5]])
def test_fsq_indices_round_trip_for_other_levels(levels):
    q = make("fsq", levels=levels).eval()
    vocab = math.prod(levels)
    out = q(fsq_latents_for_every_code(q))
    assert torch.equal(out.indices.view(-1), torch.arange(vocab))
    assert torch.equal(q.decode_indices(out.indices), out.quantized)


def test_fsq_gradients_flow_and_the_loss_is_zero():
    q = make("fsq").train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    assert out.loss.item() == 0.0 and not list(q.parameters())
    out.quantized.sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad > 0).all()  # d bound / dz > 0 everywhere


def test_fsq_bad_levels_are_one_line_errors():
    for levels in ([8, 1], []):
        with pytest.raises(UserError, match=r"model\.quantizer\.levels .*e\.g\. \[8, 5, 5, 5\]") as e:
            make("fsq", levels=levels)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"2\*\*31 - 1") as e:
        make("fsq", levels=[1000] * 4)
    assert "\n" not in str(e.value)


# -- LFQ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,split", [(6, 1), (6, 2), (6, 3), (12, 4)])
def test_lfq_indices_round_trip_for_every_code(bits, split):
    q = make("lfq", bits=bits, token_split=split, codebook_scale=0.5).eval()
    sub = bits // split
    assert q.vocab_per_depth == (2**sub,) * split
    codes = torch.arange(2**bits)
    tokens = torch.stack([(codes >> (sub * j)) & (2**sub - 1) for j in range(split)], -1).view(1, 1, -1, split)
    decoded = q.decode_indices(tokens)
    assert set(decoded.unique().tolist()) == {-0.5, 0.5}
    out = q(decoded)
    assert torch.equal(out.indices, tokens) and torch.equal(out.quantized, decoded)
    # bit k of the code is channel k's sign: code 1 is channel 0 up, the rest down
    assert decoded[0, :, 0, 1].tolist() == [0.5] + [-0.5] * (bits - 1)


def test_lfq_auto_split_and_big_codebooks_round_trip():
    assert quantizer_config("lfq", bits=10).vocab_per_depth == (1024,)
    assert quantizer_config("lfq", bits=18).vocab_per_depth == (512, 512)
    assert quantizer_config("lfq", bits=24).vocab_per_depth == (4096, 4096)
    q = make("lfq", bits=18, token_split=2).eval()
    z = torch.randn(2, 18, 4, 4)
    out = q(z)
    assert out.indices.shape == (2, 4, 4, 2) and torch.equal(q.decode_indices(out.indices), out.quantized)


def direct_entropies(z: torch.Tensor, scale: float, temperature: float):
    """The paper's definition over an explicit codebook: p(c|z) = softmax_c(2 z.(s c) / t), c in {-1, 1}^bits
    in token order."""
    bits = z.shape[1]
    codes = ((torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1).to(z.dtype) * 2 - 1  # (2^bits, bits)
    p = F.softmax(2 * z @ (scale * codes).t() / temperature, dim=1)
    sample = -(p * torch.log(p)).sum(1).mean()
    mean = p.mean(0)
    return sample, -(mean * torch.log(mean)).sum()


def test_lfq_entropies_equal_the_direct_computation_values_and_gradients():
    torch.manual_seed(0)
    z = (torch.randn(50, 6, dtype=torch.float64) * 0.3).requires_grad_(True)
    scale, temperature = 1.5, 0.7
    logits = lfq.bit_logits(z, scale, temperature)
    ours = lfq.sample_entropy(logits), lfq.codebook_entropy(logits)
    direct = direct_entropies(z, scale, temperature)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        (ga,) = torch.autograd.grad(a, z, retain_graph=True)
        (gb,) = torch.autograd.grad(b, z, retain_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lfq.codebook_entropy, (logits.detach()[:7].requires_grad_(),))


def test_lfq_factorized_codebook_entropy_sums_the_groups_and_bounds_the_exact_one():
    torch.manual_seed(0)
    z = torch.randn(40, 6, dtype=torch.float64) * 0.2
    logits = lfq.bit_logits(z, 1.0, 0.5)
    halves = [direct_entropies(part, 1.0, 0.5)[1] for part in z.chunk(2, dim=1)]
    factorized = lfq.factorized_codebook_entropy(logits, 2)
    torch.testing.assert_close(factorized, sum(halves))
    assert factorized >= lfq.codebook_entropy(logits)


def test_lfq_training_loss_is_commitment_plus_the_weighted_entropies():
    q = make("lfq", bits=6, commitment_weight=0.3, entropy_weight=0.2, sample_entropy_weight=0.7,
             codebook_entropy_weight=1.3, entropy_temperature=0.5, codebook_scale=2.0)
    z = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    out = q.train()(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    sample, codebook = direct_entropies(flat, 2.0, 0.5)
    expected = 0.3 * F.mse_loss(z, 2.0 * torch.sign(z)) + 0.2 * (0.7 * sample - 1.3 * codebook)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    (out.quantized.sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.eval()(z).loss.item() == pytest.approx(0.3 * F.mse_loss(z, 2.0 * torch.sign(z)).item(), rel=1e-5)


def test_bsq_codes_lie_on_the_sphere_and_its_loss_is_lfqs_on_the_normalised_latent():
    """spherical (BSQ): the codes are +-scale/sqrt(bits) (unit norm at scale 1) whatever the latent's norm; the
    tokens are LFQ's (signs do not change with the norm); the loss is LFQ's of z/|z| with codes of that scale."""
    torch.manual_seed(0)
    bsq = make("lfq", bits=6, spherical=True, entropy_weight=0.2, entropy_temperature=0.5, commitment_weight=0.3)
    plain = make("lfq", bits=6)
    z = torch.randn(2, 6, 3, 4, dtype=torch.float64) * 7
    out = bsq.train()(z)
    torch.testing.assert_close(out.quantized.double().norm(dim=1), torch.ones(2, 3, 4, dtype=torch.float64))
    assert torch.equal(out.indices, plain.eval()(z).indices)
    torch.testing.assert_close(bsq.decode_indices(out.indices), out.quantized.float())
    u = F.normalize(z, dim=1)
    flat = u.permute(0, 2, 3, 1).reshape(-1, 6)
    sample, codebook = direct_entropies(flat, 6 ** -0.5, 0.5)
    expected = 0.3 * F.mse_loss(u, torch.sign(u) * 6 ** -0.5) + 0.2 * (sample - codebook)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_fsq_grid_entropies_equal_the_direct_computation_values_and_gradients():
    """The optional FSQ entropy penalty: each channel's soft assignment to its integers, the product over
    channels for a code; the batch mean over all prod(levels) codes as the product of two channel groups'."""
    torch.manual_seed(0)
    levels = [3, 4, 2]
    v = (torch.randn(7, 3, dtype=torch.float64)).requires_grad_(True)
    ours = entropy.grid_entropies(entropy.grid_log_probs(v, levels, 0.5), levels)
    per_channel = [F.softmax(-(v[:, i:i + 1] - (torch.arange(n, dtype=v.dtype) - n // 2)) ** 2 / 0.5, 1)
                   for i, n in enumerate(levels)]
    # code c = d0 + 3 d1 + 12 d2 (channel 0 least significant, as the tokens)
    p = torch.stack([per_channel[0][:, d0] * per_channel[1][:, d1] * per_channel[2][:, d2]
                     for d2, d1, d0 in itertools.product(range(2), range(4), range(3))], 1)
    mean = p.mean(0)
    direct = -(p * p.log()).sum(1).mean(), -(mean * mean.log()).sum()
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        (ga,) = torch.autograd.grad(a, v, retain_graph=True)
        (gb,) = torch.autograd.grad(b, v, retain_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("levels", [[5], [8, 5], [8, 5, 5, 5], [8, 8, 8, 5, 5, 5]])
def test_the_grid_mean_is_every_code_in_token_order(levels):
    """grid_mean_probs of one-hot channels is the one-hot of the code fsq.py numbers (mixed radix, channel 0 the
    least significant), for every grid shape; and it sums to one for soft assignments."""
    digits = torch.stack([torch.randint(n, (6,)) for n in levels], 1)  # (6, C)
    log_probs = torch.cat([torch.where(F.one_hot(digits[:, i], n).bool(), 0.0, -1e4) for i, n in enumerate(levels)], 1)
    mean = entropy.grid_mean_probs(log_probs, levels)
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    expected = torch.bincount((digits * basis).sum(1), minlength=math.prod(levels)).float() / 6
    torch.testing.assert_close(mean, expected)
    soft = entropy.grid_log_probs(torch.randn(6, len(levels)), levels, 0.5)
    assert entropy.grid_mean_probs(soft, levels).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_fsq_entropy_penalty_is_a_training_loss_and_off_by_default():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert make("fsq").train()(z).loss.item() == 0.0
    q = make("fsq", entropy_weight=0.5).train()
    out = q(z)
    assert out.loss.item() == pytest.approx(0.5 * (out.stats["sample_entropy"] - out.stats["codebook_entropy"]).item())
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.eval()(z).loss.item() == 0.0
    for options, message in [({"entropy_weight": -1.0}, "entropy_weight must be >= 0"),
                             ({"entropy_temperature": 0.0}, "entropy_temperature must be > 0"),
                             ({"sample_entropy_weight": -1.0}, "sample_entropy_weight must be >= 0")]:
        with pytest.raises(UserError, match=message):
            load_config(TokenizerTrainConfig, {"model": {"quantizer": {"kind": "fsq", **options}}})


def test_channel_correlation_is_the_mean_squared_off_diagonal_correlation():
    from vqgan.quantizers.decorrelation import channel_correlation

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 4, generator=g) @ torch.randn(4, 4, generator=g)  # correlated channels
    corr = torch.corrcoef(rows.T.double())
    expected = (corr.pow(2).sum() - 4) / 12
    assert channel_correlation(rows).item() == pytest.approx(expected.item(), rel=1e-4)
    assert channel_correlation(torch.cat([rows[:, :1]] * 3, 1)).item() == pytest.approx(1.0, abs=1e-4)
    assert channel_correlation(rows[:, :1]).item() == 0.0
    # scale-free, and its gradient decorrelates: a few steps on the mixing matrix lower it
    assert channel_correlation(rows * 7 + 3).item() == pytest.approx(channel_correlation(rows).item(), rel=1e-4)
    mix = torch.eye(4).requires_grad_(True)
    opt = torch.optim.SGD([mix], lr=0.1)
    first = channel_correlation(rows @ mix).item()
    for _ in range(30):
        opt.zero_grad()
        channel_correlation(rows @ mix).backward()
        opt.step()
    assert channel_correlation(rows @ mix).item() < 0.5 * first


def test_fsq_decorrelation_is_a_training_loss_and_off_by_default():
    z = torch.randn(2, 4, 3, 3)
    z[:, 1] = z[:, 0] + 0.1 * z[:, 1]  # two channels nearly equal
    z.requires_grad_(True)
    assert "channel_correlation" not in make("fsq").train()(z).stats
    q = make("fsq", decorrelation_weight=2.0).train()
    out = q(z)
    assert out.loss.item() == pytest.approx(2.0 * out.stats["channel_correlation"].item())
    assert out.stats["channel_correlation"] > 1 / 6  # the one correlated pair alone gives 2 r^2 / 12
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.eval()(z).loss.item() == 0.0
    with pytest.raises(UserError, match="decorrelation_weight must be >= 0"):
        load_config(TokenizerTrainConfig, {"model": {"quantizer": {"kind": "fsq", "decorrelation_weight": -1}}})


def test_lfq_bad_settings_are_one_line_errors():
    cases = [({"bits": 0}, r"model\.quantizer\.bits must be >= 1"),
             ({"bits": 10, "token_split": 3}, r"model\.quantizer\.token_split must divide"),
             ({"bits": 18, "token_split": 1}, r"2\^18 ids per sub-token.*raise model\.quantizer\.token_split \(e\.g\. 2"),
             ({"bits": 24, "token_split": 2}, r"entropy group.*raise model\.quantizer\.entropy_groups"),
             ({"bits": 10, "entropy_groups": 3}, r"entropy_groups must divide"),
             ({"bits": 10, "entropy_temperature": 0.0}, r"entropy_temperature must be > 0")]
    for options, message in cases:
        with pytest.raises(UserError, match=message) as e:
            load_config(TokenizerTrainConfig, {"model": {"quantizer": {"kind": "lfq", **options}}})
        assert "\n" not in str(e.value)


# -- presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,vocab,meta", [("small-cpu-fsq", (1000,), False), ("small-cpu-lfq", (1024,), False),
                                             ("fsq-64k", (64000,), True), ("lfq-18bit", (512, 512), True),
                                             ("small-cpu-vit-fsq", (1000,), False)])
def test_presets_load_and_build(name, vocab, meta):
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(name))
    assert cfg.model.code_spec.levels[0].vocab == vocab
    with torch.device("meta" if meta else "cpu"):
        model = VQModel(cfg.model)
    assert model.quant_conv.out_channels == cfg.model.quantizer.code_width
    if not meta:
        tokens = model.eval().encode(torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution))
        assert tokens.shape[-1] == len(vocab) and model.decode(tokens).shape[-1] == cfg.model.resolution


# -- training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_crops(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("quantizer", [{"kind": "fsq", "levels": [8, 5, 5, 5]}, {"kind": "lfq", "bits": 10},
                                       {"kind": "lfq", "bits": 10, "spherical": True}], ids=["fsq", "lfq", "bsq"])
def test_a_tiny_model_learns_real_photographs(tmp_path, photos, quantizer):
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer},
                            data={"path": str(photos), "holdout": 4, "crop": "center", "flip": False},
                            loss={"disc_start": 10_000, "disc_train_start": 10_000},
                            train={"steps": 24, "batch_size": 8, "base_learning_rate": 1e-4, "eval_every": 1000,
                                   "ckpt_every": 1000})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 2.5, (before, after["psnr"])  # 20 steps gave +3.7 (fsq), +4.0 (lfq) dB
    model = load_model(tmp_path / "run")  # the saved config names the kind; the registry rebuilds it
    assert model.code_spec == cfg.model.code_spec
    tokens = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (2, 16, 16, len(cfg.model.quantizer.vocab_per_depth))
    assert model.decode(tokens).shape == (2, 3, 32, 32)


# -- starting on the grid (grid_start.py) --------------------------------------------------------------------------
GRID_KINDS = [{"kind": "fsq", "levels": [8, 5, 5, 5]}, {"kind": "lfq", "bits": 10},
              {"kind": "lfq", "bits": 10, "spherical": True}]


def codes_in(model: VQModel, x: torch.Tensor) -> int:
    tokens = model.encode(x)
    return tokens.reshape(-1, tokens.shape[-1]).unique(dim=0).shape[0]


def assert_centred(h: torch.Tensor, atol: float = 1e-3) -> None:
    """(B, C, h, w) latents: each channel's mean 0 and std START_STD."""
    torch.testing.assert_close(h.mean((0, 2, 3)), torch.zeros(h.shape[1]), atol=atol, rtol=0)
    torch.testing.assert_close(h.std((0, 2, 3)), torch.full((h.shape[1],), START_STD), atol=atol, rtol=0)


@pytest.mark.parametrize("quantizer", GRID_KINDS, ids=["fsq", "lfq", "bsq"])
def test_a_latent_that_starts_inside_one_cell_is_centred_onto_the_grid(quantizer):
    model = grid_model(quantizer)
    start_inside_one_cell(model.quant_conv)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    model.quantize.start_upkeep(CodebookCareConfig(), total_steps=10)
    assert codes_in(model, x) == 1
    done = model.initialize_codebook(lambda: iter([x[:8], x[8:]]))
    assert "inside one cell" in done, done
    with torch.no_grad():
        assert_centred(model.encode_to_prequant(x))
    assert codes_in(model, x) > 20


def test_the_centring_reads_float32_latents_under_bf16_autocast():
    """bf16 rounds a latent of std 3e-4 around 0.3 to a few values: measured there, its std would be 0 or a
    rounding step, and the scale 0.17 / std explodes or lands anywhere."""
    model = grid_model({"kind": "fsq", "levels": [8, 5, 5, 5]})
    start_inside_one_cell(model.quant_conv)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    model.quantize.start_upkeep(CodebookCareConfig(), total_steps=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "inside one cell" in model.initialize_codebook(lambda: iter([x]))
    with torch.no_grad():
        assert_centred(model.encode_to_prequant(x))


@pytest.mark.parametrize("quantizer", GRID_KINDS, ids=["fsq", "lfq", "bsq"])
def test_a_latent_that_spreads_over_the_grid_is_left_as_it_is(quantizer):
    model = grid_model(quantizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.quantize.start_upkeep(CodebookCareConfig(), total_steps=10)
    done = model.initialize_codebook(lambda: iter([torch.rand(8, 3, 32, 32) * 2 - 1]))
    assert "left as they are" in done, done
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_is_stuck_reads_each_channels_values_and_the_spread():
    spread = torch.randn(1000, 3)
    assert not is_stuck(spread.round(), spread)
    one_value = torch.zeros(1000, 3)
    one_value[:5] = 1  # 0.5% of the positions elsewhere: still stuck
    assert is_stuck(one_value, one_value)
    one_value[:20, 1] = 1  # one channel that varies in 2% of them: not
    assert not is_stuck(one_value, one_value)
    tiny = spread * 0.01  # LFQ's sign splits a tiny latent near 0, but it spreads over 1% of a step
    assert is_stuck(tiny > 0, tiny)


def test_grid_kinds_and_codebooks_start_from_data_and_logit_codes_do_not():
    assert [q.starts_from_data for q in (make("vq"), make("fsq"), make("lfq"), make("gumbel"))] == [True] * 3 + [False]


def test_the_trainer_centres_a_stuck_start_on_a_fresh_run_only(tmp_path, photos):
    cfg = tiny_train_config(tmp_path, model={"quantizer": {"kind": "fsq", "levels": [8, 5, 5, 5]}},
                            data={"path": str(photos), "holdout": 4}, train={"steps": 1, "ckpt_every": 1})
    trainer = TokenizerTrainer(cfg, progress=False)
    start_inside_one_cell(trainer.model.quant_conv)
    trainer.fit()
    log = tmp_path / "run" / "logs" / "train.log"
    assert "started inside one cell of the grid" in log.read_text() and "centred with std" in log.read_text()
    cfg.train.steps = 2  # resumed: the checkpoint's quant_conv as it is, no second initialisation
    TokenizerTrainer(cfg, resume=True, progress=False).fit()
    assert log.read_text().count("data initialisation") == 1
