"""Decisions a training loop takes after each step, the same on every rank: was the step finite (else it is
skipped, and too many in a row stop the run), should the run stop now (SIGTERM / SIGINT, or the torchrun
launcher gone), and is its time budget (`train.max_minutes`) spent? Under torchrun the ranks agree through one small all-reduce, so they stop at the same step
and rank 0's checkpoint matches every replica."""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Iterable

import torch
import torch.distributed as dist

from ..errors import UserError
from ..stopping import StopOnSignal
from .common import Runtime

log = logging.getLogger("vqgan.train")


class Diverged(UserError):
    """Too many steps in a row had non-finite losses or gradients."""


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor: every value of every tensor is finite (one fused norm per group, no sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm(tensors) if hasattr(torch, "_foreach_norm") else [t.norm() for t in tensors]
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


class StepGuard:
    """Use as a context manager around the loop; call `after_step(finite)` once per step."""

    def __init__(self, rt: Runtime, max_nonfinite: int, handle_signals: bool = True):
        self.rt = rt
        self.max_nonfinite = max_nonfinite
        # a repeated signal (launchers send them) must not cut the checkpoint being written short
        self.signals = StopOnSignal("writing a checkpoint and stopping", log, second_stops_now=False,
                                    enabled=handle_signals)
        self.launcher_gone = False
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self._parent = os.getppid()
        self._agreed_stop = False
        self._deadline: float | None = None
        self.time_up = False  # the time budget is spent (agreed across ranks): finish normally after this step

    def set_time_budget(self, seconds: float) -> None:
        """Training time from now (0: none); the loop ends after the step during which it runs out."""
        self._deadline = time.monotonic() + seconds if seconds > 0 else None

    # -- stop requests -----------------------------------------------------------------------------
    @property
    def signal(self) -> int | None:
        """The signal that asked to stop (None: none)."""
        return self.signals.signal

    def __enter__(self) -> "StepGuard":
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    def _local_stop(self) -> bool:
        # a torchrun worker whose launcher died is re-parented: stop with a checkpoint, not run on unsupervised
        if self.rt.distributed and not self.launcher_gone and os.getppid() != self._parent:
            self.launcher_gone = True
            log.warning("the torchrun launcher (pid %d) is gone: writing a checkpoint and stopping", self._parent)
        return self.signal is not None or self.launcher_gone

    @property
    def stop_requested(self) -> bool:
        """Stop before the next step: as soon as asked in a single process; under torchrun once every rank
        has heard of it (at the end of a step), so that all stop at the same one."""
        return self._agreed_stop or (not self.rt.distributed and self._local_stop())

    @property
    def exit_code(self) -> int:
        """What the command exits with after a requested stop: 128 + the signal, as a shell reports it."""
        return 128 + (self.signal or signal.SIGTERM)

    # -- once per step -----------------------------------------------------------------------------
    def after_step(self, step: int, finite: torch.Tensor | bool) -> bool:
        """Agree on this step across ranks. Returns whether the step was finite (apply it) or not (skip it);
        sets `stop_requested`; raises `Diverged` after `max_nonfinite` non-finite steps in a row."""
        late = self._deadline is not None and time.monotonic() > self._deadline
        flags = torch.tensor([0.0 if bool(finite) else 1.0, 1.0 if self._local_stop() else 0.0, float(late)])
        if self.rt.distributed:
            flags = flags.to(self.rt.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        bad, stop = bool(flags[0]), bool(flags[1])
        self._agreed_stop = self._agreed_stop or stop
        self.time_up = self.time_up or bool(flags[2])
        if not bad:
            self.nonfinite_in_row = 0
            return True
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", step, self.nonfinite_in_row)
        if self.max_nonfinite and self.nonfinite_in_row >= self.max_nonfinite:
            raise Diverged(f"training diverged: {self.nonfinite_in_row} steps in a row (to step {step}) had "
                           "non-finite losses or gradients; the last checkpoint was kept. Lower the learning rate "
                           "(or raise train.max_nonfinite_steps) and start again or --resume")
        return False
