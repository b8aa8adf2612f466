"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) on VGG16 or AlexNet features.

Weights are never downloaded here. They load from files:
- the backbone: torchvision's `vgg16` / `alexnet` state dict (`features.N.*` keys), by default from the torch
  hub cache `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth` / `alexnet-owt-7be5be79.pth`, or a given path;
- the five linear heads: the `lpips` package's `weights/v0.1/vgg.pth` / `alex.pth` (`linK.model.1.weight`
  keys), by default the copy the `lpips` wheel ships, or a given path.
The perceptual loss of training uses VGG16 (as taming-transformers); module names match taming's
`loss.perceptual_loss.*` keys (`net.slice1.0.weight`, `lin0.model.1.weight`, `scaling_layer.shift`). AlexNet is
the lpips package's default network for measuring (its authors' advice: "alex" for a forward metric, "vgg" as
a loss); `vqgan eval` offers both.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..native import winograd
from ..nn.conv import Conv2d

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's file name for the ImageNet VGG16
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # ... and for the ImageNet AlexNet
# VGG16 configuration "D"; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@dataclass(frozen=True)
class Backbone:
    """One LPIPS network: its torchvision weights file, the feature indices where each of the five LPIPS slices
    ends (after the ReLU it taps) and their channel counts. `name` is the lpips package's (`net=`)."""

    name: str
    title: str
    file: str
    slice_ends: tuple[int, ...]
    channels: tuple[int, ...]
    min_side: int  # the smallest image its pooling leaves a pixel of at the last tap

    def layers(self) -> list[nn.Module]:
        """torchvision's `features` modules up to the last tap (indices = torchvision's keys)."""
        if self.name == "alex":
            relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
            return [nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2),
                    nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2),
                    Conv2d(192, 384, 3, padding=1), relu(), Conv2d(384, 256, 3, padding=1), relu(),
                    Conv2d(256, 256, 3, padding=1), relu()]
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        return layers[:self.slice_ends[-1]]


BACKBONES = {
    "vgg": Backbone("vgg", "VGG16", VGG16_FILE, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), 16),
    "alex": Backbone("alex", "AlexNet", ALEXNET_FILE, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256), 31),
}
CHANNELS = list(BACKBONES["vgg"].channels)


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"LPIPS network {name!r}: choose {' or '.join(BACKBONES)}")
    return BACKBONES[name]


class PerceptualWeightsMissing(UserError):
    pass


class SlicedFeatures(nn.Module):
    """torchvision's `features` of a backbone, cut into the five LPIPS slices (keys keep feature indices)."""

    def __init__(self, net: Backbone):
        super().__init__()
        layers = net.layers()
        start = 0
        for k, end in enumerate(net.slice_ends, 1):
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", s)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class LinearHead(nn.Module):
    """Dropout + 1x1 conv without bias (`model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LPIPS(nn.Module):
    """Frozen perceptual distance between two image batches in [-1, 1]: returns (B,).

    Always in eval mode: taming trains with the heads' dropout on (a side effect of Lightning's
    `model.train()`); a frozen metric should not be noisy.
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        self.backbone = backbone(net)
        self.scaling_layer = ScalingLayer()
        self.net = SlicedFeatures(self.backbone)
        for i, c in enumerate(self.backbone.channels):
            setattr(self, f"lin{i}", LinearHead(c))
        self.requires_grad_(False)
        self.eval()
        self.description = "LPIPS (weights not loaded)"

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """VGG's input. On the CPU its 3x3 convolutions run fastest by Winograd (default layout); without that
        kernel, channels-last, where oneDNN's forward and input gradient (all that LPIPS needs) are faster."""
        x = self.scaling_layer(x)
        if x.device.type == "cpu" and not winograd.available():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.requires_grad == y.requires_grad:
            # one VGG pass over both batches: (2B, 3, H, W)
            fx, fy = zip(*(f.chunk(2) for f in self.net(self._scaled(torch.cat([x, y])))))
        else:
            # training: only the reconstruction needs gradients, so the target's features are taken without a
            # graph and the backward pass runs over half the batch
            need, other = (x, y) if x.requires_grad else (y, x)
            with torch.no_grad():
                f_other = self.net(self._scaled(other))
            f_need = self.net(self._scaled(need))
            fx, fy = (f_need, f_other) if x.requires_grad else (f_other, f_need)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            d = getattr(self, f"lin{i}").model((_unit(a) - _unit(b)) ** 2)
            total = total + d.mean(dim=(1, 2, 3))
        return total


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Unit length across channels, as LPIPS v0.1."""
    return f / (torch.sqrt((f * f).sum(1, keepdim=True)) + 1e-10)


# --------------------------------------------------------------------------------------------
# weight files


def default_backbone_path(net: str = "vgg") -> Path:
    """Where torch hub caches torchvision's ImageNet weights of the backbone `net`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone(net).file


def default_vgg16_path() -> Path:
    return default_backbone_path("vgg")


def default_heads_path(net: str = "vgg") -> Path | None:
    """The lpips package's v0.1 heads for `net` (weights/v0.1/<net>.pth), where the package is installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{backbone(net).name}.pth"


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from ..checkpoint import load_state_dict_file

    return load_state_dict_file(path)


def features_state_dict_to_lpips(sd: dict[str, torch.Tensor], net: str = "vgg") -> dict[str, torch.Tensor]:
    """torchvision `features.N.w` (or bare `N.w`) keys of backbone `net` -> `sliceK.N.w` keys; the classifier's
    and any feature past the last LPIPS tap are dropped."""
    ends = backbone(net).slice_ends
    out = {}
    for key, value in sd.items():
        name = key[len("features."):] if key.startswith("features.") else key
        if key.startswith("classifier."):
            continue
        idx = name.split(".")[0]
        if not idx.isdigit():
            raise ValueError(f"unexpected key {key!r} in a {backbone(net).title} state dict")
        if int(idx) < ends[-1]:
            k = next(j for j, end in enumerate(ends, 1) if int(idx) < end)
            out[f"slice{k}.{name}"] = value
    return out


def build_lpips(backbone_weights: str | None = None, heads: str | None = None, allow_random: bool = False,
                state_dict: dict[str, torch.Tensor] | None = None, state_source: str = "", net: str = "vgg") -> LPIPS:
    """LPIPS on backbone `net` (vgg, alex) with real weights from files, or (only if `allow_random`) a random
    network, loudly (the errors name the training config's keys: `vqgan eval` checks its files first).

    `state_dict`: a whole LPIPS in taming's layout (`net.slice*`, `lin*`, `scaling_layer.*`), e.g. the
    `loss.perceptual_loss.*` weights that ship inside released taming checkpoints; used when no explicit
    file is named.
    """
    model = LPIPS(net)
    title = model.backbone.title
    if state_dict is not None and not backbone_weights and not heads:
        _strict_copy(model, state_dict, state_source or "LPIPS state dict")
        model.description = f"LPIPS v0.1 ({title} and heads from {state_source or 'a state dict'})"
        return model
    weights_option, heads_option = "loss.vgg_weights", "loss.lpips_heads"
    net_path = Path(os.path.expanduser(backbone_weights)) if backbone_weights else default_backbone_path(net)
    heads_path = Path(os.path.expanduser(heads)) if heads else default_heads_path(net)
    missing = []
    if net_path.is_file():
        sd = features_state_dict_to_lpips(_load_tensors(net_path), net)
        _strict_copy(model.net, sd, str(net_path))
        net_desc = f"{title} from {net_path}"
    else:
        if backbone_weights:
            raise PerceptualWeightsMissing(f"{weights_option}: no file {net_path}")
        missing.append(f"{title} ImageNet weights ({net_path})")
        net_desc = f"RANDOM {title}"
    if heads_path is not None and heads_path.is_file():
        _strict_copy(model, {k: v for k, v in _load_tensors(heads_path).items() if k.startswith("lin")},
                     str(heads_path), prefix_filter="lin")
        heads_desc = f"heads from {heads_path}"
    else:
        if heads:
            raise PerceptualWeightsMissing(f"{heads_option}: no file {heads_path}")
        missing.append(f"LPIPS v0.1 linear heads (pip install lpips, or {heads_option}=PATH)")
        heads_desc = "RANDOM heads"
    if missing:
        if not allow_random:
            raise PerceptualWeightsMissing(
                f"perceptual loss weights missing: {'; '.join(missing)}. Put torchvision's {model.backbone.file} in "
                f"{default_backbone_path(net).parent} (or set {weights_option}=PATH), or train without the "
                "perceptual term with loss.perceptual_weight=0")
        warnings.warn(f"LPIPS runs on random weights ({', '.join(missing)} missing): perceptual loss values "
                      "are meaningless; allowed only for benchmarking", stacklevel=2)
    model.description = f"LPIPS v0.1 ({net_desc}, {heads_desc})"
    return model


def _strict_copy(module: nn.Module, sd: dict[str, torch.Tensor], source: str, prefix_filter: str = "") -> None:
    from ..checkpoint import check_state_dict

    check_state_dict(module, sd, source, prefix=prefix_filter)
    module.load_state_dict({**module.state_dict(), **{k: v.contiguous() for k, v in sd.items()}})
