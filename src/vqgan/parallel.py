"""Whether this process is one of several torchrun replicas: the one test every collective in the package makes
(a single process, or torch.distributed initialised with one rank, skips them)."""
from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
