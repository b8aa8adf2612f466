"""3x3 homographies of the cutouts: crop + resize, flip, affine and perspective as matrices, and one sampler.

Coordinates are pixel indices (pixel i's centre at i, the image spanning [-0.5, W - 0.5]), the convention of
`F.interpolate(align_corners=False)` and of kornia's warps with `align_corners=False`. A warp matrix maps source
pixels to destination pixels (as kornia's `warp_affine` / `warp_perspective`); a cutout's chain
crop -> resize -> flip -> affine -> perspective becomes one source <- destination matrix, so the image is sampled
once instead of being resampled by each stage.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_resize(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3) boxes (x, y, side) in image pixels -> (N, 3, 3) image <- cutout matrices of a resize to size x size
    (`F.interpolate(align_corners=False)`: cutout pixel u samples image x + (u + 0.5) * side / size - 0.5)."""
    x, y, side = boxes.double().unbind(-1)
    m = torch.zeros(len(boxes), 3, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = side / size
    m[:, 0, 2] = x + 0.5 * side / size - 0.5
    m[:, 1, 2] = y + 0.5 * side / size - 0.5
    m[:, 2, 2] = 1
    return m


def hflip(flip: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) bools -> (N, 3, 3) horizontal flips of a size-wide image (u -> size - 1 - u; its own inverse)."""
    m = torch.eye(3, dtype=torch.float64).repeat(len(flip), 1, 1)
    m[flip, 0, 0] = -1
    m[flip, 0, 2] = size - 1
    return m


def rotate_translate(angle: torch.Tensor, shift: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) degrees about the centre (the sign of kornia's `get_affine_matrix2d`), then an (N, 2) shift in pixels ->
    (N, 3, 3) source -> destination matrices, as kornia's `RandomAffine` without scale and shear."""
    a = angle.double() * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    c = (size - 1) / 2
    m = torch.zeros(len(angle), 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, 0, 2] = c - cos * c + sin * c + shift[:, 0].double()
    m[:, 1, 2] = c - sin * c - cos * c + shift[:, 1].double()
    m[:, 2, 2] = 1
    return m


def from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(N, 4, 2) point pairs -> (N, 3, 3) homographies taking each src point to its dst point (the direct linear
    transform with h33 = 1: eight equations in eight unknowns)."""
    src, dst = src.double(), dst.double()
    x, y = src.unbind(-1)
    u, v = dst.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)  # (N, 4, 8)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # (N, 8, 8)
    h = torch.linalg.solve(a, torch.cat([u, v], 1))  # (N, 8)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def sample(image: torch.Tensor, src_from_dst: torch.Tensor, size: int) -> torch.Tensor:
    """(1, C, H, W) image and (N, 3, 3) image <- cutout matrices (in the pixels of an H x W image) ->
    (N, C, size, size) by ONE bilinear `grid_sample`.

    The N grids are stacked along the height of one grid over the single image, so the backward scatters straight
    into the image's gradient rather than into N expanded copies of it. Border padding, as the notebook's
    `RandomAffine(padding_mode='border')`: a warp that looks past the image's edge repeats the edge instead of
    showing black, which CLIP would read as content. The grid is in normalised coordinates with
    `align_corners=False`, where an image's extent is [-1, 1] at any resolution: the same matrices serve the image
    and each of its pooled (pyramid) copies."""
    height, width = image.shape[-2:]
    n = len(src_from_dst)
    # pixel index -> [-1, 1] with align_corners=False is (2 x + 1) / W - 1: fold it into the matrices, then map the
    # pixel grid elementwise (a batched matmul of (size^2, 3) points is several times slower on a CPU)
    to_unit = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
                           dtype=torch.float64)
    m = (to_unit @ src_from_dst).to(image.device, torch.float32).view(n, 9, 1, 1).unbind(1)
    r = torch.arange(size, device=image.device, dtype=torch.float32)
    x, y = r.view(1, 1, size), r.view(1, size, 1)
    w = m[6] * x + m[7] * y + m[8]  # (N, size, size)
    grid = torch.stack([(m[0] * x + m[1] * y + m[2]) / w, (m[3] * x + m[4] * y + m[5]) / w], -1)
    grid = grid.view(1, n * size, size, 2).to(image.dtype)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (1, C, N*s, s)
    return out.view(-1, n, size, size).transpose(0, 1)
