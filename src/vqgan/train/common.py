"""What every training loop shares: devices and torchrun, precision, seeding, samplers, logs, RNG state."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import UserError

log = logging.getLogger("vqgan")


# --------------------------------------------------------------------------------------------
# devices and processes


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine: they share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime() -> Runtime:
    """Single process, or one process per device under torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return Runtime(device, dist.get_rank(), dist.get_world_size(), local,
                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def cleanup_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_worker(code: int) -> NoReturn:
    """End a torchrun worker process without Python's interpreter finalization.

    Once DistributedDataParallel has been built, PyTorch keeps the gloo process group and its worker threads
    alive past `destroy_process_group`. A worker thread that drops a finished collective while the interpreter
    finalizes must take the GIL to release the tensors' Python objects, and that aborts the process
    ("terminate called without an active exception") after all the work is done. Everything has been written
    by now, so flush and exit directly."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16/fp16 are slow there without hardware support); bf16 on GPU by default."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type != "cuda" and dtype != torch.float32:
        log.warning("precision %s on CPU is far slower than fp32 on most CPUs", precision)
    return dtype


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests trace with "aot_eager" (no code generation)


def _compile_warning(device: torch.device) -> None:
    if device.type != "cuda":
        log.warning("train.compile on %s: the first steps compile for minutes; it is meant for GPUs", device.type)


def compile_in_place(modules: list[torch.nn.Module], device: torch.device) -> None:
    """torch.compile each module in place (`Module.compile`: parameters and state_dict keys stay as they are,
    so checkpoints and DDP do not change; every caller of the module runs the compiled forward)."""
    _compile_warning(device)
    for module in modules:
        module.compile(backend=COMPILE_BACKEND)


def compiled(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A compiled wrapper sharing `module`'s parameters; callers of `module` itself keep the eager forward."""
    _compile_warning(device)
    return torch.compile(module, backend=COMPILE_BACKEND)


def loader_workers(setting: int | None, local_ranks: int) -> int:
    """`data.num_workers`, or when None one loader process per CPU core this process may use, the cores shared
    among the ranks on this machine, at most 8 (past that, start-up and memory grow faster than throughput)."""
    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, local_ranks)))


def to_floats(values: dict[str, Any]) -> dict[str, float]:
    """A step's logged scalars as floats, the tensors among them read in one device-to-host copy: on a GPU each
    `float(tensor)` is a copy and a wait of its own (the tokenizer's step logged ~14). A scalar left on the host
    (a constant a loss returns) joins the others on their device."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        device = next((v.device for v in tensors.values() if v.device.type != "cpu"), torch.device("cpu"))
        read = torch.stack([v.detach().float().reshape(()).to(device) for v in tensors.values()]).tolist()
        out.update(zip(tensors, read))
    return {k: out[k] for k in values}


def fused_optimizer(kind: type[torch.optim.Optimizer], params, **options) -> torch.optim.Optimizer:
    """`kind` (Adam, AdamW) with its fused kernel where this torch has one for these parameters' device: several
    times faster on CPU, and on a GPU one launch for all parameters instead of several per tensor group."""
    params = list(params)
    try:
        return kind(params, fused=True, **options)
    except (RuntimeError, TypeError):
        return kind(params, **options)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG in plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_grads(module: torch.nn.Module, world_size: int) -> None:
    """Average gradients across ranks in one flat buffer (for modules not wrapped in DDP)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if world_size <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Keep running statistics (BatchNorm) identical on every rank."""
    if world_size <= 1:
        return
    for b in module.buffers():
        if b.dtype.is_floating_point:
            dist.all_reduce(b)
            b /= world_size


# --------------------------------------------------------------------------------------------
# data order


class ResumableSampler(Sampler[int]):
    """Shuffled, sharded indices whose order depends only on (seed, epoch): a resumed run continues the
    exact sequence. Drops the tail so every rank gets the same number of samples."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.skip_batches = 0
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"{n} training images are fewer than one batch ({batch_size} x {world_size} "
                            "processes); lower train.batch_size or add images")

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.skip_batches = epoch, batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return iter(mine[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Endless batches of `(epoch, index)` keys, `sampler`'s epochs one after another from (epoch, batch).

    One DataLoader then serves a whole run and its worker processes live as long: a loader per epoch restarts
    them (~130 ms each time on 2 cores, 15% of a 30-batch epoch; more where a GPU's steps are short).
    The key's epoch tells the data set which epoch's augmentation an item gets."""

    def __init__(self, sampler: ResumableSampler, epoch: int, batch: int):
        self.sampler, self.start = sampler, (epoch, batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        (epoch, batch), size = self.start, self.sampler.batch_size
        while True:
            self.sampler.set_position(epoch, batch)
            keys = list(self.sampler)  # whole batches: the sampler drops the tail
            for b in range(0, len(keys), size):
                yield [(epoch, i) for i in keys[b:b + size]]
            epoch, batch = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# logs


class MetricsLog:
    """JSONL (machine) + plain text (person) + TensorBoard when installed. Only rank 0 writes."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.enabled = enabled
        self.directory = directory
        self.tb = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(directory / "metrics.jsonl", "a", buffering=1)
        self.text = open(directory / "train.log", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.tb = SummaryWriter(str(directory / "tensorboard"))
        except Exception:
            self.tb = None

    def write(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3),
               **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.note(f"[{kind}] step {step}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                                                         if k not in ("kind", "step", "time")))
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def note(self, message: str) -> None:
        if self.enabled:
            self.text.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.text.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
