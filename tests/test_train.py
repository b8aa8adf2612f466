import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo_crops, run_two_processes, tiny_train_config
from PIL import Image

from vqgan.checkpoint import load_model, load_state_dict_file
from vqgan.errors import UserError
from vqgan.train.stage1 import TokenizerTrainer

ROOT = Path(__file__).resolve().parents[1]


def weights(path):
    return load_state_dict_file(path)


def test_killed_run_resumes_bit_exactly(tmp_path):
    full = TokenizerTrainer(tiny_train_config(tmp_path / "a"), progress=False)
    full.fit()

    cfg = tiny_train_config(tmp_path / "b")
    interrupted = TokenizerTrainer(cfg, progress=False)
    step = interrupted.train_step

    def stop_after_three(batches):
        out = step(batches)
        if interrupted.step == 2:  # the third step: SIGTERM arrives now
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    interrupted.train_step = stop_after_three
    result = interrupted.fit()
    assert result["step"] == 3
    assert not (tmp_path / "b" / "run" / "model").exists()  # unfinished: no final model
    with pytest.raises(UserError, match="--resume"):
        TokenizerTrainer(cfg, progress=False)
    other = tiny_train_config(tmp_path / "b", model={"ch": 64})
    with pytest.raises(UserError, match=r"\(model\.ch: 32 there, 64 here\)"):  # names what differs
        TokenizerTrainer(other, resume=True, progress=False)
    resumed = TokenizerTrainer(cfg, resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()

    for name in ("model.safetensors", "discriminator.safetensors"):
        a = weights(tmp_path / "a" / "run" / "checkpoints" / "step_00000006" / name)
        b = weights(tmp_path / "b" / "run" / "checkpoints" / "step_00000006" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(line) for line in (tmp_path / "a/run/logs/metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b/run/logs/metrics.jsonl").read_text().splitlines()]
    last = lambda rows: [r for r in rows if r["kind"] == "train"][-1]  # noqa: E731
    assert last(log_a)["total"] == last(log_b)["total"]


def test_checkpoint_roundtrip_and_final_model(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 3})
    trainer = TokenizerTrainer(cfg, progress=False)
    trainer.fit()
    run = tmp_path / "run"
    model = load_model(run)  # the run directory resolves to its final model
    same = load_model(run / "checkpoints" / "step_00000003")
    for (k, v), v2 in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(v, v2), k
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.cpu()), k
    assert not list(run.glob("checkpoints/.*tmp*"))  # no half-written directories left behind


def test_a_time_budget_ends_the_run_like_its_last_step(tmp_path):
    """train.max_minutes: the run ends after the step during which the budget runs out, with the final
    evaluation and model; a resumed run gets the budget anew."""
    cfg = tiny_train_config(tmp_path, train={"steps": 1000, "max_minutes": 1e-6})
    result = TokenizerTrainer(cfg, progress=False).fit()
    run = tmp_path / "run"
    assert result["step"] == 1 and "psnr" in result and not result.get("stopped")
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "step_00000001").is_dir()
    assert "time budget of 1e-06 minutes spent at step 1/1000" in (run / "logs" / "train.log").read_text()
    again = TokenizerTrainer(cfg, resume=True, progress=False).fit()
    assert again["step"] == 2
    with pytest.raises(UserError, match=r"train\.max_minutes"):
        tiny_train_config(tmp_path, train={"max_minutes": -1})


def test_corrupt_images_in_training_data_are_skipped_and_counted(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"img_{i:02d}.png")
    (data / "img_00_empty.png").write_bytes(b"")
    good = (data / "img_01.png").read_bytes()
    (data / "img_03_truncated.png").write_bytes(good[:200])
    cfg = tiny_train_config(tmp_path, data={"path": str(data), "holdout": 2}, train={"steps": 4, "batch_size": 2})
    result = TokenizerTrainer(cfg, progress=False).fit()
    assert result["step"] == 4
    assert result["skipped_files"] >= 1  # the empty file, and the truncated one each time it is drawn
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert "1 unreadable files skipped" in log


def test_an_unreadable_held_out_file_is_left_out_and_counted_not_replaced(tmp_path):
    """The held-out set is the last files by name: one that fails to decode must not be stood in for by another
    held-out image (which would then count twice in the held-out PSNR and usage)."""
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"img_{i:02d}.png")
    good = (data / "img_01.png").read_bytes()
    (data / "zz_truncated.png").write_bytes(good[: len(good) // 2])  # a valid header: it fails at decoding
    cfg = tiny_train_config(tmp_path, data={"path": str(data), "holdout": 3}, train={"steps": 2, "batch_size": 2})
    result = TokenizerTrainer(cfg, progress=False).fit()
    assert result["n_images"] == 2 and result["skipped_files"] >= 1
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert "1 held-out file(s) could not be read and are left out: " in log and "zz_truncated.png" in log


def test_no_readable_images_fails_before_training(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="could be read"):
        TokenizerTrainer(tiny_train_config(tmp_path, data={"path": str(data)}), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tiny_model_learns_real_images(tmp_path):
    """120 CPU steps on real photographs: held-out PSNR must rise clearly (measured: 8.0 -> 16.4 dB)."""
    folder = photo_crops(tmp_path / "photos")
    cfg = tiny_train_config(tmp_path, data={"path": str(folder), "holdout": 4, "crop": "center", "flip": False},
                            model={"quantizer": {"n_embed": 128, "embed_dim": 16}},
                            loss={"disc_start": 10_000, "disc_train_start": 10_000},
                            train={"steps": 120, "batch_size": 8, "base_learning_rate": 5e-5, "eval_every": 1000,
                                   "ckpt_every": 1000, "codebook": {"restart_every": 10, "restart_after": 20}})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 5.0, (before, after["psnr"])
    assert after["psnr"] > 15.0
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    l1 = [r["l1"] for r in rows if r["kind"] == "train"]
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:3])


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import run_two_processes, tiny_train_config
from pathlib import Path
from vqgan.train.stage1 import TokenizerTrainer
from vqgan.train.common import cleanup_runtime, leave_worker, setup_runtime
rt = setup_runtime()
cfg = tiny_train_config(Path({str(tmp_path)!r}), train={{"steps": 4, "batch_size": 2}})
trainer = TokenizerTrainer(cfg, runtime=rt, progress=False)
trainer.fit()
for module in (trainer.model, trainer.loss.discriminator):
    flat = torch.cat([t.detach().float().reshape(-1) for t in module.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(rt.world_size)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    assert not torch.equal(flat, torch.zeros_like(flat))
if rt.rank == 0:
    print("REPLICAS_IDENTICAL", trainer.step)
cleanup_runtime(rt)
leave_worker(0)
""")
    assert "REPLICAS_IDENTICAL 4" in run_two_processes(script)


def test_gradient_accumulation_runs_and_logs_once_per_step(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 2, "batch_size": 2, "grad_accum": 2, "log_every": 1})
    trainer = TokenizerTrainer(cfg, progress=False)
    assert trainer.lr == pytest.approx(cfg.train.base_learning_rate * 2 * 2)  # base x batch x accumulation
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]


def test_to_floats_reads_every_logged_value_in_order():
    from vqgan.train.common import to_floats

    logs = {"loss": torch.tensor(1.5), "lr": 2e-4, "usage": torch.tensor([0.25]), "steps": 3,
            "grad_norm": torch.tensor(2.0, dtype=torch.float64)}
    out = to_floats(logs)
    assert list(out) == list(logs)
    assert out == {"loss": 1.5, "lr": 2e-4, "usage": 0.25, "steps": 3.0, "grad_norm": 2.0}
    assert all(isinstance(v, float) for v in out.values())
    assert to_floats({}) == {}
    # a host scalar beside a device's (meta stands in for a GPU here): both reach one device before the read
    mixed = {"a": torch.tensor(1.0, device="meta"), "b": torch.tensor(2.0)}
    with pytest.raises(NotImplementedError, match="meta tensor"):  # no values to read: the stack was built
        to_floats(mixed)
