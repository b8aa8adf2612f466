"""The pretrained networks an evaluation measures with (LPIPS's VGG16, FID's Inception), from real weight files
only. A network whose weights are absent is not used: its metric is "not computed: <why>", never a number from
random weights. An explicitly named file that does not exist is an error. Each record names the files and
their sha256, so a summary says which weights made its numbers."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import file_sha256
from ..errors import UserError

NOT_COMPUTED = "not computed"


def file_record(path: Path) -> dict[str, str]:
    return {"file": path.name, "path": str(path.resolve()), "sha256": file_sha256(path)}


def _explicit(path: str | None, option: str) -> Path | None:
    if not path:
        return None
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UserError(f"{option} {path}: no such file")
    return p


def load_lpips_or_reason(vgg_weights: str | None, heads: str | None, device: torch.device
                         ) -> tuple[torch.nn.Module | None, dict | str]:
    """(LPIPS v0.1 on VGG16 with real weights, its files' records), or (None, "not computed: <why>")."""
    from ..losses.lpips import VGG16_FILE, build_lpips, default_heads_path, default_vgg16_path

    vgg = _explicit(vgg_weights, "--vgg-weights") or default_vgg16_path()
    head_file = _explicit(heads, "--lpips-heads") or default_heads_path()
    if not vgg.is_file():
        return None, (f"{NOT_COMPUTED}: no VGG16 ImageNet weights ({VGG16_FILE} in {vgg.parent}, or pass "
                      "--vgg-weights PATH)")
    if head_file is None or not head_file.is_file():
        return None, f"{NOT_COMPUTED}: no LPIPS v0.1 heads (pip install lpips, or pass --lpips-heads PATH)"
    net = build_lpips(str(vgg), str(head_file)).to(device)
    return net, {"version": "LPIPS v0.1, VGG16", "vgg16": file_record(vgg), "heads": file_record(head_file)}


def load_inception_or_reason(path: str | None, device: torch.device, needed_by: list[str]
                             ) -> tuple[torch.nn.Module | None, dict | str]:
    """(the FID Inception network, its file's record), or (None, "not computed: <why>"). Options that cannot
    work without it (`needed_by`, e.g. --save-stats) and an explicit `path` make its absence an error."""
    try:
        from .inception import load_inception
    except ImportError:
        reason = "this installation has no Inception layer (vqgan.eval.inception)"
        if needed_by or path:
            raise UserError(f"{', '.join(needed_by) or f'--inception-weights {path}'}: {reason}") from None
        return None, f"{NOT_COMPUTED}: {reason}"
    try:
        net = load_inception(path, device)
    except UserError as e:
        if needed_by:
            raise UserError(f"{', '.join(needed_by)} need the FID Inception network: {e}") from None
        if path:
            raise
        return None, f"{NOT_COMPUTED}: {e}"
    return net, {"file": net.weights_path.name, "path": str(net.weights_path), "sha256": net.weights_sha256}
