"""DALL-E's logit-Laplace pixel likelihood (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 3.1
and appendix A.3).

Pixels x in [-1, 1] are first squeezed into (eps, 1 - eps), eps = 0.1 (A.3: y = eps + (1 - 2 eps) x01), so that
logit(y) stays finite; the decoder predicts, per sub-pixel, a location mu and a log-scale ln b of a Laplace
distribution over logit(y):

    f(y | mu, b) = 1 / (2 b y (1 - y)) * exp(-|logit(y) - mu| / b)

`logit_laplace_nll` is -ln f, in nats per sub-pixel (the density of y; its ln(y (1 - y)) part does not depend
on the model and is kept, so the value is the true negative log-density). The image a decoder returns is the
distribution's median, sigmoid(mu), mapped back from (eps, 1 - eps) to [-1, 1] as DALL-E's `unmap_pixels`:
(2 sigmoid(mu) - 1) / (1 - 2 eps) = tanh(mu / 2) / (1 - 2 eps), in (-1.25, 1.25); not clamped here, as every
decoder's output (DALL-E clamps after unmapping; our reports clamp where they draw).
"""
from __future__ import annotations

import torch

EPS = 0.1  # A.3: pixels are mapped into (eps, 1 - eps)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> y in [eps, 1 - eps]."""
    return EPS + (1 - 2 * EPS) * (x + 1) / 2


def logit_laplace_image(location: torch.Tensor) -> torch.Tensor:
    """The image (in [-1, 1] units) a logit-Laplace decoder stands for: the median sigmoid(mu), unmapped."""
    return torch.tanh(location / 2) / (1 - 2 * EPS)


def logit_laplace_nll(x: torch.Tensor, location: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-ln f(y | mu, b) per element (float32), for images `x` in [-1, 1] and the decoder's `location` mu (logit
    space) and `log_scale` ln b, all (B, C, H, W)."""
    y = map_pixels(x.float())
    log_scale = log_scale.float()
    t = torch.log(y) - torch.log1p(-y)  # logit(y)
    return (torch.log(2 * y * (1 - y)) + log_scale + (t - location.float()).abs() * torch.exp(-log_scale))
