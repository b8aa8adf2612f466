"""Several codes per position (a residual quantizer's depths) through the code contract: the code spec in token
stores and priors, each depth's own id range, and the sampling loop (cache, sliding window) over them."""
import math

import numpy as np
import torch

from vqgan.codes import CodeSpec
from vqgan.config import load_config
from vqgan.data.tokens import TokenStore, write_store
from vqgan.priors import GPT, GPTConfig
from vqgan.priors.layout import TokenLayout
from vqgan.priors.sampling import sample_grid
from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

SPEC = CodeSpec.single(4, (4, 3))  # two codes per position: 4 coarse codes, 3 fine ones


def two_depth_rows(n: int, grid=(3, 3), seed: int = 0) -> np.ndarray:
    """Coarse code uniform over 4; the fine code is the coarse one mod 3 (no information of its own)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, (n, *grid))
    return np.stack([coarse, coarse % 3], -1).reshape(n, -1)


def store_of(path, rows: np.ndarray, grid=(3, 3)) -> TokenStore:
    meta = {"tokenizer": {"path": "synthetic", "fingerprint": "none"}, "codes": SPEC.to_dict(),
            "grids": [list(grid)], "row_length": rows.shape[1], "dtype": SPEC.dtype, "class_names": [],
            "condition": None, "files": []}
    write_store(path, rows, meta)
    return TokenStore(path)


def test_code_spec_rows_and_slots():
    codes = torch.tensor(two_depth_rows(2)).reshape(2, 3, 3, 2)
    assert torch.equal(SPEC.unflatten(SPEC.flatten(codes), [(3, 3)])[0], codes)
    assert SPEC.row_length(12, 12) == 18 and SPEC.bits_per_image(12, 12) == 9 * (2 + math.log2(3))
    layout = TokenLayout.for_codes(SPEC)
    assert layout.n_embed == 7 and layout.start_token == 7  # ids 0-3 coarse, 4-6 fine, then the start token
    ids = layout.codes_to_tokens(SPEC.flatten(codes))
    assert ids[:, 0::2].max() < 4 and ids[:, 1::2].min() >= 4
    assert torch.equal(layout.tokens_to_codes(ids), SPEC.flatten(codes))
    assert TokenLayout.from_dict(layout.to_dict()) == layout


def test_store_records_the_spec(tmp_path):
    store = store_of(tmp_path / "s", two_depth_rows(5))
    assert store.spec == SPEC and store.grids == [(3, 3)] and store.row_length == 18
    assert store.rows_to_codes(store[0]["tokens"][None]).shape == (1, 3, 3, 2)


def test_cached_sampling_equals_uncached_and_stays_in_each_depths_range():
    torch.manual_seed(0)
    layout = TokenLayout.for_codes(SPEC)
    gpt = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=18, n_layer=2, n_head=2, n_embd=32)).eval()
    a = sample_grid(gpt, layout, (3, 3), 4, generator=torch.Generator().manual_seed(1), use_cache=True)
    b = sample_grid(gpt, layout, (3, 3), 4, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert a.shape == (4, 3, 3, 2) and torch.equal(a, b)
    assert a[..., 0].max() < 4 and a[..., 1].max() < 3 and a.min() >= 0
    # completion keeps whole positions; a sliding window as large as the grid is the plain sampler
    known = a.clone()
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[2] = False
    c = sample_grid(gpt, layout, (3, 3), 4, known=known, keep=keep, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c[:, :2], a[:, :2])
    big = sample_grid(gpt, layout, (3, 5), 2, window=(3, 3), generator=torch.Generator().manual_seed(3))
    assert big.shape == (2, 3, 5, 2) and big[..., 1].max() < 3


def test_prior_learns_a_two_depth_distribution_to_its_entropy(tmp_path):
    store_of(tmp_path / "store", two_depth_rows(384))
    cfg = load_config(TransformerTrainConfig, {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64},
        "data": {"tokens": str(tmp_path / "store"), "holdout": 32},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 120, "batch_size": 32, "learning_rate": 3e-3,
                  "warmup_steps": 10, "log_every": 50, "eval_every": 1000, "ckpt_every": 1000}})
    trainer = PriorTrainer(cfg, progress=False)
    assert trainer.layout.codes == SPEC and trainer.gpt_config.block_size == 1 + 18 - 1
    result = trainer.fit()
    floor = math.log(4) / 2  # per token: the coarse code carries log 4 nats, the fine one none
    assert result["nll"] < floor + 0.1, (result["nll"], floor)
    codes = trainer.sample(32, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (32, 3, 3, 2)
    assert (codes[..., 1] == codes[..., 0] % 3).float().mean() > 0.95
