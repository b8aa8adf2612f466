"""Full-reference image metrics per image, batched in torch: PSNR, SSIM and MS-SSIM on 8-bit RGB.

Images are uint8 (B, 3, H, W); every metric returns one value per image (B,), float64, so that a set's score is
the mean over images (never a score of a whole batch). The constants are the standard ones:
- PSNR: MSE over all pixels and channels, peak 255. Identical images have MSE 0: floored at `MSE_FLOOR`.
- SSIM (Wang et al. 2004): Gaussian window of 11 taps, sigma 1.5, K1 0.01, K2 0.03, data range 255 (the uint8
  range), population statistics, over the window positions that fit inside the image ("valid"), per channel
  then averaged -- what scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)` computes.
- MS-SSIM (Wang et al. 2003): 5 scales with the paper's weights, 2x2 average pooling between scales (padded
  on odd sides), negative terms clipped at 0 -- as pytorch-msssim; needs the short side > 160 px
  (`MS_SSIM_MIN_SIDE`), so that the last scale still holds one window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PEAK = 255.0
MSE_FLOOR = 1e-10  # identical images: PSNR 10 log10(255^2 / 1e-10) = 148.1 dB instead of infinity
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = (WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161 px


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each uint8 image pair, (B,)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10.0 * torch.log10(PEAK ** 2 / mse)


def _window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(WINDOW, dtype=torch.float64, device=device) - WINDOW // 2
    g = torch.exp(-coords ** 2 / (2 * SIGMA ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, valid positions only: (B, C, H, W) -> (B, C, H-10, W-10)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM, contrast-structure term) of each image and channel, (B, C) each; x, y float64 in [0, 255]."""
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    mx, my = _blur(x, g), _blur(y, g)
    vx, vy = _blur(x * x, g) - mx * mx, _blur(y * y, g) - my * my
    cov = _blur(x * y, g) - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    s = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return s.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each uint8 image pair, averaged over channels, (B,). Images need sides of at least 11 px."""
    return _ssim_cs(x.double(), y.double(), _window(x.device))[0].mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each uint8 image pair, (B,). Callers check `ms_ssim_fits` first."""
    if not ms_ssim_fits(*x.shape[-2:]):
        raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px a side, got {tuple(x.shape[-2:])}")
    g = _window(x.device)
    x, y = x.double(), y.double()
    terms = []
    for scale in range(len(MS_SSIM_WEIGHTS)):
        s, cs = _ssim_cs(x, y, g)
        if scale == len(MS_SSIM_WEIGHTS) - 1:
            terms.append(s.relu())
            break
        terms.append(cs.relu())
        pad = [side % 2 for side in x.shape[-2:]]
        x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64, device=x.device).view(-1, 1, 1)
    return torch.stack(terms).pow(weights).prod(0).mean(1)  # per channel over scales, then over channels


def ms_ssim_fits(height: int, width: int) -> bool:
    return min(height, width) >= MS_SSIM_MIN_SIDE

