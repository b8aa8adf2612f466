"""A `vqgan imagine` run: load the tokenizer and CLIP, check the request, optimise (one image, a story, or a
zoom/pan video), write the outputs."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..checkpoint import load_model
from ..data.images import load_rgb
from ..errors import UserError
from ..stopping import StopOnSignal
from ..userinput import resolve_device
from . import memory
from .clip_models import ClipModel, load_clip
from .latents import Steerable
from .optimise import Optimiser, Targets
from .outputs import RunLog, save_animation, save_png, to_pil, write_page, write_text
from .prompts import Prompt, unique_names
from .settings import ImagineConfig, check_files, check_settings

log = logging.getLogger("vqgan.imagine")


def read_image(path: Path, size: tuple[int, int], crop: bool) -> torch.Tensor:
    """An image file -> (1, 3, H, W) in [0, 1] at `size` (width, height); `crop`: centre crop to the aspect first."""
    try:
        img = load_rgb(path)  # as the training data: EXIF orientation honoured, transparency on white
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


def imagine(cfg: ImagineConfig, clips: list[ClipModel] | None = None) -> dict:
    """Run it; returns a summary (paths, seed, final similarities, CLIP weights used; `stopped_at` and
    `exit_code` when a signal stopped it). `clips`: already loaded models (tests, or a caller running several
    prompts)."""
    check_settings(cfg)
    check_files(cfg)
    device = resolve_device(cfg.device)
    model = load_model(cfg.tokenizer, map_location=device)
    steer = Steerable(model)
    size = _size_of(cfg, model)
    steer.check_size(*size)
    clips = clips or [load_clip(spec, device) for spec in cfg.clips]

    def prompt_image(p: Prompt, side: int) -> torch.Tensor:
        return read_image(p.image, (side, side), crop=True)

    targets = Targets(clips, cfg.story.prompts, prompt_image)
    for i, scene in enumerate(cfg.story.scenes):  # as parsed: `a clock at 12:30` is "a clock at 12" at weight 30
        log.info("scene %d from %g: %s", i + 1, scene.start, " | ".join(
            f"{targets.labels[p]!r} weight {p.weight:g}" + (f" stop {p.stop:g}" if p.stop > -math.inf else "")
            for p in scene.prompts))
    predicted = check_memory(steer, clips, targets, cfg, size, cfg.story.scenes[0].prompts, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, for the record beside the prediction

    torch.manual_seed(cfg.seed)  # anything drawing from the global generator (the cutouts use `generator`)
    generator = torch.Generator().manual_seed(cfg.seed)  # the noise start, the cutouts and their augmentations
    if cfg.init_image is not None:
        latents = steer.encode(read_image(cfg.init_image, size, crop=True).to(device) * 2 - 1)
    else:
        latents = [z.to(device) for z in steer.noise(*size, generator)]

    out = Path(cfg.out).resolve()
    run_log = RunLog(out / "log.jsonl")
    with StopOnSignal("finishing this step, then writing the image as it stands", log) as stop:
        final, frames = _optimise(cfg, steer, clips, targets, latents, generator, run_log, out, stop)
    video = cfg.video
    save_png(final, out / "final.png")
    animation = save_animation([to_pil(f) for _, f in frames], out, video.fps) if len(frames) > 1 else []
    result = {
        "final": str(out / "final.png"), "seed": cfg.seed, "device": str(device), "size": list(size),
        "steps": cfg.total_steps, "stopped_at": len(run_log.rows) if stop.requested else None,
        "final_similarity": run_log.rows[-1]["similarity"], "animation": [str(p) for p in animation],
        "clip": [c.source for c in clips],
        "story": [{"start": s.start, "prompts": [
            {"label": targets.labels[p], "kind": "image" if p.image else "text", "weight": p.weight,
             "stop": None if p.stop == float("-inf") else p.stop} for p in s.prompts]} for s in cfg.story.scenes],
        "settings": {"tokenizer": str(cfg.tokenizer), "size": list(size), "init_image": str(cfg.init_image or ""),
                     **dataclasses.asdict(cfg.optimise),
                     **({f"video_{k}": v for k, v in dataclasses.asdict(video).items()} if video.frames else
                        {"save_every": cfg.png_every, "fps": video.fps})},
        "predicted_gpu_bytes": predicted,
        "peak_gpu_bytes": float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    }
    if stop.requested:
        result["exit_code"] = stop.exit_code
    result["report"] = str(write_page(out, result, run_log.rows, frames))
    write_text(out / "run.json", json.dumps(result, indent=1, default=str))
    return result


def _optimise(cfg: ImagineConfig, steer: Steerable, clips: list[ClipModel], targets: Targets,
              latents: list[torch.Tensor], generator: torch.Generator, run_log: RunLog, out: Path,
              stop: StopOnSignal) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The optimisation: one image, or the frames of a video, each frame from the previous one zoomed and shifted.
    Returns the final image (CPU) and the named frames of the animation. Stops after the step in which `stop`
    was requested."""
    o, video, total = cfg.optimise, cfg.video, cfg.total_steps
    frames: list[tuple[str, torch.Tensor]] = []
    labels = list(targets.labels.values())
    short = dict(zip(labels, unique_names(labels, 12)))  # the progress bar's names, distinct over the story
    bar = tqdm(total=total, disable=not cfg.progress, desc="imagine", dynamic_ncols=True)
    done = 0
    for frame in range(video.frames + 1):
        steps = o.steps if frame == 0 else video.frame_steps
        # --init-weight pulls toward this frame's own start: the init image or noise, or the previous frame moved
        opt = Optimiser(steer, clips, targets, o, latents, latents, generator)
        for step in range(steps):
            row = opt.step(step, steps, cfg.story.at(done / total).prompts)
            row.update({"frame": frame} if video.frames else {}, global_step=done)
            run_log.add(row)
            done += 1
            bar.update(1)
            bar.set_postfix({"loss": f"{row['loss']:.3f}",
                             **{short[k]: f"{v:.3f}" for k, v in row["similarity"].items()}})
            if stop.requested:
                break
            if not video.frames and cfg.png_every and (step + 1) % cfg.png_every == 0 and step + 1 < steps:
                name = f"step_{step + 1:05d}"
                frames.append((name, opt.current().cpu()))
                save_png(frames[-1][1], out / "steps" / f"{name}.png")
        image = opt.current().cpu()
        if stop.requested:
            break
        if video.frames:
            frames.append((f"frame_{frame:05d}", image))
            save_png(image, out / "frames" / f"frame_{frame:05d}.png")
            latents = steer.encode(shift_and_zoom(image.to(latents[0].device), video.zoom, video.pan))
    bar.close()
    if not video.frames:
        frames.append(("final", image))
    return image, frames
