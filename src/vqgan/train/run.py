"""A training run's folder, shared by both stages: one writer at a time, checkpoints written whole or not at
all (and never with non-finite weights), resume from the newest intact checkpoint.

<run>/.lock                      held (flock) by the process that writes the run; names its pid and host
<run>/checkpoints/step_N/        *.safetensors (weights), *.yaml (configs), training_state.pt (optimiser, RNG)
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml

from ..checkpoint import (
    atomic_directory,
    checkpoint_dirs,
    load_state_dict_file,
    prune_checkpoints,
    safe_torch_load,
    save_tensors,
)
from ..errors import UserError

log = logging.getLogger("vqgan.train")

STATE_FILE = "training_state.pt"
LOCK_FILE = ".lock"
Resume = Literal["never", "required", "auto"]


class CorruptCheckpoint(UserError):
    """A checkpoint folder that cannot be read whole (a file missing, truncated or unparsable)."""


class DiskFull(UserError):
    """A checkpoint did not fit on the disk; the previous one is intact."""


class NonFiniteWeights(UserError):
    """Weights with NaN or infinity, refused before they reach the disk."""


@dataclass
class CheckpointParts:
    """What a checkpoint folder holds: safetensors files (weights), YAML files (configs) and the training
    state (optimiser, scaler, RNG, counters) as one `torch.save` file of tensors and plain values."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    yaml: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """About the size on disk: every tensor's bytes (weights and optimiser moments dominate)."""
        total = sum(t.numel() * t.element_size() for sd in self.tensors.values() for t in sd.values())
        return total + _tensor_bytes(self.state)


def nonfinite_names(sd: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors that hold NaN or infinity."""
    return [name for name, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def require_finite(sd: dict[str, torch.Tensor], what: str) -> None:
    """Never write non-finite weights over good ones: raise `NonFiniteWeights` naming the first few."""
    bad = nonfinite_names(sd)
    if bad:
        raise NonFiniteWeights(f"{what} has non-finite weights ({', '.join(bad[:3])}); nothing was written, the "
                               "last checkpoint is kept. Lower the learning rate and resume from it with --resume")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def read_checkpoint(path: Path, required: tuple[str, ...]) -> CheckpointParts:
    """Read every file of a checkpoint folder; `CorruptCheckpoint` when one is missing or cannot be read."""
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: {', '.join(missing)} missing")
    parts = CheckpointParts()
    try:
        for f in sorted(path.iterdir()):
            if f.suffix == ".safetensors":
                parts.tensors[f.name] = load_state_dict_file(f)
            elif f.suffix == ".yaml":
                data = yaml.safe_load(f.read_text())
                if not isinstance(data, dict):
                    raise UserError(f"{f} does not hold a mapping")
                parts.yaml[f.name] = data
        parts.state = safe_torch_load(path / STATE_FILE) if (path / STATE_FILE).is_file() else {}
    except (UserError, yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read: {first}") from None
    return parts


class RunFolder:
    """The folder of one training run. Rank 0 (`owner`) locks it, cleans what killed runs left, writes
    checkpoints and prunes them; every rank reads the same checkpoint to resume."""

    def __init__(self, root: str | Path, owner: bool = True, keep_last: int = 3):
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.owner = owner
        self.keep_last = keep_last
        self._lock_fd: int | None = None

    # -- one writer --------------------------------------------------------------------------------
    def lock(self) -> None:
        """Refuse a second process writing the same run. The lock is an flock on `<run>/.lock`: the kernel
        drops it when its holder dies, so a killed run never leaves a stale lock behind."""
        if not self.owner or self._lock_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_holder(path)
            raise UserError(f"{self.root} is being written by another training run ({holder}); wait for it to end, "
                            "or set train.out_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._lock_fd = fd

    def __del__(self):
        self.unlock()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_stale_temporaries(self) -> list[Path]:
        """Half-written folders that a killed run left (`.step_*.tmp-*`, `.model.tmp-*`). A `.NAME.old-PID` is
        the previous copy of NAME, moved aside just before the new one was renamed in: when the kill fell
        between the two renames NAME is missing and the old copy is put back, else it is removed. Only the
        lock holder calls this, so no live writer owns them."""
        if not self.owner:
            return []
        stale = []
        for d in (self.root, self.ckpt_dir):
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if not (p.is_dir() and p.name.startswith(".")):
                    continue
                if ".old-" in p.name and not (d / p.name[1:p.name.index(".old-")]).exists():
                    os.replace(p, d / p.name[1:p.name.index(".old-")])
                    log.warning("%s was missing after an interrupted write: its previous copy is back", p.name)
                elif ".tmp-" in p.name or ".old-" in p.name:
                    shutil.rmtree(p, ignore_errors=True)
                    stale.append(p)
        if stale:
            log.info("removed %d half-written folder(s) left by an interrupted run: %s", len(stale),
                     ", ".join(p.name for p in stale))
        return stale

    # -- resume ------------------------------------------------------------------------------------
    def check(self, resume: Resume | bool) -> bool:
        """Before anything is built: whether there is a checkpoint to resume from. `never` refuses a folder
        that holds checkpoints, `required` (--resume) one that holds none; `auto` takes what is there."""
        resume = {True: "required", False: "never"}.get(resume, resume)
        candidates = checkpoint_dirs(self.ckpt_dir)
        if resume == "never" and candidates:
            raise UserError(f"{self.root} already holds checkpoints (latest {candidates[-1].name}); pass --resume "
                            "to continue that run, or set train.out_dir to a new folder")
        if resume == "required" and not candidates:
            where = "the folder does not exist" if not self.root.exists() else "it holds no checkpoints/step_*"
            raise UserError(f"--resume: nothing to resume in {self.root} ({where}); check train.out_dir, or leave "
                            "out --resume to start a new run")
        return bool(candidates) and resume != "never"

    def open(self, resume: bool, load: Callable[[Path], None]) -> Path | None:
        """Lock, clean, and (when `resume`) call `load(path)` on the newest checkpoint; when that raises
        `CorruptCheckpoint`, on the one before, and so on. Returns the checkpoint resumed from, or None."""
        self.lock()
        self.remove_stale_temporaries()
        candidates = checkpoint_dirs(self.ckpt_dir) if resume else []
        problems = []
        for path in reversed(candidates):
            try:
                load(path)
            except CorruptCheckpoint as e:
                problems.append(str(e))
                log.warning("%s; trying the checkpoint before it", e)
                continue
            if problems:
                log.warning("resumed from %s, the newest intact checkpoint; the newer, unreadable one(s) will be "
                            "replaced as training passes them again", path.name)
            return path
        if problems:
            raise UserError(f"no checkpoint in {self.ckpt_dir} can be read ({problems[0]}); remove the folder "
                            "to start afresh, or restore a checkpoint")
        return None

    # -- writing -----------------------------------------------------------------------------------
    def write_checkpoint(self, step: int, parts: CheckpointParts) -> Path:
        """Write `checkpoints/step_N/` atomically and prune old ones. Refuses non-finite weights (the last
        good checkpoint stays) and says plainly when the disk is full."""
        target = self.ckpt_dir / f"step_{step:08d}"
        for name, sd in parts.tensors.items():
            require_finite(sd, f"checkpoint step {step} ({name})")
        need = parts.nbytes()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.ckpt_dir).free
        if free < need * 1.05 + (1 << 20):
            raise self._disk_full(target, need, free)
        try:
            with atomic_directory(target) as tmp:
                for name, sd in parts.tensors.items():
                    save_tensors(sd, tmp / name)
                for name, data in parts.yaml.items():
                    (tmp / name).write_text(yaml.safe_dump(data, sort_keys=False))
                torch.save(parts.state, tmp / STATE_FILE)
        except Exception as e:
            # torch.save reports a full disk as RuntimeError("... unexpected pos ..."), safetensors as its own
            # error type: ask the disk
            free = shutil.disk_usage(self.ckpt_dir).free
            said = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)
            if said or free < need * 1.05:
                raise self._disk_full(target, need, free) from None
            raise
        self.prune()
        return target

    def prune(self) -> None:
        prune_checkpoints(self.ckpt_dir, self.keep_last)

    def _last_good(self) -> str:
        dirs = checkpoint_dirs(self.ckpt_dir)
        return f"the last checkpoint ({dirs[-1]})" if dirs else "no earlier checkpoint"

    def _disk_full(self, target: Path, need: int, free: int) -> UserError:
        return DiskFull(f"disk full: checkpoint {target.name} needs about {_mb(need)} in {self.ckpt_dir}, "
                        f"{_mb(free)} free; {self._last_good()} is intact. Free some space (or lower "
                        "train.keep_last) and run again with --resume")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
