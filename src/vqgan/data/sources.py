"""Turn `data.path` into a list of image sources: a folder (recursive) or the built-in scenes.

`kind` picks how files are read: RGB images, or label / depth maps for condition tokenizers. The built-in
scenes come with their class labels (`SCENE_CLASSES`), their segmentation maps (`builtin:scenes-seg`) and
depth maps derived from those (`builtin:scenes-depth`), row for row.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .images import ImageSource, load_rgb, scan_images
from .maps import load_depth_map, load_label_map
from .scenes import SCENE_CLASSES, depth_from_segmentation, render_scene

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = {"scenes": "rgb", "scenes-seg": "segmentation", "scenes-depth": "depth"}  # name -> kind
LOADERS = {"rgb": load_rgb, "segmentation": load_label_map, "depth": load_depth_map}


@functools.lru_cache(maxsize=16)
def _render(index: int, size: int):
    return render_scene(index, size)  # a scene and its maps are read together: draw it once


def _builtin_scene(index: int, size: int, kind: str):
    image, seg, _ = _render(index, size)
    if kind == "depth":  # only when asked: it costs three times the drawing
        return depth_from_segmentation(seg)
    return image if kind == "rgb" else seg


def image_sources(path: str, builtin_count: int = 1024, builtin_size: int = 64, kind: str = "rgb"
                  ) -> tuple[list[ImageSource], int]:
    """(sources sorted by name, number of unreadable files skipped while scanning)."""
    sources, bad = sources_and_unreadable(path, builtin_count, builtin_size, kind)
    return sources, len(bad)


def sources_and_unreadable(path: str, builtin_count: int = 1024, builtin_size: int = 64, kind: str = "rgb"
                           ) -> tuple[list[ImageSource], list[Path]]:
    """(sources sorted by name, the files the scan could not read)."""
    if not path:
        from ..errors import UserError

        raise UserError("data.path is not set: give a folder of images (data.path=DIR) or builtin:scenes")
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if BUILTIN_SETS.get(name) != kind:
            from ..errors import UserError

            fits = [f"builtin:{n}" for n, k in BUILTIN_SETS.items() if k == kind]
            raise UserError(f"built-in data set {path!r} does not fit input kind {kind!r}; use {', '.join(fits)}")
        return [ImageSource(f"scene_{i:05d}", (lambda i=i: _builtin_scene(i, builtin_size, kind)),
                            label=i % len(SCENE_CLASSES)) for i in range(builtin_count)], []
    sizes: dict = {}
    good, bad = scan_images(Path(path).expanduser(), sizes)
    load = LOADERS[kind]
    return [ImageSource(str(p), (lambda p=p: load(p)), size=sizes.get(p)) for p in good], bad
