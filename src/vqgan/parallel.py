"""Whether this process is one of several torchrun replicas: the one test every collective in the package makes
(a single process, or torch.distributed initialised with one rank, skips them)."""
from __future__ import annotations

import os

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_first_process() -> bool:
    """Rank 0 of a torchrun launch (from its environment, so true before the process group exists), or a
    single process: the one that reports what every replica would say alike."""
    return int(os.environ.get("RANK", "0")) == 0
