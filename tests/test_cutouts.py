"""The single-homography cutouts (imagine/cutouts.py, imagine/homography.py) against the notebook's chain of
separate resamplings (crop -> resize -> flip -> kornia affine -> kornia perspective) on the same random draw;
hand-built crops and flips; gradients; same seed -> same views; the pyramid for large downscales."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqgan.imagine import colour, homography
from vqgan.imagine.cutouts import MakeCutouts

kornia = pytest.importorskip("kornia")


def smooth_image(side: int = 128, seed: int = 0) -> torch.Tensor:
    """A (1, 3, side, side) image in [0, 1] with detail at ~16 px: the two paths differ only by where a crop's
    edge row is interpolated (with the pixel beyond the crop, or clamped to it), which a smooth image keeps small."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, side // 16, side // 16, generator=g), (side, side), mode="bicubic",
                         align_corners=False).clamp(0, 1)


def chain(image: torch.Tensor, draw, size: int, padding: str = "border", clamped: float | None = None) -> torch.Tensor:
    """The old path: each stage resamples the previous one's output (kornia's warps, as its augmentations).
    `clamped`: the value to give the resized pixels that the resize clamped to the crop's edge row."""
    from kornia.geometry.transform import get_affine_matrix2d, get_perspective_transform, warp_affine, warp_perspective

    views = []
    for x, y, s in draw.boxes.tolist():
        crop = image[:, :, y:y + s, x:x + s]
        view = F.interpolate(crop, (size, size), mode="bilinear", align_corners=False, antialias=s > size)
        if clamped is not None:
            src = (torch.arange(size) + 0.5) * s / size - 0.5
            edge = (src < 0) | (src > s - 1)
            view = view.masked_fill(edge[None, None, :, None] | edge[None, None, None, :], clamped)
        views.append(view)
    batch = torch.cat(views).double()
    batch = torch.where(draw.flip[:, None, None, None], batch.flip(-1), batch)
    n = len(batch)
    center = torch.full((n, 2), (size - 1) / 2, dtype=torch.float64)
    affine = get_affine_matrix2d(draw.shift, center, torch.ones(n, 2, dtype=torch.float64), draw.angle)
    batch = warp_affine(batch, affine[:, :2], (size, size), padding_mode=padding, align_corners=False)
    s = size - 1
    square = torch.tensor([[[0, 0], [s, 0], [s, s], [0, s]]], dtype=torch.float64).expand(n, 4, 2)
    perspective = get_perspective_transform(square, draw.corners)
    return warp_perspective(batch, perspective, (size, size), align_corners=False)


def test_one_homography_equals_the_chain_of_warps():
    image = smooth_image().double()
    cut = MakeCutouts(224, 16, noise=0.0, generator=torch.Generator().manual_seed(3))
    draw = cut.draw(128, 128)
    assert draw.flip.any() and (draw.angle != 0).any() and (draw.corners.frac() != 0).any()
    new = cut.warp(image, draw)
    old = chain(image, draw, 224)
    # the chain pads where it looks outside its crop (border, then zeros) and clamps at the crop's edge row, where
    # the homography reads the image beyond the crop: compare where the chain saw only the crop's inside
    inside = chain(torch.ones_like(image), draw, 224, padding="zeros", clamped=0.0) > 1 - 1e-9
    assert inside.float().mean() > 0.5
    # the chain's repeated bilinear resamplings blur a little more than one resampling: a small difference remains
    err = (new - old)[inside].abs()
    assert err.max() < 0.01 and err.mean() < 2e-4, (err.max(), err.mean())


def test_pure_crop_and_flip_by_hand():
    image = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    cut = MakeCutouts(96, 4, noise=0.0, augment=False, generator=torch.Generator().manual_seed(2))
    draw = cut.draw(96, 80)  # sides 40..80, enlarged to 96
    views = cut.warp(image, draw)
    for view, (x, y, s) in zip(views, draw.boxes.tolist()):
        ref = F.interpolate(image[:, :, y:y + s, x:x + s], (96, 96), mode="bilinear", align_corners=False)[0]
        # interior only: at the crop's edge row the resize clamps to the crop, the homography reads beyond it
        k = 96 // s + 1
        torch.testing.assert_close(view[:, k:-k, k:-k], ref[:, k:-k, k:-k], atol=1e-5, rtol=0)
    # a whole-image crop at the image's own size is the identity; its flip is torch.flip
    whole = torch.tensor([[0, 0, 80]])
    square = image[:, :, :80]
    eye = homography.crop_resize(whole, 80)
    torch.testing.assert_close(homography.sample(square, eye, 80), square, atol=1e-5, rtol=0)
    flipped = homography.sample(square, eye @ homography.hflip(torch.tensor([True]), 80), 80)
    torch.testing.assert_close(flipped, square.flip(-1), atol=1e-5, rtol=0)


def test_gradients_reach_the_image_and_seeds_repeat():
    image = smooth_image(64).requires_grad_(True)
    views = [MakeCutouts(32, 6, generator=torch.Generator().manual_seed(7))(image) for _ in range(2)]
    assert views[0].shape == (6, 3, 32, 32)
    assert torch.equal(views[0], views[1])
    other = MakeCutouts(32, 6, generator=torch.Generator().manual_seed(8))(image)
    assert not torch.equal(views[0], other)
    views[0].square().sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_large_downscales_sample_a_pooled_image():
    """A 512 px crop shrunk to 60 px is read from the image pooled 8x, which averages like an area resize; plain
    bilinear sampling of the full image would alias the checkerboard into stripes."""
    board = ((torch.arange(512)[:, None] + torch.arange(512)[None]) % 2).float().expand(1, 3, 512, 512)
    cut = MakeCutouts(60, 3, cut_pow=0.0, noise=0.0, augment=False, generator=torch.Generator().manual_seed(0))
    draw = cut.draw(512, 512)
    assert (draw.boxes[:, 2] == 512).all()  # cut_pow 0: u**0 = 1, the largest crop
    views = cut.warp(board, draw)
    torch.testing.assert_close(views, torch.full_like(views, 0.5), atol=1e-5, rtol=0)
    aliased = homography.sample(board, draw.src_from_dst(60), 60)
    assert (aliased - 0.5).abs().max() > 0.25


def test_colour_matrices():
    """W3C hueRotate / saturate: identity at no jitter and at a whole turn, greys stay grey, luma is kept."""
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    torch.testing.assert_close(colour.hue_rotation(torch.tensor([0.0, 1.0, -1.0])), eye)
    torch.testing.assert_close(colour.saturation(torch.ones(3)), eye)
    m = colour.hue_rotation(torch.tensor([0.1, -0.07])) @ colour.saturation(torch.tensor([0.9, 1.1]))
    grey = torch.full((2, 3, 1), 0.4, dtype=torch.float64)
    torch.testing.assert_close(m @ grey, grey)
    luma = torch.tensor(colour.LUMA, dtype=torch.float64)
    torch.testing.assert_close(luma @ m, luma.expand(2, 3), atol=2e-3, rtol=0)  # the spec rounds its weights
    flat = colour.saturation(torch.zeros(1)) @ torch.rand(1, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat))
    batch = torch.rand(2, 3, 4, 4)
    assert colour.apply(batch, m).min() >= 0 and colour.apply(batch, 3 * m).max() <= 1
