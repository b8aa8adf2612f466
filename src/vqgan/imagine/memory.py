"""Will it fit? On CUDA, the memory of a run is measured before it starts and checked against what is free.

A step's peak memory is close to linear in the image's pixels (decoder activations) and in the cutout count
(CLIP activations): peak ~ fixed + per_pixel * W * H + per_cutout * cutn. Three one-step trials at small
settings fit the three numbers (`fit`); a request that would not fit is a one-line error that suggests the
largest size (same aspect, multiples of the factor) at the asked cutn and the largest cutn at the asked size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError

# keep this share of the free memory for the allocator's fragmentation and cuDNN workspaces
_HEADROOM = 0.9
# a whole run's peak over the trials' prediction: on an H200 (256 x 256 px, 32 cutouts, 20 steps) the run
# peaked at 2.02 GiB against 1.70 predicted (x1.19), a cause the trials at small sizes do not see; rounded up
RUN_OVER_TRIALS = 1.25


@dataclass(frozen=True)
class MemoryModel:
    fixed: float
    per_pixel: float
    per_cutout: float

    def predict(self, width: int, height: int, cutn: int) -> float:
        """A run's peak bytes: the trials' linear model, times what a whole run was measured to add."""
        return RUN_OVER_TRIALS * (self.fixed + self.per_pixel * width * height + self.per_cutout * cutn)


def fit(measure: Callable[[int, int, int], float], factor: int, cutn: int) -> MemoryModel:
    """Peak bytes of one step, `measure(width, height, cutn)`, at three small settings -> the linear model."""
    side = 4 * factor
    small_cut = max(1, min(cutn, 2))
    base = measure(side, side, small_cut)
    wide = measure(2 * side, side, small_cut)  # doubled pixels
    more = measure(side, side, 2 * small_cut)  # doubled cutouts
    per_pixel = max(0.0, (wide - base) / (side * side))
    per_cutout = max(0.0, (more - base) / small_cut)
    return MemoryModel(max(0.0, base - per_pixel * side * side - per_cutout * small_cut), per_pixel, per_cutout)


def largest_size(model: MemoryModel, width: int, height: int, cutn: int, budget: float, factor: int) -> tuple[int, int] | None:
    """The largest (width, height) with the asked aspect, sides multiples of `factor`, that fits the budget."""
    best = None
    for k in range(1, max(width, height) // factor + 1):
        scale = k * factor / max(width, height)
        w, h = max(factor, int(width * scale) // factor * factor), max(factor, int(height * scale) // factor * factor)
        if model.predict(w, h, cutn) <= budget:
            best = (w, h)
    return best


def largest_cutn(model: MemoryModel, width: int, height: int, budget: float) -> int:
    if model.per_cutout <= 0:
        return 0
    return max(0, int((budget - model.predict(width, height, 0)) // (RUN_OVER_TRIALS * model.per_cutout)))


def check_fits(model: MemoryModel, width: int, height: int, cutn: int, free_bytes: float, factor: int) -> float:
    """The predicted peak; a one-line error with the largest settings that fit when it exceeds the free memory."""
    need, budget = model.predict(width, height, cutn), free_bytes * _HEADROOM
    if need <= budget:
        return need
    gib = 2.0**30
    hints = []
    size = largest_size(model, width, height, cutn, budget, factor)
    if size:
        hints.append(f"--size {size[0]} {size[1]} with --cutn {cutn}")
    n = largest_cutn(model, width, height, budget)
    if n >= 1:
        hints.append(f"--cutn {n} at --size {width} {height}")
    advice = "; the largest that fit: " + " or ".join(hints) if hints else "; even the smallest setting does not fit"
    raise UserError(f"--size {width} {height} with --cutn {cutn} needs about {need / gib:.1f} GiB of GPU memory, "
                    f"{free_bytes / gib:.1f} GiB are free{advice}")


def cuda_measure(step: Callable[[int, int, int], None], device) -> Callable[[int, int, int], float]:
    """`measure` for `fit` on a CUDA device: the peak allocated memory of one call of `step(w, h, cutn)`."""
    import torch

    def measure(width: int, height: int, cutn: int) -> float:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step(width, height, cutn)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))

    return measure
