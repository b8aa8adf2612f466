"""Checks of command-line values that every command shares: devices, counts, output folders.

Each raises `UserError` with one line that names the option and a valid value, before any work starts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """`None` picks cuda when there is one, else cpu; a name is checked against what this machine has."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        hint = " (PyTorch calls a GPU 'cuda')" if name.lower().startswith("gpu") else ""
        raise UserError(f"{option} {name!r} is not a device{hint}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: this machine has no CUDA GPU that PyTorch can use; use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"{option} {name}: MPS is not available here; use {option} cpu")
    return device


def at_least(value: int, minimum: int, option: str) -> int:
    if value < minimum:
        raise UserError(f"{option} {value}: must be at least {minimum}")
    return value


def output_dir(path: str | Path, option: str = "output directory") -> Path:
    """An output folder that may exist (its files are added to) but must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {p} is an existing file, not a folder; give a folder path")
    return p


def sampling_options(args) -> dict:
    """The sampling options of `sample`, `complete` and `eval-samples` (argparse values), checked before any work."""
    at_least(args.n, 1, "--n")
    if not args.temperature > 0:
        raise UserError(f"--temperature {args.temperature}: must be > 0 (lower is closer to always taking the most "
                        "likely token)")
    at_least(args.top_k, 0, "--top-k")
    if not 0.0 <= args.top_p <= 1.0:
        raise UserError(f"--top-p {args.top_p}: must be between 0 and 1 (0: off)")
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p or None,
                guidance_scale=args.guidance)
