"""Built-in demo data: procedurally drawn landscape scenes, with a class label and a segmentation map.

Needs no download. Each scene is one of four kinds (the class label) and is drawn from sky gradients,
sun or moon, mountain ranges, textured ground or water, trees, houses, boats, clouds and lit windows,
with a per-pixel segmentation into `SEGMENT_CLASSES`. Deterministic in (seed, index).
"""
from __future__ import annotations

import colorsys
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SCENE_CLASSES = ["countryside", "seaside", "mountains", "night_city"]
SEGMENT_CLASSES = ["sky", "sun_moon", "cloud", "mountain", "ground", "water", "tree", "building"]
_SEG = {name: i for i, name in enumerate(SEGMENT_CLASSES)}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _jitter(rng: random.Random, c: tuple[int, int, int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in c)


class _Canvas:
    """An RGB image and its label map, drawn together."""

    def __init__(self, size: int):
        self.size = size
        self.img = Image.new("RGB", (size, size))
        self.seg = Image.new("L", (size, size))
        self.draw = ImageDraw.Draw(self.img)
        self.sdraw = ImageDraw.Draw(self.seg)

    def polygon(self, pts, fill, label):
        self.draw.polygon(pts, fill=fill)
        self.sdraw.polygon(pts, fill=_SEG[label])

    def ellipse(self, box, fill, label):
        self.draw.ellipse(box, fill=fill)
        self.sdraw.ellipse(box, fill=_SEG[label])

    def rect(self, box, fill, label):
        self.draw.rectangle(box, fill=fill)
        self.sdraw.rectangle(box, fill=_SEG[label])


def _sky(c: _Canvas, rng: random.Random, night: bool) -> None:
    s = c.size
    if night:
        top, bottom = _hsv(rng.uniform(0.6, 0.72), 0.7, 0.15), _hsv(rng.uniform(0.6, 0.75), 0.5, 0.35)
    elif rng.random() < 0.3:  # sunset
        top, bottom = _hsv(rng.uniform(0.55, 0.7), 0.6, 0.6), _hsv(rng.uniform(0.0, 0.1), 0.7, 1.0)
    else:
        top, bottom = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.5, 0.8), 0.9), _hsv(0.55, 0.2, 1.0)
    t = np.linspace(0, 1, s)[:, None, None]
    grad = (np.array(top)[None, None] * (1 - t) + np.array(bottom)[None, None] * t).repeat(s, 1)
    c.img.paste(Image.fromarray(grad.astype(np.uint8)))
    if night:
        a = np.asarray(c.img).copy()
        ys, xs = rng.choices(range(s // 2), k=s // 2), rng.choices(range(s), k=s // 2)
        a[ys, xs] = 230
        c.img.paste(Image.fromarray(a))


def _sun(c: _Canvas, rng: random.Random, night: bool) -> None:
    s = c.size
    r = rng.uniform(0.05, 0.11) * s
    x, y = rng.uniform(0.15, 0.85) * s, rng.uniform(0.08, 0.35) * s
    col = (235, 235, 210) if night else _hsv(rng.uniform(0.08, 0.16), 0.7, 1.0)
    c.ellipse((x - r, y - r, x + r, y + r), col, "sun_moon")


def _clouds(c: _Canvas, rng: random.Random) -> None:
    s = c.size
    for _ in range(rng.randint(0, 3)):
        x, y, w = rng.uniform(0, 1) * s, rng.uniform(0.05, 0.35) * s, rng.uniform(0.1, 0.25) * s
        shade = rng.randint(215, 255)
        for _ in range(4):
            dx, dy, r = rng.uniform(-w, w), rng.uniform(-w / 4, w / 4), rng.uniform(0.3, 0.6) * w
            c.ellipse((x + dx - r, y + dy - r / 1.8, x + dx + r, y + dy + r / 1.8), (shade, shade, shade), "cloud")


def _mountains(c: _Canvas, rng: random.Random, height: float, snow: bool) -> None:
    s = c.size
    for layer in range(rng.randint(1, 3)):
        base = s * (0.55 + 0.05 * layer)
        pts = [(0, base)]
        x = 0.0
        while x < s:
            x += rng.uniform(0.08, 0.25) * s
            pts.append((x, base - rng.uniform(0.2, 1.0) * height * s))
        pts += [(s, base), (s, s), (0, s)]
        v = 0.35 + 0.15 * layer + rng.uniform(-0.05, 0.05)
        c.polygon(pts, _hsv(rng.uniform(0.55, 0.75), 0.25, v), "mountain")
        if snow:
            for (x0, y0) in pts[1:-3]:
                if y0 < base - 0.55 * height * s:
                    w = 0.04 * s
                    c.polygon([(x0, y0), (x0 - w, y0 + 1.3 * w), (x0 + w, y0 + 1.3 * w)], (245, 245, 250), "mountain")


def _textured_band(c: _Canvas, rng: random.Random, top: float, color, label: str, stripes: bool) -> None:
    s = c.size
    y0 = int(top * s)
    h = s - y0
    base = np.array(color, dtype=np.float32)[None, None]
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 1, (h, s, 1)).astype(np.float32)
    if stripes:  # water: horizontal ripples
        rows = np.sin(np.arange(h)[:, None, None] * rng.uniform(0.8, 1.6) + noise * 0.8) * 18
        tex = base + rows + noise * 6
    else:
        tex = base + noise * 14
    c.img.paste(Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH), (0, y0))
    c.sdraw.rectangle((0, y0, s, s), fill=_SEG[label])


def _tree(c: _Canvas, rng: random.Random, x: float, y: float, size: float) -> None:
    c.rect((x - size * 0.08, y - size * 0.3, x + size * 0.08, y), (90, 60, 30), "tree")
    green = _hsv(rng.uniform(0.22, 0.36), rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.65))
    if rng.random() < 0.5:
        c.polygon([(x, y - size * 1.3), (x - size * 0.45, y - size * 0.25), (x + size * 0.45, y - size * 0.25)],
                  green, "tree")
    else:
        r = size * 0.45
        c.ellipse((x - r, y - size * 0.3 - 2 * r, x + r, y - size * 0.3), green, "tree")


def _house(c: _Canvas, rng: random.Random, x: float, y: float, size: float, lit: bool) -> None:
    w, h = size * rng.uniform(0.8, 1.3), size * rng.uniform(0.6, 1.0)
    wall = _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.6, 0.95))
    c.rect((x - w / 2, y - h, x + w / 2, y), wall, "building")
    c.polygon([(x - w / 2 - size * 0.1, y - h), (x, y - h - size * 0.55), (x + w / 2 + size * 0.1, y - h)],
              _hsv(rng.uniform(0.0, 0.08), 0.7, rng.uniform(0.4, 0.7)), "building")
    win = (250, 220, 120) if lit else (80, 110, 160)
    ws = size * 0.16
    c.rect((x - w / 4 - ws / 2, y - h * 0.7, x - w / 4 + ws / 2, y - h * 0.7 + ws), win, "building")
    c.rect((x + w / 4 - ws / 2, y - h * 0.7, x + w / 4 + ws / 2, y - h * 0.7 + ws), win, "building")


def _tower(c: _Canvas, rng: random.Random, x: float, w: float, h: float, ground: float) -> None:
    s = c.size
    col = _hsv(rng.uniform(0.55, 0.7), 0.2, rng.uniform(0.12, 0.3))
    c.rect((x, ground - h, x + w, ground), col, "building")
    step = max(2.0, s / 32)
    yy = ground - h + step
    while yy < ground - step:
        xx = x + step * 0.6
        while xx < x + w - step:
            if rng.random() < 0.45:
                c.rect((xx, yy, xx + step * 0.5, yy + step * 0.5), _jitter(rng, (250, 210, 110), 20), "building")
            xx += step
        yy += step


def _boat(c: _Canvas, rng: random.Random, x: float, y: float, size: float) -> None:
    c.polygon([(x - size, y), (x + size, y), (x + size * 0.7, y + size * 0.35), (x - size * 0.7, y + size * 0.35)],
              _hsv(rng.random(), 0.6, 0.7), "building")
    c.polygon([(x, y - size * 1.2), (x, y - size * 0.1), (x + size * 0.8, y - size * 0.1)], (245, 245, 240),
              "building")


def depth_from_segmentation(seg: Image.Image) -> Image.Image:
    """A plausible depth map (mode "F", 0 near ... 1 far) from a scene's labels: sky, sun and clouds are
    farthest, mountains far, ground and water recede from the bottom edge towards the horizon, and trees,
    houses and boats stand at the depth of the ground under them."""
    labels = np.asarray(seg)
    h, w = labels.shape
    depth = np.ones((h, w), dtype=np.float32)
    below = np.zeros(w, dtype=np.float32)  # depth of the ground under each column, carried upwards
    for y in range(h - 1, -1, -1):
        row = labels[y]
        ground = np.isin(row, (_SEG["ground"], _SEG["water"]))
        standing = np.isin(row, (_SEG["tree"], _SEG["building"]))
        d = np.full(w, 1.0, dtype=np.float32)
        d[row == _SEG["mountain"]] = 0.85
        d[ground] = min(0.75, 1.6 * (h - y) / h)
        d[standing] = below[standing]
        below = np.where(ground | standing, d, below)
        depth[y] = d
    return Image.fromarray(depth, "F")


def render_scene(index: int, size: int = 64, seed: int = 0, label: int | None = None
                 ) -> tuple[Image.Image, Image.Image, int]:
    """Draw scene `index`: (RGB image, segmentation map with values in SEGMENT_CLASSES, class label)."""
    rng = random.Random(f"vqgan-scenes/{seed}/{index}")  # string seeds are hashed stably (sha512), not per process
    kind = index % len(SCENE_CLASSES) if label is None else label
    big = size * 2  # supersampled, then reduced: anti-aliased edges
    c = _Canvas(big)
    night = kind == 3
    _sky(c, rng, night)
    if rng.random() < 0.8:
        _sun(c, rng, night)
    if not night:
        _clouds(c, rng)
    if kind == 2:
        _mountains(c, rng, height=rng.uniform(0.35, 0.5), snow=True)
        horizon = rng.uniform(0.72, 0.85)
    elif kind in (0, 1) and rng.random() < 0.6:
        _mountains(c, rng, height=rng.uniform(0.1, 0.2), snow=False)
        horizon = rng.uniform(0.55, 0.7)
    else:
        horizon = rng.uniform(0.55, 0.7)
    if kind == 1:  # sea, then a beach strip
        _textured_band(c, rng, horizon, _hsv(rng.uniform(0.52, 0.6), 0.7, rng.uniform(0.5, 0.8)), "water", True)
        for _ in range(rng.randint(1, 3)):
            _boat(c, rng, rng.uniform(0.1, 0.9) * big, (horizon + rng.uniform(0.03, 0.15)) * big,
                  rng.uniform(0.04, 0.08) * big)
        beach = rng.uniform(0.82, 0.9)
        _textured_band(c, rng, beach, _hsv(rng.uniform(0.1, 0.14), 0.45, 0.9), "ground", False)
    elif kind == 3:
        ground = horizon * big
        x = -rng.uniform(0, 0.1) * big
        while x < big:
            w = rng.uniform(0.1, 0.22) * big
            _tower(c, rng, x, w, rng.uniform(0.2, 0.55) * big, ground)
            x += w + rng.uniform(0.0, 0.05) * big
        _textured_band(c, rng, horizon, (40, 40, 50), "ground", False)
    else:
        ground_col = _hsv(rng.uniform(0.2, 0.33), rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.75))
        if kind == 2 and rng.random() < 0.5:
            ground_col = (235, 240, 245)  # snowfield
        _textured_band(c, rng, horizon, ground_col, "ground", False)
        objects = []
        for _ in range(rng.randint(2, 7)):
            y = rng.uniform(horizon + 0.05, 0.98)
            objects.append((y, rng.uniform(0.05, 0.95), "house" if kind == 0 and rng.random() < 0.35 else "tree"))
        for y, x, what in sorted(objects):  # far first
            extent = (0.08 + 0.25 * (y - horizon)) * big  # nearer objects are larger
            if what == "house":
                _house(c, rng, x * big, y * big, extent, lit=False)
            else:
                _tree(c, rng, x * big, y * big, extent)
    img = c.img.resize((size, size), Image.LANCZOS)
    seg = c.seg.resize((size, size), Image.NEAREST)
    return img, seg, kind
