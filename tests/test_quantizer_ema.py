"""The EMA codebook (VQ-VAE appendix A.1) and factorized, l2-normalised codes (ViT-VQGAN sec. 3.2): the update
formulas by hand, gradient accumulation, two processes, the lookup space, presets, and short trainings."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import grid_start_on, photo_crops, run_two_processes, tiny_train_config

from vqgan.config import CodebookCareConfig, TokenizerTrainConfig, load_config, quantizer_config
from vqgan.errors import UserError
from vqgan.presets import resolve_config_path
from vqgan.quantizers import EMAVectorQuantizer, VectorQuantizer, build_quantizer
from vqgan.quantizers.entropy import assignment_entropies
from vqgan.quantizers.residual import ResidualConfig
from vqgan.tokenizers import VQModel
from vqgan.train.stage1 import TokenizerTrainer

ROOT = Path(__file__).resolve().parents[1]
NO_RESTARTS = CodebookCareConfig(restart_every=0)


def make(kind="ema", care=NO_RESTARTS, **options):
    torch.manual_seed(0)
    cfg = quantizer_config(kind, **{"n_embed": 16, "embed_dim": 4, **options})
    cfg.validate()
    q = build_quantizer(cfg, cfg.code_width).train()
    q.start_upkeep(care, total_steps=100)
    return q


def grid(rows) -> torch.Tensor:
    """A list of latent vectors -> (1, D, 1, N), the layout a quantizer reads."""
    return torch.tensor(rows, dtype=torch.float32).t()[None, :, None, :]


def ema_step(size, avg, counts, sums, decay, eps):
    """The formulas of VQ-VAE A.1 with Laplace smoothing, in plain Python: (N, m) -> (N', m', codes)."""
    size = [decay * s + (1 - decay) * c for s, c in zip(size, counts)]
    avg = [[decay * a + (1 - decay) * x for a, x in zip(ra, rs)] for ra, rs in zip(avg, sums)]
    n = sum(size)
    smoothed = [(s + eps) / (n + len(size) * eps) * n for s in size]
    return size, avg, [[a / s for a in ra] for ra, s in zip(avg, smoothed)]


def step(q, z, step_no=0):
    out = q(z)
    logs = q.maintain(step_no, z, out.codes)
    return out, logs


# -- the update ----------------------------------------------------------------------------------------
def test_codes_move_to_their_assigned_means_as_the_formulas_say():
    q = make(n_embed=3, embed_dim=2, decay=0.9, epsilon=0.1)
    codes = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    q.embedding.weight.copy_(torch.tensor(codes))
    q.embedding.reset(torch.ones(3, dtype=torch.bool))  # N_k = 1, m_k = e_k
    out, _ = step(q, grid([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]]))
    assert out.indices.reshape(-1).tolist() == [0, 0, 1]  # code 2 is unused
    # by hand: N = 0.9 + 0.1 n = (1.1, 1.0, 0.9), n = 3; m = 0.9 e + 0.1 sums;
    # smoothed N = (N + 0.1) / (3 + 0.3) * 3 = (12/11, 1, 10/11)
    expected = [[0.1 * 11 / 12, 0.1 * 11 / 12], [9.9, 0.1], [0.0, 9.9]]
    torch.testing.assert_close(q.embedding.weight, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.embedding.cluster_size, torch.tensor([1.1, 1.0, 0.9]))

    size, avg, expected = ema_step([1.1, 1.0, 0.9], q.embedding.embed_avg.tolist(), [1, 0, 2],
                                   [[0.5, 0.5], [0.0, 0.0], [1.0, 17.0]], 0.9, 0.1)
    out, _ = step(q, grid([[0.5, 0.5], [0.0, 8.0], [1.0, 9.0]]), 1)
    assert out.indices.reshape(-1).tolist() == [0, 2, 2]
    torch.testing.assert_close(q.embedding.weight, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.embedding.cluster_size, torch.tensor(size))
    torch.testing.assert_close(q.embedding.embed_avg, torch.tensor(avg))


def test_the_codebook_is_a_buffer_and_the_loss_is_the_commitment_term():
    q = make(beta=0.5)
    assert all("embedding" not in name for name, _ in q.named_parameters())
    assert {"embedding.weight", "embedding.cluster_size", "embedding.embed_avg"} <= set(q.state_dict())
    assert not any("step_" in k for k in q.state_dict())  # per-step statistics are not saved
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    e = q.decode_indices(out.indices)
    torch.testing.assert_close(out.loss, 0.5 * (z.detach() - e).square().mean())
    out.loss.backward()
    torch.testing.assert_close(z.grad, 0.5 * 2 * (z.detach() - e) / z.numel())


def test_eval_forward_changes_nothing():
    q = make().eval()
    before = copy.deepcopy(q.state_dict())
    z = torch.randn(2, 4, 3, 3)
    q.maintain(0, z, q(z).codes)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("options", [{}, {"codebook_dim": 3, "l2_norm": True}], ids=["plain", "factorized-l2"])
def test_two_micro_batches_update_as_one_batch_of_both(options):
    a, b = torch.randn(2, 4, 3, 3), torch.randn(3, 4, 3, 3)
    one, two = make(**options), make(**options)
    one.initialize_from(a.permute(0, 2, 3, 1).reshape(-1, 4))
    two.load_state_dict(one.state_dict())
    two.upkeep.initialized = True
    for s in range(2):
        one(a)  # gradient accumulation: the forward passes add up, one update after the optimizer step
        one.maintain(s, b, one(b).codes)
        both = torch.cat([a, b])
        two.maintain(s, both, two(both).codes)
        for k in ("weight", "cluster_size", "embed_avg"):
            torch.testing.assert_close(getattr(one.embedding, k), getattr(two.embedding, k), rtol=1e-6, atol=1e-6)
    assert not torch.equal(one.embedding.weight, make(**options).embedding.weight)


def test_restarted_codes_restart_their_averages():
    q = make(care=CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0))
    z = torch.randn(2, 4, 4, 4)
    q.initialize_from(z.permute(0, 2, 3, 1).reshape(-1, 4))
    q.embedding.weight[3] = 1e3  # never wins
    q.embedding.reset(torch.arange(16) == 3)
    for s in range(3):
        step(q, z, s)
    assert q.upkeep.restarts_total > 0
    assert q.embedding.weight[3].abs().max() < 100  # moved onto the data
    torch.testing.assert_close(q.embedding.embed_avg[3], q.embedding.weight[3])
    assert float(q.embedding.cluster_size[3]) == 1.0


def test_nonfinite_statistics_are_dropped():
    q = make()
    before = q.embedding.weight.clone()
    q(torch.full((1, 4, 2, 2), float("nan")))
    q.maintain(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long))
    assert torch.equal(q.embedding.weight, before)
    assert not q.embedding.step_counts.any() and not q.embedding.step_sums.any()


def test_two_processes_make_the_update_of_the_union(tmp_path):
    """Each rank sees different data; both end with the same codebook, the one-process update on the union."""
    script = tmp_path / "ema_ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_quantizer_ema import make, rank_data
dist.init_process_group("gloo")
rank = dist.get_rank()
q = make()
q.initialize_from(rank_data(0, 0).permute(0, 2, 3, 1).reshape(-1, 4))  # rank 0's rows, broadcast
for s in range(2):
    z = rank_data(rank, s)
    q.maintain(s, z, q(z).codes)
flat = torch.cat([t.float().reshape(-1) for t in q.state_dict().values()])
both = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), "ranks diverged"
if rank == 0:
    torch.save(q.state_dict(), {str(tmp_path / 'ddp.pt')!r})
    print("EMA_RANKS_IDENTICAL")
dist.barrier()
dist.destroy_process_group()
from vqgan.train.common import leave_worker
leave_worker(0)  # gloo's worker threads can abort interpreter finalization (see leave_worker)
""")
    assert "EMA_RANKS_IDENTICAL" in run_two_processes(script)
    ddp = torch.load(tmp_path / "ddp.pt")
    q = make()
    q.initialize_from(rank_data(0, 0).permute(0, 2, 3, 1).reshape(-1, 4))
    for s in range(2):
        z = torch.cat([rank_data(0, s), rank_data(1, s)])
        q.maintain(s, z, q(z).codes)
    assert not torch.equal(ddp["embedding.weight"], make().embedding.weight)
    for k, v in q.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)


def rank_data(rank: int, step_no: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step_no + rank)
    return torch.randn(2, 4, 3, 3, generator=g) + rank  # the ranks' data differ in distribution too


# -- factorized, l2-normalised codes ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_factorized_l2_codes_live_on_the_sphere_and_pass_gradients(kind):
    q = make(kind, n_embed=32, embed_dim=16, codebook_dim=4, l2_norm=True)
    assert q.embedding.weight.shape == (32, 4)
    z = torch.randn(2, 16, 3, 5, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    ones = torch.ones(2 * 3 * 5)
    torch.testing.assert_close(q.to_lookup(z).norm(dim=1).reshape(-1), ones)
    torch.testing.assert_close(q.codebook().norm(dim=1), torch.ones(32))
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
    (out.quantized.square().sum() + out.loss).backward()
    for name, t in [("encoder output", z), ("project_in", q.project_in.weight), ("project_out", q.project_out.weight)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    if kind == "vq":
        assert q.embedding.weight.grad.abs().sum() > 0  # the codebook term reaches the (normalised) codes


def test_upkeep_works_in_the_lookup_space():
    """Data init and the restart pool get the projected, normalised latents (the upkeep is given embed_dim)."""
    q = make("vq", n_embed=8, embed_dim=16, codebook_dim=4, l2_norm=True,
             care=CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0))
    z = torch.randn(2, 16, 4, 4)
    q.initialize_from(z.permute(0, 2, 3, 1).reshape(-1, 16))
    norms = q.embedding.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(8), atol=0.05)  # normalised rows, plus a little noise
    q.maintain(0, z, q(z).codes)
    assert q.upkeep.pool.shape[1] == 4
    torch.testing.assert_close(q.upkeep.pool.norm(dim=1), torch.ones(q.upkeep.pool.shape[0]))


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_l2_codes_from_zero_latents_stay_finite(kind):
    q = make(kind, l2_norm=True)
    q.initialize_from(torch.zeros(64, 4))  # every norm is zero: clamped, never NaN
    z = torch.zeros(1, 4, 2, 2, requires_grad=True)
    out = q(z)
    (out.quantized.sum() + out.loss).backward()
    q.maintain(0, z.detach(), out.codes)
    for t in (out.quantized, out.loss, z.grad, q.embedding.weight, q.codebook()):
        assert torch.isfinite(t).all()


# -- the entropy penalty (MaskGIT / LlamaGen) -------------------------------------------------------------
def test_assignment_entropies_match_a_direct_computation():
    z, codes = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    per_sample, batch = assignment_entropies(z.float(), codes.float(), 0.5)
    p = [[math.exp(-sum((a - b) ** 2 for a, b in zip(zi, ci)) / 0.5) for ci in codes.tolist()] for zi in z.tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    h = [-sum(v * math.log(v) for v in row) for row in p]
    mean = [sum(row[k] for row in p) / len(p) for k in range(5)]
    assert per_sample.item() == pytest.approx(sum(h) / len(h), rel=1e-4)
    assert batch.item() == pytest.approx(-sum(m * math.log(m) for m in mean), rel=1e-4)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: saturated rows, where the floor on p acts
def test_the_fused_entropies_match_autograd_in_float64(scale):
    """softmax_entropies' own backward (a few passes over the block) against autograd through the plain formula."""
    from vqgan.quantizers.entropy import softmax_entropies

    logits = (torch.randn(40, 24, dtype=torch.float64) * scale).requires_grad_(True)
    fused = softmax_entropies(logits)
    (0.7 * fused[0] - 1.3 * fused[1]).backward()
    reference = logits.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(reference, 1)
    p = log_p.exp()
    mean = p.mean(0)
    plain = (-(p * log_p).sum(1).mean(), -(mean * mean.log()).sum())
    (0.7 * plain[0] - 1.3 * plain[1]).backward()
    for a, b in zip(fused, plain):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logits.grad, reference.grad.float().double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_entropy_penalty_spreads_latents_over_the_codes(kind):
    """Latents all nearest to one code: the penalty's gradient alone moves them towards a spread of codes (the
    batch entropy rises), training forward passes only."""
    q = make(kind, n_embed=8, embed_dim=2, entropy_weight=1.0, entropy_temperature=0.5)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[math.cos(a), math.sin(a)] for a in
                                               torch.arange(8) * 2 * math.pi / 8]))
    z = (torch.tensor([1.0, 0.0]).view(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 4, 4)).requires_grad_(True)
    first = q(z).stats["codebook_entropy"]
    opt = torch.optim.SGD([z], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        q(z).loss.backward()
        opt.step()
    assert q(z).stats["codebook_entropy"] > first + 0.3
    assert "codebook_entropy" not in q.eval()(z).stats


@pytest.mark.parametrize("kind, options", [("vq", {}), ("ema", {}), ("vq", {"codebook_dim": 2, "l2_norm": True}),
                                           ("fsq", {"levels": [5, 4, 3]})])
def test_sample_entropy_weight_scales_only_the_per_position_term(kind, options):
    """loss(share s) - loss(share 1) = w (s - 1) E[H(p(.|z))], the batch term and everything else unchanged."""
    z = torch.randn(2, 4 if kind != "fsq" else 3, 3, 3)

    def quantizer(share):
        torch.manual_seed(0)
        cfg = quantizer_config(kind, **{**({} if kind == "fsq" else {"n_embed": 16, "embed_dim": 4}), **options,
                                        "entropy_weight": 0.3, "entropy_temperature": 0.5,
                                        "sample_entropy_weight": share})
        cfg.validate()
        return build_quantizer(cfg, cfg.code_width).train()

    outs = [quantizer(share)(z) for share in (1.0, 0.25)]
    torch.testing.assert_close(outs[0].stats["sample_entropy"], outs[1].stats["sample_entropy"])
    expected = 0.3 * (0.25 - 1.0) * outs[0].stats["sample_entropy"]
    torch.testing.assert_close(outs[1].loss - outs[0].loss, expected, rtol=1e-5, atol=1e-6)


def test_residual_passes_the_share_to_each_depth():
    cfg = ResidualConfig(depth=2, n_embed=8, embed_dim=4, entropy_weight=0.1, sample_entropy_weight=0.5)
    assert cfg.codebook_section().sample_entropy_weight == 0.5
    with pytest.raises(UserError, match=r"model\.quantizer\.sample_entropy_weight must be >= 0"):
        load_config(TokenizerTrainConfig, {"model": {"quantizer": {"kind": "residual", "depth": 2, "n_embed": 8,
                                                                   "entropy_weight": 0.1, "sample_entropy_weight": -1}}})


@pytest.mark.parametrize("options, key", [
    ({"entropy_weight": -0.1}, "entropy_weight must be >= 0"),
    ({"sample_entropy_weight": -0.5}, "sample_entropy_weight must be >= 0"),
    ({"entropy_temperature": 0.0}, "entropy_temperature must be > 0"),
    ({"codebook_dim": -1}, "codebook_dim must be >= 0"),
    ({"kind": "ema", "decay": 1.0}, "decay must be in"),
    ({"kind": "ema", "epsilon": 0.0}, "epsilon must be > 0"),
    ({"kind": "ema", "legacy_beta": True}, "legacy_beta"),
])
def test_settings_that_cannot_work_are_one_line_errors(tmp_path, options, key):
    with pytest.raises(UserError, match=key) as err:
        tiny_train_config(tmp_path, model={"quantizer": {"n_embed": 64, "embed_dim": 16, **options}})
    assert "\n" not in str(err.value) and "model.quantizer." in str(err.value)


@pytest.mark.parametrize("name, kind, lookup", [("small-cpu-ema", EMAVectorQuantizer, 8),
                                                ("small-cpu-factorized", VectorQuantizer, 8),
                                                ("llamagen-vq16", VectorQuantizer, 8)])
def test_presets_load_and_build(name, kind, lookup):
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(name))
    with torch.device("meta"):
        model = VQModel(cfg.model)
    assert type(model.quantize) is kind and model.quantize.trainable_codebook().shape[1] == lookup
    if name == "llamagen-vq16":
        assert cfg.model.quantizer.n_embed == 16384 and cfg.model.quantizer.l2_norm
        assert cfg.model.resolution == 256 and cfg.model.latent_size == 16


# -- training --------------------------------------------------------------------------------------
def photos(folder: Path) -> Path:
    return photo_crops(folder, step=32)


@pytest.mark.slow  # ~1 min each on 2 idle cores; 2-3 min on shared ones
@pytest.mark.parametrize("quantizer", [{"kind": "ema", "n_embed": 128, "embed_dim": 16},
                                       {"kind": "vq", "n_embed": 128, "embed_dim": 16, "codebook_dim": 8,
                                        "l2_norm": True},
                                       {"kind": "vq", "n_embed": 128, "embed_dim": 16, "linear_codebook": True}],
                         ids=["ema", "vq-factorized-l2", "vq-linear-codebook"])
def test_tiny_model_learns_real_images(tmp_path, quantizer):
    """Two dozen steps (no attention, batch 4: well under a minute on 2 cores): held-out PSNR and L1 improve."""
    cfg = tiny_train_config(tmp_path, data={"path": str(photos(tmp_path / "photos")), "holdout": 4,
                                            "crop": "center", "flip": False},
                            model={"attn_resolutions": [], "quantizer": quantizer},
                            loss={"disc_start": 10_000, "disc_train_start": 10_000},
                            train={"steps": 24, "batch_size": 4, "base_learning_rate": 1e-4, "log_every": 4,
                                   "eval_every": 1000, "ckpt_every": 1000,
                                   "codebook": {"restart_every": 8, "restart_after": 8}})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 1.0, (before, after["psnr"])
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    l1 = [r["l1"] for r in rows if r["kind"] == "train"]
    assert np.mean(l1[-2:]) < np.mean(l1[:2])


ENTROPY_TERMS = """
import torch
from vqgan.quantizers.entropy import assignment_entropies, grid_entropies, grid_log_probs
from vqgan.quantizers.decorrelation import channel_correlation
from vqgan.quantizers.lfq import codebook_entropy

CODEBOOK = torch.nn.functional.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), dim=1)

def terms(z):
    \"\"\"The batch terms of rows z (N, 4): explicit codebook, FSQ grid, LFQ bits entropies; channel correlation.\"\"\"
    return [assignment_entropies(z, CODEBOOK, 0.5)[1], grid_entropies(grid_log_probs(z, [3, 4, 2, 5], 0.5),
            [3, 4, 2, 5])[1], codebook_entropy(z), channel_correlation(z)]

def rows(rank):
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(rank)) + rank
"""


def test_codebook_entropies_are_of_the_global_batch_under_ddp(tmp_path):
    """Each rank's codebook entropy (and channel correlation) is that of the union of the ranks' rows; its
    gradient, averaged over ranks as DDP does, is the one-process gradient on the union. A grid quantizer's stuck
    start is centred from rank 0's latents on every rank."""
    (tmp_path / "entropy_terms.py").write_text(ENTROPY_TERMS)
    script = tmp_path / "entropy_ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(tmp_path)!r})
from entropy_terms import rows, terms
dist.init_process_group("gloo")
rank = dist.get_rank()
out = []
for i in range(4):
    z = rows(rank).requires_grad_(True)
    value = terms(z)[i]
    value.backward()
    out.append((value.detach(), z.grad / dist.get_world_size()))  # DDP's average over ranks
torch.save(out, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
# a grid quantizer's stuck start is centred from rank 0's latents (grid_start.py): every rank the same quant_conv
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import grid_start_on
torch.save(grid_start_on(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank)) * 2 - 1),
           {str(tmp_path)!r} + f"/grid{{rank}}.pt")
dist.barrier()
dist.destroy_process_group()
from vqgan.train.common import leave_worker
leave_worker(0)  # the autograd all-reduce's gloo threads can abort interpreter finalization (see leave_worker)
""")
    run_two_processes(script)
    import sys

    sys.path.insert(0, str(tmp_path))
    from entropy_terms import rows, terms

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i in range(4):
        z = torch.cat([rows(0), rows(1)]).requires_grad_(True)
        value = terms(z)[i]
        value.backward()
        for r in range(2):
            torch.testing.assert_close(ranks[r][i][0], value.detach(), msg=f"term {i}, rank {r}")
            torch.testing.assert_close(ranks[r][i][1], z.grad[6 * r:6 * (r + 1)], msg=f"grad {i}, rank {r}")
    alone = grid_start_on(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(10)) * 2 - 1)
    for r in range(2):
        for k, v in torch.load(tmp_path / f"grid{r}.pt").items():
            torch.testing.assert_close(v, alone[k], msg=f"quant_conv {k}, rank {r}")
