"""Stage 2 on synthetic token data: the prior learns a known distribution and honours its condition."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from vqgan.config import load_config
from vqgan.data.tokens import COND_BIN, LABELS_FILE, META_FILE, TOKENS_BIN, TokenStore
from vqgan.priors import TokenLayout, sample_images_tokens
from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig


def write_store(path, tokens, labels, class_names=(), cond=None):
    path.mkdir(parents=True)
    n, h, w = tokens.shape
    for name, array in ((TOKENS_BIN, tokens), (COND_BIN, cond)):
        if array is not None:
            mm = np.memmap(path / name, dtype="uint16", mode="w+", shape=array.shape)
            mm[:] = array
            mm.flush()
    np.save(path / LABELS_FILE, np.asarray(labels, dtype=np.int64))
    meta = {"tokenizer": {"path": "synthetic", "fingerprint": "none", "n_embed": int(tokens.max()) + 1},
            "grid": [h, w], "dtype": "uint16", "count": n, "class_names": list(class_names), "done": n,
            "complete": True}
    if cond is not None:
        meta["condition"] = {"kind": "segmentation", "grid": list(cond.shape[1:]), "dtype": "uint16",
                             "tokenizer": {"path": "synthetic-cond", "fingerprint": "none",
                                           "n_embed": int(cond.max()) + 1}}
    (path / META_FILE).write_text(json.dumps(meta))
    return TokenStore(path)


def markov_tokens(n, length, k, seed):
    """A 2-state-memory chain: next = (prev + step) % k, step 1 w.p. 0.7 else 2. Entropy rate H(0.7)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, k, n)
    for t in range(1, length):
        out[:, t] = (out[:, t - 1] + np.where(rng.random(n) < 0.7, 1, 2)) % k
    return out


def config(tmp_path, store, **train):
    return load_config(TransformerTrainConfig, {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64},
        "data": {"tokens": str(store), "holdout": 32},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 150, "batch_size": 32, "learning_rate": 3e-3,
                  "warmup_steps": 10, "log_every": 50, "eval_every": 1000, "ckpt_every": 1000, "label_dropout": 0.0,
                  **train}})


@pytest.mark.slow
def test_prior_learns_a_markov_chain_to_its_entropy_rate(tmp_path):
    tokens = markov_tokens(512, 16, 8, 0).reshape(512, 4, 4)
    write_store(tmp_path / "store", tokens, [-1] * 512)
    trainer = PriorTrainer(config(tmp_path, tmp_path / "store"), progress=False)
    before = trainer.evaluate()
    result = trainer.fit()
    entropy_rate = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))  # 0.611 nats
    first = math.log(8)  # the first token is uniform
    floor = (first + 15 * entropy_rate) / 16
    assert before > 2.0 and result["nll"] < floor + 0.08, (before, result["nll"], floor)


def test_class_conditional_samples_follow_the_asked_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    # class 0 uses tokens 0-3, class 1 tokens 4-7
    tokens = (rng.integers(0, 4, (256, 3, 3)) + 4 * labels[:, None, None]).astype(np.int64)
    write_store(tmp_path / "store", tokens, labels, ["low", "high"])
    trainer = PriorTrainer(config(tmp_path, tmp_path / "store", steps=120, label_dropout=0.1), progress=False)
    trainer.fit()
    g = torch.Generator().manual_seed(0)
    for cls in (0, 1):
        grid = trainer.sample(16, torch.full((16,), cls), generator=g, guidance_scale=2.0)
        inside = ((grid >= 4 * cls) & (grid < 4 * cls + 4)).float().mean()
        assert inside > 0.95, (cls, inside)
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file() and "class_names" in (model_dir / "config.yaml").read_text()


def test_spatial_prior_follows_its_condition_map(tmp_path):
    rng = np.random.default_rng(0)
    cond = rng.integers(0, 4, (384, 3, 3))
    tokens = 2 * cond + rng.integers(0, 2, cond.shape)  # each condition token allows two image tokens
    write_store(tmp_path / "store", tokens, [-1] * 384, cond=cond)
    trainer = PriorTrainer(config(tmp_path, tmp_path / "store", steps=150), progress=False)
    assert trainer.layout.spatial and trainer.gpt_config.block_size == 9 + 9 - 1
    trainer.fit()
    test_cond = torch.from_numpy(rng.integers(0, 4, (16, 3, 3)))
    grid = trainer.sample(16, cond=test_cond, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (16, 3, 3, 1) and (grid[..., 0] // 2 == test_cond).float().mean() > 0.95
    conditioning = (tmp_path / "run" / "model" / "config.yaml").read_text()
    assert "cond_n_embed: 4" in conditioning and "cond_len: 9" in conditioning


def test_prior_training_resumes_exactly(tmp_path):
    tokens = markov_tokens(96, 9, 6, 1).reshape(96, 3, 3)
    write_store(tmp_path / "store", tokens, [-1] * 96)
    settings = dict(steps=6, batch_size=8, ckpt_every=3, warmup_steps=2)
    straight = PriorTrainer(config(tmp_path / "a", tmp_path / "store", **settings), progress=False)
    straight.fit()
    first = PriorTrainer(config(tmp_path / "b", tmp_path / "store", **settings), progress=False)
    loss = first.loss

    def sigterm_during_step_three(batch, train=True):
        if train and first.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the run writes a checkpoint after this step and stops
        return loss(batch, train)

    first.loss = sigterm_during_step_three
    assert first.fit()["stopped"] and first.step == 3
    assert not (tmp_path / "b" / "run" / "model").exists()
    resumed = PriorTrainer(config(tmp_path / "b", tmp_path / "store", **settings), resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_guided_completion_cached_sampling_equals_uncached():
    from vqgan.priors import GPT, GPTConfig

    layout = TokenLayout(n_embed=10, n_classes=3)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=12, n_layer=2, n_head=2, n_embd=32)).eval()
    labels = torch.tensor([0, 2, -1])
    known = torch.randint(0, 10, (3, 10))
    keep = torch.zeros(10, dtype=torch.bool)
    keep[:2] = True  # the first two tokens given (a prefix) ...
    keep[6:8] = True  # ... and two more after the region to fill
    kw = dict(guidance_scale=3.0, top_k=5, labels=labels, known=known, keep=keep)
    a = sample_images_tokens(gpt, layout, 10, 3, generator=torch.Generator().manual_seed(1), use_cache=True, **kw)
    b = sample_images_tokens(gpt, layout, 10, 3, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (3, 10)
    assert torch.equal(a[:, keep], known[:, keep]) and not torch.equal(a, known)
    assert layout.condition_tokens(labels, 3, torch.device("cpu")).tolist() == [[11], [13], [14]]


def test_end_to_end_tokenize_train_sample_commands(tmp_path):
    from conftest import tiny_model_config

    from vqgan.cli import main
    from vqgan.tokenizers import VQModel

    VQModel(tiny_model_config()).save_pretrained(tmp_path / "tok")
    assert main(["tokenize", str(tmp_path / "tok"), "builtin:scenes", str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", "model.n_layer=1", "model.n_embd=32",
                 "model.n_head=2", "train.steps=3", "train.batch_size=8", f"train.out_dir={tmp_path / 'prior'}",
                 "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "out"), "--n", "2"]) == 0
    assert (tmp_path / "out" / "sample_001.png").is_file()


@pytest.mark.slow
def test_two_process_prior_training_keeps_replicas_identical(tmp_path):
    from pathlib import Path

    from conftest import run_two_processes

    tests = Path(__file__).resolve().parent
    write_store(tmp_path / "store", markov_tokens(64, 9, 6, 2).reshape(64, 3, 3), [0, 1] * 32, ["a", "b"])
    script = tmp_path / "ddp_prior.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, {str(tests)!r})
from test_prior import config
from vqgan.train.stage2 import PriorTrainer
from vqgan.train.common import cleanup_runtime, leave_worker, setup_runtime
rt = setup_runtime()
trainer = PriorTrainer(config(Path({str(tmp_path)!r}), Path({str(tmp_path / 'store')!r}), steps=4, batch_size=4),
                       runtime=rt, progress=False)
trainer.fit()
flat = torch.cat([t.detach().reshape(-1) for t in trainer.model.state_dict().values()])
gathered = [torch.zeros_like(flat) for _ in range(rt.world_size)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
if rt.rank == 0:
    print("REPLICAS_IDENTICAL", trainer.step)
cleanup_runtime(rt)
leave_worker(0)
""")
    assert "REPLICAS_IDENTICAL 4" in run_two_processes(script)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_transformer_command_under_torchrun(tmp_path):
    """The user's path: `torchrun -m vqgan.cli train-transformer`, every worker exiting 0."""
    from conftest import run_two_processes

    write_store(tmp_path / "store", markov_tokens(64, 9, 6, 2).reshape(64, 3, 3), [0, 1] * 32, ["a", "b"])
    out = run_two_processes("-m", "vqgan.cli", "train-transformer", "-", f"data.tokens={tmp_path / 'store'}",
                            "data.holdout=16", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                            "train.steps=3", "train.batch_size=8", f"train.out_dir={tmp_path / 'run'}", "--no-progress")
    assert out.count("held-out NLL") == 1  # rank 0 reports
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
