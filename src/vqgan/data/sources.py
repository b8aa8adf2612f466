"""Turn `data.path` into a list of image sources: a folder (recursive) or the built-in scenes.

`kind` picks how files are read: RGB images, or label / depth maps for condition tokenizers. The built-in
scenes come with their class labels (`SCENE_CLASSES`) and their segmentation maps (`builtin:scenes-seg`),
row for row.
"""
from __future__ import annotations

from pathlib import Path

from .images import ImageSource, load_rgb, scan_images
from .maps import load_depth_map, load_label_map
from .scenes import SCENE_CLASSES, render_scene

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = {"scenes": 0, "scenes-seg": 1}  # name -> which part of render_scene's output
_LOADERS = {"rgb": load_rgb, "segmentation": load_label_map, "depth": load_depth_map}


def image_sources(path: str, builtin_count: int = 1024, builtin_size: int = 64, kind: str = "rgb"
                  ) -> tuple[list[ImageSource], int]:
    """(sources sorted by name, number of unreadable files skipped while scanning)."""
    if not path:
        from ..errors import UserError

        raise UserError("data.path is not set: give a folder of images (data.path=DIR) or builtin:scenes")
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        part = BUILTIN_SETS.get(name)
        if part is None or (part == 1) != (kind == "segmentation"):
            from ..errors import UserError

            fits = [f"builtin:{n}" for n, k in BUILTIN_SETS.items() if (k == 1) == (kind == "segmentation")]
            raise UserError(f"built-in data set {path!r} does not fit input kind {kind!r}; use {', '.join(fits)}")
        return [ImageSource(f"scene_{i:05d}", (lambda i=i: render_scene(i, builtin_size)[part]),
                            label=i % len(SCENE_CLASSES)) for i in range(builtin_count)], 0
    good, bad = scan_images(Path(path).expanduser())
    load = _LOADERS[kind]
    return [ImageSource(str(p), (lambda p=p: load(p))) for p in good], len(bad)
