"""The pretrained networks an evaluation measures with (LPIPS's VGG16, FID's Inception), from real weight files
only. A network whose weights are absent is not used: its metric is "not computed: <why>", never a number from
random weights. An explicitly named file that does not exist is an error. Each record names the files and
their sha256, so a summary says which weights made its numbers."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..checkpoint import file_sha256
from ..errors import UserError

NOT_COMPUTED = "not computed"
LPIPS_NETS = ("alex", "vgg")  # the lpips package's networks, its default (the one it advises for measuring) first
log = logging.getLogger("vqgan.eval")
# Released files whose name ends in the first 8 hex digits of their sha256 (torch hub's convention), checked:
# torchvision's VGG16 and AlexNet, and torch-fidelity's Inception (sha256 6726825d0af5...). pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth carries the same suffix but is not known to hash to it: not checked.
HASH_NAMED_FILES = {"vgg16-397923af.pth": "397923af", "alexnet-owt-7be5be79.pth": "7be5be79",
                    "weights-inception-2015-12-05-6726825d.pth": "6726825d"}


def weights_option(net: str) -> str:
    """The command-line option that names LPIPS network `net`'s backbone weights."""
    return "--vgg-weights" if net == "vgg" else "--alexnet-weights"


def file_record(path: Path, sha256: str | None = None) -> dict:
    """A file's name, absolute path and sha256 (`sha256` when already known)."""
    return {"file": path.name, "path": str(path.resolve()), "sha256": sha256 or file_sha256(path)}


def network_record(path: Path, sha256: str | None = None, warn: bool = True) -> dict:
    """A measuring network's weights file (name, path, sha256) and, for the released names of `HASH_NAMED_FILES`,
    whether the file's sha256 begins with the hash its name carries (`matches_name`). A file under a released name
    with another hash is not the published network: its numbers do not compare with published ones, which the
    record and (with `warn`: process 0) a warning say."""
    record = file_record(path, sha256)
    prefix = HASH_NAMED_FILES.get(path.name)
    if prefix:
        record["matches_name"] = record["sha256"].startswith(prefix)
        if not record["matches_name"] and warn:
            log.warning("%s: its sha256 (%s...) does not begin with the %s its name claims: not the published "
                        "weights, so the metrics made with it do not compare with published numbers", path,
                        record["sha256"][:8], prefix)
    return record


def _explicit(path: str | None, option: str) -> Path | None:
    if not path:
        return None
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UserError(f"{option} {path}: no such file")
    return p


def load_lpips_or_reason(net: str, backbone_weights: str | None, heads: str | None, device: torch.device,
                         resolution: int | None = None, warn: bool = True) -> tuple[torch.nn.Module | None, dict | str]:
    """(LPIPS v0.1 on backbone `net` (alex, vgg) with real weights, its files' records), or (None, "not computed:
    <why>"): without the weights, or for images of `resolution` too small for the network's pooling."""
    from ..losses.lpips import backbone, build_lpips, default_backbone_path, default_heads_path

    spec = backbone(net)
    option = weights_option(net)
    weights = _explicit(backbone_weights, option) or default_backbone_path(net)
    if resolution is not None and resolution < spec.min_side:
        return None, (f"{NOT_COMPUTED}: LPIPS on {spec.title} needs images of at least {spec.min_side} px a side "
                      f"(its pooling), these are {resolution}")
    head_file = _explicit(heads, "--lpips-heads") or default_heads_path(net)
    if not weights.is_file():
        return None, (f"{NOT_COMPUTED}: no {spec.title} ImageNet weights ({spec.file} in {weights.parent}, or pass "
                      f"{option} PATH)")
    if head_file is None or not head_file.is_file():
        return None, (f"{NOT_COMPUTED}: no LPIPS v0.1 heads for {net} (pip install lpips, or pass --lpips-heads "
                      "PATH)")
    model = build_lpips(str(weights), str(head_file), net=net).to(device)
    return model, {"version": f"LPIPS v0.1, {spec.title}", "net": net, "backbone": network_record(weights, warn=warn),
                   "heads": file_record(head_file)}


def load_inception_or_reason(path: str | None, device: torch.device, needed_by: list[str], warn: bool = True
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
    return net, network_record(net.weights_path, net.weights_sha256, warn)
