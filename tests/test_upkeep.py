"""Codebook upkeep (data init, dead-code restarts, usage) belongs to the quantizer and counts codebook rows."""
import torch
from conftest import tiny_train_config

from vqgan.train.stage1 import TokenizerTrainer

IN_USE = [40, 41, 42, 43]  # the codebook rows a remapped checkpoint's tokens 0..3 stand for


def test_dead_code_restarts_count_codebook_rows_not_remapped_token_ids(tmp_path):
    """taming's `remap` renumbers tokens (token t = codebook row used[t]); upkeep must count rows, else rows in
    use look dead and are overwritten while fine-tuning a remapped checkpoint."""
    quantizer = {"n_embed": 64, "embed_dim": 16, "remap_codes": len(IN_USE), "unknown_index": "extra"}
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer},
                            train={"codebook": {"init_from_data": False, "restart_every": 1, "restart_after": 1}})
    trainer = TokenizerTrainer(cfg, progress=False)
    q = trainer.model.quantize
    with torch.no_grad():
        q.used.copy_(torch.tensor(IN_USE))
        q.embedding.weight.fill_(100.0)  # far from every encoder output ...
        q.embedding.weight[IN_USE] = 0.01 * torch.randn(len(IN_USE), q.embedding.weight.shape[1])  # ... but these
    won = []
    hook = q.register_forward_hook(lambda m, args, out: won.append(q.used[out.indices.clamp_max(len(IN_USE) - 1)]))
    batches = trainer.batches()
    trainer.train_step(next(batches))
    trainer.step = 1
    before = q.embedding.weight.detach().clone()
    won.clear()
    trainer.train_step(next(batches))
    hook.remove()
    rows = sorted(set(won[-1].reshape(-1).tolist()))
    assert rows and set(rows) <= set(IN_USE)
    moved = (q.embedding.weight.detach()[rows] - before[rows]).abs().max()
    assert moved < 1e-3, f"rows in use {rows} were restarted (moved by {float(moved):.3g})"


def test_kmeans_init_finds_separated_clusters_and_beats_random_outputs():
    """kmeans_iters refines the data initialisation: on 8 well-separated clusters of 64 points each, 8 codes move
    to the cluster means, and the quantisation error falls below that of random outputs alone."""
    from vqgan.config import CodebookCareConfig
    from vqgan.quantizers.codebook import CodebookUpkeep, kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 10
    points = (centres[:, None] + 0.1 * torch.randn(8, 64, 4, generator=g)).reshape(-1, 4)
    start = points[::64] + 1.0  # one code per cluster, off its centre
    codes = kmeans(points, start, 5)
    assert torch.allclose(codes, points.reshape(8, 64, 4).mean(1), atol=1e-5)

    def error(iters: int) -> float:
        upkeep = CodebookUpkeep(8, 4, CodebookCareConfig(kmeans_iters=iters), total_steps=10, seed=1)
        book = torch.zeros(8, 4)
        upkeep.initialize(book, points)
        return float(torch.cdist(points, book).min(1).values.square().mean())

    assert error(10) < error(0)


def test_negative_codebook_care_settings_are_one_line_errors():
    import pytest

    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.errors import UserError

    for name in ("kmeans_iters", "restart_every", "restart_after"):
        with pytest.raises(UserError, match=rf"train\.codebook\.{name} must be >= 0"):
            load_config(TokenizerTrainConfig, {"train": {"codebook": {name: -1}}})
