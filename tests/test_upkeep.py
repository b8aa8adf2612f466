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
