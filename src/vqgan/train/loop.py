"""The training harness both stages share: run folder and resume policy, the step loop with its cadence of
logs, evaluations and checkpoints, the progress bar, stop requests and non-finite steps, the final model.

A stage subclasses `TrainingLoop` and keeps only what is its own: building its model and data, one
optimisation step, its evaluation, what its checkpoint holds beyond the shared state, and its final model.

    class MyTrainer(TrainingLoop):
        name = "train-mine"
        required_files = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE)
        def batches(self): ...                      # endless, positioned from self.step
        def train_step(self, batch) -> dict: ...    # calls self.guard.after_step(step, finite) before stepping
        def periodic_evaluation(self): ...          # every train.eval_every steps (rank 0 logs)
        def checkpoint_parts(self) -> CheckpointParts: ...
        def load_parts(self, path, parts): ...      # raise UserError when the checkpoint does not fit the config
        def finish(self) -> dict: ...               # after the last step: final evaluation, model/
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..checkpoint import write_yaml
from .common import MetricsLog, Runtime, rng_state, seed_everything, set_rng_state, setup_runtime
from .guard import StepGuard
from .run import STATE_FILE, CheckpointParts, Resume, RunFolder, read_checkpoint

log = logging.getLogger("vqgan.train")


class TrainingLoop:
    name = "train"
    required_files: tuple[str, ...] = (STATE_FILE,)

    # -- set-up (call `start_run` first in the stage's __init__, `open_run` once everything is built) -------
    def start_run(self, cfg: Any, resume: Resume | bool, runtime: Runtime | None, progress: bool) -> bool:
        """Validate, join the processes, check the run folder against `resume` (before anything is built:
        a wrong --resume fails fast and creates nothing) and seed every RNG. Returns whether to resume."""
        cfg.validate()
        self.cfg = cfg
        self.rt = runtime or setup_runtime()
        self.run_dir = Path(cfg.train.out_dir)
        self.folder = RunFolder(self.run_dir, owner=self.rt.is_main, keep_last=cfg.train.keep_last)
        self.progress = progress and self.rt.is_main
        self.step = 0
        self.nonfinite_steps = 0
        resuming = self.folder.check(resume)
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        return resuming

    def open_run(self, resuming: bool) -> Path | None:
        """Lock the folder, remove what a killed run left, load the newest intact checkpoint; then the step
        guard and the logs. Returns the checkpoint resumed from."""
        self.resume_from = self.folder.open(resuming, self._load_checkpoint)
        self.guard = StepGuard(self.rt, self.cfg.train.max_nonfinite_steps)
        self.metrics = MetricsLog(self.run_dir / "logs", enabled=self.rt.is_main)
        return self.resume_from

    # -- what a stage provides -------------------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def periodic_evaluation(self) -> None:
        raise NotImplementedError

    def checkpoint_parts(self) -> CheckpointParts:
        raise NotImplementedError

    def load_parts(self, path: Path, parts: CheckpointParts) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    def begin(self) -> None:
        """Before the first step (e.g. a codebook initialised from data); the run folder is locked."""

    def rates(self, steps_per_s: float) -> dict[str, float]:
        """Throughput figures for the log, from steps per second."""
        return {"it_per_s": steps_per_s}

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after each logged step."""
        return {"loss": f"{logs.get('loss', logs.get('total', float('nan'))):.3f}"}

    # -- checkpoints -----------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, Any]:
        """The part of every checkpoint's training state that the harness owns."""
        return {"step": self.step, "rng": rng_state(), "world_size": self.rt.world_size,
                "nonfinite_steps": self.nonfinite_steps}

    def save_checkpoint(self) -> Path | None:
        if not self.rt.is_main:
            return None
        parts = self.checkpoint_parts()
        parts.state = {**parts.state, **self.shared_state()}
        target = self.folder.write_checkpoint(self.step, parts)
        self.metrics.note(f"checkpoint written: {target}")
        return target

    def _load_checkpoint(self, path: Path) -> None:
        parts = read_checkpoint(path, self.required_files)
        self.load_parts(path, parts)
        state = parts.state
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if int(state.get("world_size", 1)) == self.rt.world_size:
            set_rng_state(state["rng"])
        else:  # the data order changes with the process count, so the RNG streams cannot be continued either
            log.warning("resuming with %d processes instead of %d: the data order changes", self.rt.world_size,
                        state.get("world_size", 1))
        log.info("resumed from %s (step %d)", path, self.step)

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc=self.name)
        try:
            if self.rt.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_yaml(asdict(self.cfg), self.run_dir / "config.yaml")
            self.begin()
            batches = self.batches()
            t0, steps_timed = time.perf_counter(), 0
            self.guard.set_time_budget(60.0 * t.max_minutes)
            with self.guard:
                while self.step < t.steps and not self.guard.stop_requested and not self.guard.time_up:
                    logs = self.train_step(next(batches))
                    self.step += 1
                    steps_timed += 1
                    bar.update(1)
                    last = self.step == t.steps or self.guard.time_up
                    if self.step % t.log_every == 0 or last:
                        rate = steps_timed / (time.perf_counter() - t0)
                        t0, steps_timed = time.perf_counter(), 0
                        logs.update(self.rates(rate), nonfinite_steps=self.nonfinite_steps)
                        self.metrics.write(self.step, logs)
                        bar.set_postfix(self.postfix(logs), refresh=False)
                    if self.step % t.eval_every == 0 and not last:
                        self.periodic_evaluation()
                    if self.step % t.ckpt_every == 0 and not last:
                        self.save_checkpoint()
            checkpoint = self.save_checkpoint()
            bar.close()
            if self.guard.time_up and self.step < t.steps:
                self.metrics.note(f"time budget of {t.max_minutes} minutes spent at step {self.step}/{t.steps}")
            if self.guard.stop_requested and self.step < t.steps:  # a checkpoint to resume from, no final model
                self.metrics.note(f"stopped at step {self.step}: checkpoint {checkpoint}")
                return {"step": self.step, "stopped": True, "exit_code": self.guard.exit_code,
                        "checkpoint": str(checkpoint) if checkpoint else None, "out": str(self.run_dir)}
            return {**self.finish(), "step": self.step, "nonfinite_steps": self.nonfinite_steps}
        finally:
            bar.close()
            self.metrics.close()
            self.folder.unlock()
