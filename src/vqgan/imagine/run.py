"""A `vqgan imagine` run: load the tokenizer and CLIP, check the request, optimise (one image, a story, or a
zoom/pan video), write the outputs."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..checkpoint import load_model
from ..errors import UserError
from ..userinput import resolve_device
from . import memory
from .clip_models import ClipModel, ClipSpec, load_clip
from .latents import Steerable
from .optimise import OptimiseConfig, Optimiser, Targets
from .outputs import RunLog, save_animation, save_png, to_pil, write_page, write_text
from .prompts import Prompt, Story, unique_names


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
    save_every: int = 50
    init_image: Path | None = None
    device: str | None = None
    clips: list[ClipSpec] = field(default_factory=lambda: [ClipSpec()])
    optimise: OptimiseConfig = field(default_factory=OptimiseConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    progress: bool = True


def read_image(path: Path, size: tuple[int, int], crop: bool) -> torch.Tensor:
    """An image file -> (1, 3, H, W) in [0, 1] at `size` (width, height); `crop`: centre crop to the aspect first."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    if crop:
        w, h = img.size
        scale = max(size[0] / w, size[1] / h)
        cw, ch = round(size[0] / scale), round(size[1] / scale)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    img = img.resize(size, Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def shift_and_zoom(image: torch.Tensor, zoom: float, pan: tuple[float, float]) -> torch.Tensor:
    """(1, 3, H, W): zoom in by `zoom` about the centre and move the content by `pan` pixels (x, y)."""
    _, _, h, w = image.shape
    theta = torch.tensor([[1 / zoom, 0.0, -2 * pan[0] / w], [0.0, 1 / zoom, -2 * pan[1] / h]],
                         dtype=image.dtype, device=image.device)[None]
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _size_of(cfg: ImagineConfig, model: torch.nn.Module) -> tuple[int, int]:
    if cfg.size is not None:
        return cfg.size
    r = int(getattr(model.config, "resolution", 256))
    return r, r


def memory_trial(steer: Steerable, clips: list[ClipModel], targets: Targets, cfg: ImagineConfig,
                 prompts: tuple[Prompt, ...], device: torch.device):
    """One optimisation step at (width, height, cutn) from noise on `device`: what the memory check measures."""
    gen = torch.Generator().manual_seed(0)

    def trial(width: int, height: int, cutn: int) -> None:
        latents = [z.to(device) for z in steer.noise(width, height, gen)]
        opt = Optimiser(steer, clips, targets, dataclasses.replace(cfg.optimise, cutn=cutn), latents, None, gen)
        opt.step(0, 1, prompts)

    return trial


def check_memory(steer: Steerable, clips: list[ClipModel], targets: Targets, cfg: ImagineConfig,
                 size: tuple[int, int], prompts: tuple[Prompt, ...], device: torch.device) -> float | None:
    """On CUDA: three one-step trials fit the memory model; a request that does not fit is a one-line error."""
    if device.type != "cuda":
        return None
    trial = memory_trial(steer, clips, targets, cfg, prompts, device)
    model = memory.fit(memory.cuda_measure(trial, device), steer.factor, cfg.optimise.cutn)
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.empty_cache()
    return memory.check_fits(model, *size, cfg.optimise.cutn, free + torch.cuda.memory_reserved(device),
                             steer.factor)


def check_settings(cfg: ImagineConfig) -> None:
    """Every number of the request checked before any work: a bad one is a one-line error naming the option."""
    o, v = cfg.optimise, cfg.video
    rules = [("--steps", o.steps, 1, "at least 1"), ("--cutn", o.cutn, 1, "at least 1"),
             ("--save-every", cfg.save_every, 0, "at least 0 (0: off)"), ("--frames", v.frames, 0, "at least 0"),
             ("--init-weight", o.init_weight, 0, "at least 0 (0: no pull)"),
             ("--lr-end", o.lr_end, 0, "at least 0 (a fraction of --lr)"), ("--fps", v.fps, 1, "at least 1")]
    if v.frames:
        rules.append(("--frame-steps", v.frame_steps, 1, "at least 1"))
    else:
        still = VideoConfig()
        for name, value, default in (("--zoom", v.zoom, still.zoom), ("--pan", tuple(v.pan), still.pan),
                                     ("--frame-steps", v.frame_steps, still.frame_steps)):
            if value != default:
                raise UserError(f"{name} shapes a zoom/pan video: add --frames N (the frames after the first), or "
                                f"drop {name}")
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


def imagine(cfg: ImagineConfig, clips: list[ClipModel] | None = None) -> dict:
    """Run it; returns a summary (paths, seed, final similarities, CLIP weights used). `clips`: already loaded
    models (tests, or a caller running several prompts)."""
    check_settings(cfg)
    device = resolve_device(cfg.device)
    o = cfg.optimise
    model = load_model(cfg.tokenizer, map_location=device)
    steer = Steerable(model)
    size = _size_of(cfg, model)
    steer.check_size(*size)
    clips = clips or [load_clip(spec, device) for spec in cfg.clips]

    def prompt_image(p: Prompt, side: int) -> torch.Tensor:
        return read_image(p.image, (side, side), crop=True)

    targets = Targets(clips, cfg.story.prompts, prompt_image)
    predicted = check_memory(steer, clips, targets, cfg, size, cfg.story.scenes[0].prompts, device)

    torch.manual_seed(cfg.seed)  # anything drawing from the global generator (the cutouts use `generator`)
    generator = torch.Generator().manual_seed(cfg.seed)  # the noise start, the cutouts and their augmentations
    if cfg.init_image is not None:
        latents = steer.encode(read_image(cfg.init_image, size, crop=True).to(device) * 2 - 1)
    else:
        latents = [z.to(device) for z in steer.noise(*size, generator)]

    out = Path(cfg.out)
    log = RunLog(out / "log.jsonl")
    video = cfg.video
    total = o.steps + video.frames * video.frame_steps
    frames: list[tuple[str, torch.Tensor]] = []
    labels = list(targets.labels.values())
    short = dict(zip(labels, unique_names(labels, 12)))  # the progress bar's names, distinct over the story
    bar = tqdm(total=total, disable=not cfg.progress, desc="imagine", dynamic_ncols=True)
    done, opt, stopped = 0, None, None
    try:
        for frame in range(video.frames + 1):
            steps = o.steps if frame == 0 else video.frame_steps
            # the pull is toward this frame's own start: the init image, or the previous frame shifted and zoomed
            pull = latents if cfg.init_image is not None or frame > 0 else None
            opt = Optimiser(steer, clips, targets, o, latents, pull, generator)
            for step in range(steps):
                scene = cfg.story.at(done / total)
                row = opt.step(step, steps, scene.prompts)
                row.update({"frame": frame} if video.frames else {}, global_step=done)
                log.add(row)
                done += 1
                bar.update(1)
                bar.set_postfix({"loss": f"{row['loss']:.3f}",
                                 **{short[k]: f"{v:.3f}" for k, v in row["similarity"].items()}})
                if not video.frames and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    name = f"step_{step + 1:05d}"
                    frames.append((name, opt.current().cpu()))
                    save_png(frames[-1][1], out / "steps" / f"{name}.png")
            image = opt.current()
            if video.frames:
                frames.append((f"frame_{frame:05d}", image.cpu()))
                save_png(image, out / "frames" / f"frame_{frame:05d}.png")
                latents = steer.encode(shift_and_zoom(image, video.zoom, video.pan))
    except KeyboardInterrupt:  # Ctrl-C: keep what the run has made (the page says where it stopped)
        if opt is None or done == 0:
            raise
        stopped, image = done, opt.current()
    bar.close()
    final = image.cpu()
    if not video.frames:
        frames.append(("final", final))
    save_png(final, out / "final.png")
    animation = save_animation([to_pil(f) for _, f in frames], out, video.fps) if len(frames) > 1 else []
    result = {
        "final": str(out / "final.png"), "seed": cfg.seed, "device": str(device), "size": list(size),
        "steps": total, "stopped_at": stopped, "final_similarity": log.rows[-1]["similarity"],
        "animation": [str(p) for p in animation],
        "clip": [c.source for c in clips],
        "story": [{"start": s.start, "prompts": [
            {"label": targets.labels[p], "kind": "image" if p.image else "text", "weight": p.weight,
             "stop": None if p.stop == float("-inf") else p.stop} for p in s.prompts]} for s in cfg.story.scenes],
        "settings": {"tokenizer": str(cfg.tokenizer), "size": list(size), "init_image": str(cfg.init_image or ""),
                     **dataclasses.asdict(o), **({f"video_{k}": v for k, v in dataclasses.asdict(video).items()}
                                                 if video.frames else {})},
        "predicted_gpu_bytes": predicted,
    }
    result["report"] = str(write_page(out, result, log.rows, frames))
    write_text(out / "run.json", json.dumps(result, indent=1, default=str))
    return result
