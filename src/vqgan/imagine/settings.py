"""What a `vqgan imagine` run is asked to do, and the checks that refuse a bad request before any work: every
number, options that would be ignored, scenes that would get no step, the output folder and the image files."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .clip_models import ClipSpec
from .optimise import OptimiseConfig
from .prompts import Story

SAVE_EVERY = 50  # a still run's default: a PNG (and an animation frame) every 50 steps


@dataclass
class VideoConfig:
    """Zoom/pan video: after the first image, `frames` more, each starting from the previous one zoomed by `zoom`
    and shifted by `pan` pixels (x, y), then optimised `frame_steps` steps. 0 frames: one image."""

    frames: int = 0
    frame_steps: int = 30
    zoom: float = 1.02
    pan: tuple[float, float] = (0.0, 0.0)
    fps: int = 10


@dataclass
class ImagineConfig:
    tokenizer: str
    story: Story
    out: Path = Path("imagine")
    size: tuple[int, int] | None = None  # (width, height); default the tokenizer's training resolution
    seed: int = 0
    save_every: int | None = None  # a still run: SAVE_EVERY when not given; a video saves its frames instead
    init_image: Path | None = None
    device: str | None = None
    clips: list[ClipSpec] = field(default_factory=lambda: [ClipSpec()])
    optimise: OptimiseConfig = field(default_factory=OptimiseConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    progress: bool = True

    @property
    def total_steps(self) -> int:
        return self.optimise.steps + self.video.frames * self.video.frame_steps

    @property
    def png_every(self) -> int:
        """Steps between the PNGs of a still run (0: none)."""
        return SAVE_EVERY if self.save_every is None else self.save_every


def check_settings(cfg: ImagineConfig) -> None:
    """Every number of the request, and the options it would ignore: a one-line error naming the option."""
    o, v = cfg.optimise, cfg.video
    rules = [("--steps", o.steps, 1, "at least 1"), ("--cutn", o.cutn, 1, "at least 1"),
             ("--save-every", cfg.png_every, 0, "at least 0 (0: off)"), ("--frames", v.frames, 0, "at least 0"),
             ("--init-weight", o.init_weight, 0, "at least 0 (0: no pull)"),
             ("--lr-end", o.lr_end, 0, "at least 0 (a fraction of --lr)"), ("--fps", v.fps, 1, "at least 1")]
    if v.frames:
        rules.append(("--frame-steps", v.frame_steps, 1, "at least 1"))
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed {cfg.seed}: must lie in 0..2^63-1")
    for name, value, least, rule in rules:
        if not math.isfinite(value) or value < least:
            raise UserError(f"{name} {value:g}: must be {rule}")
    positive = [("--lr", o.lr, "e.g. 0.1"), ("--cut-pow", o.cut_pow, "1 draws sizes evenly; > 1 favours small cutouts")]
    if v.frames:
        positive.append(("--zoom", v.zoom, "1 keeps the scale, > 1 zooms in, < 1 out"))
    for name, value, hint in positive:
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{name} {value:g}: must be above 0 ({hint})")
    if not all(math.isfinite(x) for x in v.pan):
        raise UserError(f"--pan {v.pan[0]:g} {v.pan[1]:g}: must be finite pixel shifts")
    _check_ignored(cfg)
    _check_scenes(cfg)


def _check_ignored(cfg: ImagineConfig) -> None:
    """Options that would change nothing in this run are refused, not silently dropped."""
    v, still = cfg.video, VideoConfig()
    if not v.frames:
        for name, value, default in (("--zoom", v.zoom, still.zoom), ("--pan", tuple(v.pan), still.pan),
                                     ("--frame-steps", v.frame_steps, still.frame_steps)):
            if value != default:
                raise UserError(f"{name} shapes a zoom/pan video: add --frames N (the frames after the first), or "
                                f"drop {name}")
    elif cfg.save_every is not None:
        raise UserError("--save-every is for a still image: a video saves every frame (frames/); drop it")


def _check_scenes(cfg: ImagineConfig) -> None:
    """Each scene of a story must be in force for at least one step of the run."""
    total = cfg.total_steps
    used = {id(cfg.story.at(step / total)) for step in range(total)}
    for i, scene in enumerate(cfg.story.scenes):
        if id(scene) not in used:
            raise UserError(f"--story: scene {i + 1} starts @{scene.start:g} and gets none of the run's {total} "
                            "steps; start it earlier or run more steps")


def check_files(cfg: ImagineConfig) -> None:
    """The output folder can be written, and the init and prompt images read: checked before anything loads."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make that folder ({e.strerror or type(e).__name__})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder is not writable")
    images = [("--init-image", cfg.init_image)] if cfg.init_image is not None else []
    images += [("--image-prompt", p.image) for p in cfg.story.prompts if p.image is not None]
    for option, path in images:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{option} {path}: not a readable image ({str(e).splitlines()[0][:120]})") from None
