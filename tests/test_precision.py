"""The harness's mixed-precision paths, run on the CPU (autocast works there, slowly) on tiny models: bf16
autocast, and fp16 with gradient scalers, for both stages. No dtype errors, the quantizer's distances in fp32,
finite losses, and a run that resumes. A GPU runs the same code; these keep it from rotting meanwhile."""
import json

import pytest
import torch
from conftest import tiny_train_config
from test_prior import config as prior_config
from test_prior import markov_tokens, write_store

from vqgan.quantizers.vq import nearest_code
from vqgan.train.stage1 import TokenizerTrainer
from vqgan.train.stage2 import PriorTrainer


def train_logs(run):
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tokenizer_trains_and_resumes_in_mixed_precision(tmp_path, precision):
    settings = {"precision": precision, "steps": 2, "ckpt_every": 1, "log_every": 1}
    loss = {"disc_start": 0, "disc_train_start": 0}  # the GAN terms and both scalers take part
    first = TokenizerTrainer(tiny_train_config(tmp_path, train=settings, loss=loss), progress=False)
    assert first.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert first.scaler_ae.is_enabled() == (precision == "fp16")
    first.fit()
    resumed = TokenizerTrainer(tiny_train_config(tmp_path, train={**settings, "steps": 3}, loss=loss), resume=True,
                               progress=False)
    assert resumed.step == 2
    result = resumed.fit()
    assert result["step"] == 3 and result["nonfinite_steps"] == 0
    for row in train_logs(tmp_path / "run"):
        assert all(isinstance(row[k], float) and abs(row[k]) < 1e6 for k in ("total", "rec", "gan", "disc")), row
    weights = resumed.model.state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_prior_trains_and_resumes_in_mixed_precision(tmp_path, precision):
    write_store(tmp_path / "store", markov_tokens(64, 9, 6, 0).reshape(64, 3, 3), [-1] * 64)
    settings = dict(precision=precision, steps=2, batch_size=8, ckpt_every=1, log_every=1, warmup_steps=1)
    PriorTrainer(prior_config(tmp_path, tmp_path / "store", **settings), progress=False).fit()
    resumed = PriorTrainer(prior_config(tmp_path, tmp_path / "store", **{**settings, "steps": 3}), resume=True,
                           progress=False)
    assert resumed.step == 2 and resumed.scaler.is_enabled() == (precision == "fp16")
    result = resumed.fit()
    assert result["nonfinite_steps"] == 0 and 0 < result["nll"] < 10
    assert all(0 < r["loss"] < 10 for r in train_logs(tmp_path / "run"))


def test_code_distances_are_fp32_under_autocast():
    z = torch.randn(64, 16)
    codebook = torch.randn(32, 16)
    exact = torch.cdist(z.double(), codebook.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = nearest_code(z.bfloat16(), codebook)
    # bf16 inputs are rounded, but the distances are taken in fp32: nearly every row agrees with float64
    assert (found == exact).float().mean() > 0.9
