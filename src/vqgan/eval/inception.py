"""The Inception-v3 feature layer of FID, KID, IS and precision/recall: torch-fidelity's network, real weights.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-compatible port that torchmetrics uses
too); it is not copied here. Its weights are the standard FID file, found by name in the usual caches or given
by path, never downloaded: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`. Both were ported from TF's `inception-2015-12-05` graph and hold the
same parameter names (torchvision's `Inception3` names, 1008 logits); only the BatchNorm `num_batches_tracked`
counters may be absent, which is filled in. A file is read with tensors only (no pickled code runs) and its
keys and shapes are checked before use.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import torch

from ..checkpoint import file_sha256
from ..errors import UserError

FID_WEIGHTS_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity, torchmetrics
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
)
INSTALL_HINT = "pip install vqgan[eval]"


def weights_dirs() -> list[Path]:
    """Where the FID weights are looked for, in order: the torch hub cache ($TORCH_HOME/hub/checkpoints, where
    torch-fidelity, torchmetrics and pytorch-fid download them), the default ~/.cache/torch one, and
    $VQGAN_CACHE (or ~/.cache/vqgan)."""
    home = Path(os.path.expanduser("~"))
    vqgan_cache = os.environ.get("VQGAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or home / ".cache", "vqgan")
    dirs = [Path(torch.hub.get_dir()) / "checkpoints", home / ".cache" / "torch" / "hub" / "checkpoints",
            Path(vqgan_cache)]
    return list(dict.fromkeys(dirs))


def find_inception_weights(path: str | None = None) -> Path | None:
    """The FID Inception weights file: `path` when given (it must exist), else the first standard file name
    found in `weights_dirs()`, else None."""
    if path:
        p = Path(os.path.expanduser(path))
        if not p.is_file():
            raise UserError(f"--inception-weights {path}: no such file (the FID Inception weights, "
                            f"{FID_WEIGHTS_FILES[0]})")
        return p
    for folder in weights_dirs():
        for name in FID_WEIGHTS_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def missing_weights_message() -> str:
    return (f"the FID Inception weights are not here: put torch-fidelity's {FID_WEIGHTS_FILES[0]} (or pytorch-fid's "
            f"{FID_WEIGHTS_FILES[1]}) in {weights_dirs()[0]}, or pass --inception-weights PATH")


@functools.cache
def _network_class() -> type:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(f"the Inception metrics need torch-fidelity: {INSTALL_HINT}") from None

    class Network(FeatureExtractorInceptionV3):
        """torch-fidelity's network; its `__init__` loads whatever file it is handed with full unpickling, so it is
        handed an empty one here (and skips it) and the real weights are loaded afterwards, checked."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return Network


def build_network(device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 with random weights, in eval mode: (pool (N, 2048), logits without the
    fc bias (N, 1008)) of uint8 images. The layout a weights file must match; tests save it as a stand-in file.
    On the "meta" device it is only that layout (no time spent on a random initialisation)."""
    cls = _network_class()
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device(device):
        return cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)


def read_weights(path: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in `path`, checked against `net` (tensors only; missing BatchNorm counters filled in)."""
    from ..checkpoint import check_state_dict, load_state_dict_file

    sd = load_state_dict_file(path)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):  # absent from older files; unused in eval mode
            sd.setdefault(k, torch.zeros_like(v, device="cpu"))
    try:
        check_state_dict(net, sd, f"{path} (the FID Inception weights)")
    except UserError as e:
        raise UserError(f"{e}; expected torch-fidelity's {FID_WEIGHTS_FILES[0]} or pytorch-fid's "
                        f"{FID_WEIGHTS_FILES[1]}") from None
    return sd


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W), any size -> {"pool": (N, 2048), "logits": (N, 1008)} in float64.

    The images are resized to 299x299 inside, with torch-fidelity's bilinear resize that matches TF 1.x (the
    resize of the original FID and IS code), then scaled to [-1, 1]. "logits" are the fc layer without its bias,
    the ones torch-fidelity and torchmetrics use for the Inception Score."""

    def __init__(self, net: torch.nn.Module, weights_path: Path, weights_sha256: str):
        super().__init__()
        self.net = net
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    def describe(self) -> dict[str, str]:
        """The weights' file name and hash, for the outputs."""
        return {"file": self.weights_path.name, "path": str(self.weights_path), "sha256": self.weights_sha256}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.net(images)
        return {"pool": pool.double(), "logits": logits.double()}


def load_inception(path: str | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception network with the weights file `path` (or the one `find_inception_weights` finds).
    A missing file or torch-fidelity is a one-line UserError saying what to install or where to put the file."""
    found = find_inception_weights(path)
    net = build_network("meta")  # before the file check: without torch-fidelity, that is the first thing to fix
    if found is None:
        raise UserError(missing_weights_message())
    net.load_state_dict(read_weights(found, net), assign=True)
    net.requires_grad_(False)
    features = InceptionFeatures(net, found, file_sha256(found)).to(device).eval()
    if torch.device(device).type == "cpu":  # oneDNN's convolutions run 1.4x faster channels-last (same features
        features.to(memory_format=torch.channels_last)  # to ~1e-5 relative: float sums in another order)
    return features
