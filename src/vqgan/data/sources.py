"""Turn `data.path` into a list of image sources: a folder (recursive) or the built-in scenes."""
from __future__ import annotations

from pathlib import Path

from .images import ImageSource, load_rgb, scan_images
from .scenes import render_scene

BUILTIN_PREFIX = "builtin:"


def image_sources(path: str, builtin_count: int = 1024, builtin_size: int = 64) -> tuple[list[ImageSource], int]:
    """(sources sorted by name, number of unreadable files skipped while scanning)."""
    if not path:
        from ..errors import UserError

        raise UserError("data.path is not set: give a folder of images (data.path=DIR) or builtin:scenes")
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name != "scenes":
            from ..errors import UserError

            raise UserError(f"unknown built-in data set {path!r}; available: builtin:scenes")
        return [ImageSource(f"scene_{i:05d}", (lambda i=i: render_scene(i, builtin_size)[0]))
                for i in range(builtin_count)], 0
    good, bad = scan_images(Path(path).expanduser())
    return [ImageSource(str(p), (lambda p=p: load_rgb(p))) for p in good], len(bad)
