"""What training promises when things go wrong: a reader can scan this file as the list.

- two runs on one folder: the second is refused with a one-line error (a killed holder leaves no stale lock)
- NaN / inf: non-finite steps are skipped and counted; too many in a row stop the run; nothing non-finite
  is ever written over a good checkpoint
- disk full: a one-line error that says so, where, and how much a checkpoint needs; the previous
  checkpoint stays intact and --resume continues once there is room
- a corrupt newest checkpoint: resume falls back to the newest intact one and says so
- half-written folders left by a kill are removed on the next start
- --resume on a folder with nothing to resume is an error, and creates nothing
- SIGTERM: a checkpoint, no final model, exit code 143, and the command to continue
- the torchrun launcher killed: its workers notice, write a checkpoint and stop
- fine-tuning a converted model keeps its discriminator, in the shape its loss.yaml records
- bad settings of either stage: one line, exit code 2, before any work
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config
from test_prior import config as prior_config
from test_prior import markov_tokens, write_store

from vqgan.checkpoint import atomic_file, load_state_dict_file, save_model, save_tensors
from vqgan.cli import main
from vqgan.errors import UserError
from vqgan.losses.discriminator import NLayerDiscriminator
from vqgan.stopping import StopOnSignal
from vqgan.train.guard import Diverged
from vqgan.train.run import CheckpointParts, DiskFull, RunFolder
from vqgan.train.stage1 import TokenizerTrainer
from vqgan.train.stage2 import PriorTrainer

TINY = ["model.quantizer.kind=vq", "model.resolution=32", "model.ch=32", "model.ch_mult=[1,2]",
        "model.attn_resolutions=[]", "model.quantizer.n_embed=32", "model.quantizer.embed_dim=8", "loss.perceptual_weight=0", "loss.disc_start=1",
        "loss.disc_train_start=0", "loss.disc_ndf=8", "data.path=builtin:scenes", "data.builtin_count=24",
        "data.holdout=4", "data.num_workers=0", "train.batch_size=4"]


def vqgan_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqgan.cli", *args]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def train_rows(run: Path) -> list[dict]:
    path = run / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- one writer per run folder ----------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    first = TokenizerTrainer(tiny_train_config(tmp_path), progress=False)  # holds the lock until fit ends
    with pytest.raises(UserError, match=r"being written by another training run \(pid \d+ on "):
        TokenizerTrainer(tiny_train_config(tmp_path), progress=False)
    # the same from another process, as a user would meet it
    out = str(tmp_path / "run")
    assert main(["train-tokenizer", "small-cpu", *TINY, "train.steps=2", f"train.out_dir={out}"]) == 2
    assert f"pid {os.getpid()}" in one_line_error(capsys)
    first.fit()
    # the lock goes with its holder: a finished run leaves none behind
    second = TokenizerTrainer(tiny_train_config(tmp_path, train={"steps": 8}), resume=True, progress=False)
    assert second.step == 6


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vqgan.train.run import RunFolder; "
                               f"f = RunFolder({str(run)!r}); f.lock(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        RunFolder(run).lock()
    holder.kill()
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # its note is still there...
    folder = RunFolder(run)
    folder.lock()  # ...but the kernel dropped its lock
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    folder.unlock()


# -- non-finite steps --------------------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    trainer = TokenizerTrainer(tiny_train_config(tmp_path, train={"steps": 4, "ckpt_every": 100}), progress=False)
    generator_loss = trainer.loss.generator_loss
    seen = {}

    def nan_at_step_two(*args, **kwargs):
        out = generator_loss(*args, **kwargs)
        if trainer.step == 2:
            seen["before"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            out.loss = out.loss * float("nan")
        if trainer.step == 3:  # the skipped step changed nothing
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, seen["before"][k]), k
        return out

    trainer.loss.generator_loss = nan_at_step_two
    result = trainer.fit()
    assert result["nonfinite_steps"] == 1 and result["step"] == 4
    assert [r for r in train_rows(tmp_path / "run") if r["kind"] == "train"][-1]["nonfinite_steps"] == 1
    weights = load_state_dict_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 20, "ckpt_every": 2, "max_nonfinite_steps": 3})
    trainer = TokenizerTrainer(cfg, progress=False)
    generator_loss = trainer.loss.generator_loss

    def nan_from_step_five(*args, **kwargs):
        out = generator_loss(*args, **kwargs)
        if trainer.step >= 5:
            out.loss = out.loss * float("inf")
        return out

    trainer.loss.generator_loss = nan_from_step_five
    with pytest.raises(Diverged, match="3 steps in a row"):
        trainer.fit()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000006"
    assert not (run / "model").exists()
    for f in ("model.safetensors", "discriminator.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_state_dict_file(run / "checkpoints/step_00000006" / f).values())
    TokenizerTrainer(cfg, resume=True, progress=False).folder.unlock()  # the lock went with the error


def test_nonfinite_weights_are_never_written():
    folder_parts = CheckpointParts(tensors={"model.safetensors": {"w": torch.tensor([1.0, float("nan")])}})
    with pytest.raises(UserError, match="non-finite weights"):
        RunFolder("/nonexistent-run").write_checkpoint(1, folder_parts)


@pytest.mark.slow
def test_an_absurd_learning_rate_stops_both_stages_with_one_line(tmp_path):
    run = tmp_path / "tok"
    proc = subprocess.run(vqgan_command("train-tokenizer", "small-cpu", *TINY, "train.steps=60",
                                        "train.base_learning_rate=1e12", "train.max_nonfinite_steps=3",
                                        "train.ckpt_every=2", f"train.out_dir={run}", "--no-progress"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr.splitlines()[-1]
    assert not (run / "model").exists()
    for ckpt in (run / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_state_dict_file(ckpt / "model.safetensors").values())

    write_store(tmp_path / "store", markov_tokens(64, 9, 6, 0).reshape(64, 3, 3), [-1] * 64)
    proc = subprocess.run(vqgan_command("train-transformer", "-", f"data.tokens={tmp_path / 'store'}",
                                        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "train.steps=60",
                                        "train.batch_size=8", "train.learning_rate=1e12", "train.warmup_steps=0",
                                        "train.max_nonfinite_steps=3", f"train.out_dir={tmp_path / 'prior'}",
                                        "--no-progress"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "prior" / "model").exists()


# -- disk full ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root, as in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_says_so_and_resume_continues_after_making_room(small_disk, capsys):
    run = small_disk / "run"
    common = ["train-tokenizer", "small-cpu", *TINY, "train.ckpt_every=3", f"train.out_dir={run}", "--no-progress"]
    assert main([*common, "train.steps=3"]) == 0
    first = load_state_dict_file(run / "checkpoints/step_00000003/model.safetensors")
    capsys.readouterr()
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - 256 * 1024))  # leave 256 KiB: less than a checkpoint
    assert main([*common, "train.steps=6", "--resume"]) == 2
    err = one_line_error(capsys)
    assert "disk full" in err and "MiB" in err and "step_00000003" in err and str(run / "checkpoints") in err
    again = load_state_dict_file(run / "checkpoints/step_00000003/model.safetensors")  # intact
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written folder
    filler.unlink()
    assert main([*common, "train.steps=6", "--resume"]) == 0
    assert (run / "model" / "model.safetensors").is_file()


def test_a_write_that_fails_midway_on_a_full_disk_is_reported_as_such(small_disk, monkeypatch):
    folder = RunFolder(small_disk / "run")
    big = CheckpointParts(tensors={"model.safetensors": {"w": torch.zeros(8 << 20)}}, state={"step": 1})  # 32 MiB
    monkeypatch.setattr(CheckpointParts, "nbytes", lambda self: 0)  # get past the check before writing
    with pytest.raises(DiskFull, match="disk full"):
        folder.write_checkpoint(1, big)
    monkeypatch.undo()
    assert not list((small_disk / "run" / "checkpoints").iterdir())  # the half-written folder is gone
    assert shutil.disk_usage(small_disk).free > 20 << 20


# -- corrupt checkpoints and leftovers ----------------------------------------------------------------


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    cfg = tiny_train_config(tmp_path)  # 6 steps, checkpoints at 3 and 6
    TokenizerTrainer(cfg, progress=False).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    state = ckpts / "step_00000006" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated by a crash
    longer = tiny_train_config(tmp_path, train={"steps": 9})
    resumed = TokenizerTrainer(longer, resume=True, progress=False)
    assert resumed.step == 3 and "step_00000006" in caplog.text and "newest intact" in caplog.text
    resumed.folder.unlock()
    (ckpts / "step_00000006" / "config.yaml").unlink()  # missing its config: the same, no traceback
    (ckpts / "step_00000006" / "training_state.pt").write_bytes((ckpts / "step_00000003/training_state.pt").read_bytes())
    assert TokenizerTrainer(longer, resume=True, progress=False).step == 3


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    cfg = tiny_train_config(tmp_path)
    TokenizerTrainer(cfg, progress=False).fit()
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        TokenizerTrainer(cfg, resume=True, progress=False)


def test_half_written_folders_of_a_killed_run_are_removed_on_start(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 3})
    TokenizerTrainer(cfg, progress=False).fit()
    run = tmp_path / "run"
    leftovers = [run / "checkpoints" / ".step_00000006.tmp-x1y2", run / ".model.tmp-abcd", run / ".model.old-123"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    TokenizerTrainer(tiny_train_config(tmp_path, train={"steps": 4}), resume=True, progress=False).fit()
    assert not any(d.exists() for d in leftovers)


def test_a_kill_between_the_two_renames_of_a_replaced_folder_loses_nothing(tmp_path):
    cfg = tiny_train_config(tmp_path, train={"steps": 3})
    TokenizerTrainer(cfg, progress=False).fit()
    run = tmp_path / "run"
    before = load_state_dict_file(run / "model" / "model.safetensors")
    os.replace(run / "model", run / ".model.old-4242")  # the old copy moved aside, the new one not yet in place
    folder = RunFolder(run)
    folder.lock()
    folder.remove_stale_temporaries()
    after = load_state_dict_file(run / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before) and not (run / ".model.old-4242").exists()


def test_resume_with_nothing_to_resume_is_an_error_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "rnu"
    assert main(["train-tokenizer", "small-cpu", *TINY, f"train.out_dir={typo}", "--resume"]) == 2
    assert "nothing to resume" in one_line_error(capsys)
    assert not typo.exists()
    write_store(tmp_path / "store", markov_tokens(64, 9, 6, 0).reshape(64, 3, 3), [-1] * 64)
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", f"train.out_dir={typo}",
                 "--resume"]) == 2
    assert "nothing to resume" in one_line_error(capsys)
    assert not typo.exists()


# -- stopping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("second_stops_now", [False, True], ids=["training", "imagine"])
def test_a_repeated_signal_stops_at_once_only_where_asked(second_stops_now, caplog):
    """Training keeps writing its checkpoint through a repeated signal (launchers repeat them); `imagine` lets a
    second Ctrl-C stop at once. Either way the first one is logged once and the old handlers come back."""
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING):
        try:
            with StopOnSignal("stopping", logging.getLogger("test"), second_stops_now=second_stops_now) as stop:
                for _ in range(2):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # the handler runs between bytecodes of the main thread
            raised = False
        except KeyboardInterrupt:
            raised = True
    assert raised == second_stops_now and stop.requested and stop.exit_code == 143
    assert caplog.text.count("signal 15: stopping") == 1
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143_without_claiming_a_model(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(vqgan_command("train-tokenizer", "small-cpu", *TINY, "train.steps=100000",
                                          "train.log_every=1", f"train.out_dir={run}", "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(train_rows(run)) >= 2 or proc.poll() is not None, 240, "two training steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "model:" not in out and not (run / "model").exists()
    assert "stopped at step" in err and "--resume" in err
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "training_state.pt").is_file()


@pytest.mark.slow
def test_workers_stop_with_a_checkpoint_when_the_torchrun_launcher_is_killed(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "vqgan.cli", "train-tokenizer", "small-cpu", *TINY, "train.steps=100000",
                                 "train.log_every=1", f"train.out_dir={run}", "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_for(lambda: len(train_rows(run)) >= 2 or launcher.poll() is not None, 300, "two training steps")
        assert launcher.poll() is None
        workers = [p for p in _children(launcher.pid)]
        assert len(workers) == 2
        launcher.kill()  # SIGKILL: the launcher can forward nothing
        launcher.wait()
        wait_for(lambda: not any(_alive(p) for p in workers), 120, "the orphaned workers to stop")
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if _alive(launcher.pid) else None
        for p in _children(launcher.pid):
            os.kill(p, signal.SIGKILL)
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts, "no checkpoint written on the way out"
    step = int(ckpts[-1].name[5:])
    assert step >= 2 and torch.load(ckpts[-1] / "training_state.pt", weights_only=True)["step"] == step


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- fine-tuning a converted model --------------------------------------------------------------------


def test_fine_tuning_a_converted_model_keeps_its_discriminator_shape(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vqgan.train")
    cfg = tiny_train_config(tmp_path, train={"steps": 1})
    from vqgan.tokenizers import VQModel

    converted = tmp_path / "converted"
    save_model(VQModel(cfg.model), converted)
    disc = NLayerDiscriminator(3, ndf=16, n_layers=2, norm="actnorm")
    save_tensors(disc.state_dict(), converted / "discriminator.safetensors")
    (converted / "loss.yaml").write_text(yaml.safe_dump({"disc_layers": 2, "disc_ndf": 16, "disc_norm": "actnorm"}))
    tuned = tiny_train_config(tmp_path, train={"steps": 1, "init_from": str(converted)})  # its loss says ndf 8
    trainer = TokenizerTrainer(tuned, progress=False)
    assert "loss.disc_ndf=16" in caplog.text
    for k, v in disc.state_dict().items():
        assert torch.equal(trainer.loss.discriminator.state_dict()[k], v), k
    trainer.folder.unlock()
    fresh = tiny_train_config(tmp_path / "b", train={"steps": 1, "init_from": str(converted),
                                                     "init_discriminator": False})
    assert TokenizerTrainer(fresh, progress=False).cfg.loss.disc_ndf == 8


# -- bad settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.ckpt_every=0", "train.ckpt_every must be >= 1"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
    ("train.base_learning_rate=-1e-4", "train.base_learning_rate must be > 0"),
    ("train.steps=[1", "not valid YAML"),
    ("data.holdout=-1", "data.holdout must be >= 0"),
])
def test_bad_tokenizer_settings_are_one_line_errors(tmp_path, capsys, override, message):
    assert main(["train-tokenizer", "small-cpu", override, f"train.out_dir={tmp_path / 'r'}"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, message", [
    ("train.ckpt_every=0", "train.ckpt_every must be >= 1"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
    ("train.learning_rate=-3e-4", "train.learning_rate must be > 0"),
    ("train.precision=fp8", "train.precision must be auto, fp32, bf16 or fp16"),
    ("model.n_head=3", "must be a multiple of model.n_head"),
])
def test_bad_prior_settings_are_one_line_errors(tmp_path, capsys, override, message):
    assert main(["train-transformer", "-", "data.tokens=somewhere", override,
                 f"train.out_dir={tmp_path / 'r'}"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_prior_resume_falls_back_and_skips_nonfinite_steps(tmp_path):
    write_store(tmp_path / "store", markov_tokens(96, 9, 6, 1).reshape(96, 3, 3), [-1] * 96)
    settings = dict(steps=6, batch_size=8, ckpt_every=3, warmup_steps=2)
    trainer = PriorTrainer(prior_config(tmp_path, tmp_path / "store", **settings), progress=False)
    loss = trainer.loss
    trainer.loss = lambda batch, train=True: loss(batch, train) * (float("nan") if trainer.step == 4 else 1.0)
    result = trainer.fit()
    assert result["nonfinite_steps"] == 1
    state = tmp_path / "run" / "checkpoints" / "step_00000006" / "training_state.pt"
    state.write_bytes(b"")
    resumed = PriorTrainer(prior_config(tmp_path, tmp_path / "store", **{**settings, "steps": 8}), resume=True,
                           progress=False)
    assert resumed.step == 3 and resumed.nonfinite_steps == 0
    resumed.fit()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_both_stages_run_in_the_one_harness():
    from vqgan.train.loop import TrainingLoop

    assert issubclass(TokenizerTrainer, TrainingLoop) and issubclass(PriorTrainer, TrainingLoop)
    for stage in (TokenizerTrainer, PriorTrainer):  # the loop, checkpoints and resume live once
        assert not {"fit", "save_checkpoint", "_load_checkpoint"} & set(vars(stage)), stage


def test_an_atomic_file_is_whole_or_the_old_one(tmp_path):
    """Every single-file output (reports, token stores' rows, labels and meta, FID statistics, imagine's images)
    goes through `atomic_file`: a write that fails midway leaves the old file and no temporary; the new one
    gets the mode open() gives under the umask, and writers that go by the suffix keep their name."""
    import numpy as np

    target = tmp_path / "sub" / "stats.npz"
    atomic_file(target, lambda tmp: np.savez(tmp, mu=np.arange(3)))
    assert np.load(target)["mu"].tolist() == [0, 1, 2]

    def fails(tmp):
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(target, fails)
    assert np.load(target)["mu"].tolist() == [0, 1, 2] and os.listdir(target.parent) == ["stats.npz"]
    old = os.umask(0o027)
    try:
        atomic_file(tmp_path / "page.html", lambda tmp: tmp.write_text("<p>"))
    finally:
        os.umask(old)
    assert (tmp_path / "page.html").stat().st_mode & 0o777 == 0o640
