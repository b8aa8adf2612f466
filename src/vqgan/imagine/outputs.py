"""What a run leaves in `--out`: PNGs, the animation (GIF; MP4 where an ffmpeg is found), log.jsonl and the
run's HTML page. Each file is written under a temporary name and renamed into place: a reader never sees half
a file, and a folder the user names keeps its other files."""
from __future__ import annotations

import html
import json
import logging
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from PIL import Image

from ..checkpoint import atomic_file
from ..eval.report import image_grid, line_plot, table, to_uint8, write_report
from .prompts import unique_names

log = logging.getLogger("vqgan.imagine")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> a PIL image."""
    return Image.fromarray(to_uint8(image)[0])


def write_text(path: Path, text: str) -> Path:
    return atomic_file(path, lambda p: p.write_text(text))


def save_picture(picture: Image.Image, path: Path) -> Path:
    return atomic_file(path, lambda p: picture.save(p, format="PNG"))


def save_png(image: torch.Tensor, path: Path) -> Path:
    return save_picture(to_pil(image), path)


def find_ffmpeg() -> str | None:
    """The ffmpeg binary that the `imageio-ffmpeg` package ships (pip install imageio-ffmpeg: no system package
    needed), else `ffmpeg` on PATH, else None."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return shutil.which("ffmpeg")
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()  # its own binary, else a system one
    except RuntimeError:  # a platform it ships no binary for, and none on PATH
        return None


def save_animation(frames: list[Image.Image], out: Path, fps: int = 10) -> list[Path]:
    """animation.gif (Pillow), and animation.mp4 when an ffmpeg is found (its default MP4 encoder: H.264)."""
    if not frames:
        return []
    written = [atomic_file(out / "animation.gif", lambda p: frames[0].save(
        p, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0))]
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        log.info("no ffmpeg found (pip install imageio-ffmpeg, or put ffmpeg on PATH): animation.gif only, "
                 "no animation.mp4")
        return written
    with tempfile.TemporaryDirectory() as tmp:
        for i, frame in enumerate(frames):
            frame.save(Path(tmp) / f"{i:05d}.png")
        w, h = frames[0].size

        def encode(p: Path) -> None:  # yuv420p, which every player reads, needs even sides
            subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-framerate", str(fps), "-i",
                            str(Path(tmp) / "%05d.png"), "-vf", f"scale={w // 2 * 2}:{h // 2 * 2}",
                            "-pix_fmt", "yuv420p", "-f", "mp4", str(p)],
                           check=True, capture_output=True, text=True)

        try:
            written.append(atomic_file(out / "animation.mp4", encode))
        except subprocess.CalledProcessError as e:  # an ffmpeg without an MP4 encoder: the GIF stays
            why = (e.stderr or "").strip().splitlines()
            log.warning("%s could not write animation.mp4 (%s): animation.gif only", ffmpeg,
                        why[-1][:160] if why else f"exit status {e.returncode}")
        except OSError as e:  # a path that is no program (IMAGEIO_FFMPEG_EXE set wrong)
            log.warning("%s cannot run (%s): animation.gif only", ffmpeg, e.strerror or type(e).__name__)
    return written


# what one run writes under numbered or optional names: a later run in the folder may not write the same ones
EARLIER_RUN_FILES = ("steps/step_*.png", "frames/frame_*.png", "animation.gif", "animation.mp4")


def clear_earlier_run(out: Path) -> int:
    """Remove the step pictures, frames and animations an earlier run left in `out` (only those names), so that the
    folder holds one run: a shorter run, or one without --save-every, would otherwise leave the earlier run's later
    steps or frames beside its own. Returns how many files went."""
    removed = 0
    for pattern in EARLIER_RUN_FILES:
        for path in sorted(out.glob(pattern)):
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
    if removed:
        log.info("%s: removed %d step pictures, frames or animations of an earlier run", out, removed)
    return removed


class RunLog:
    """log.jsonl: one JSON object per step (step, loss, similarity per prompt, lr; frame in video mode). An earlier
    run's log in the folder is replaced at the first step, with its step pictures, frames and animations
    (`clear_earlier_run`), so a run stopped before it leaves the folder as it was. A folder without a log.jsonl
    held no run: files there under those names are someone else's, and stay."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == 1:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                clear_earlier_run(self.path.parent)
        with open(self.path, "w" if len(self.rows) == 1 else "a") as f:
            f.write(json.dumps(row) + "\n")


MAX_FRAME_MARKS = 20  # beyond this many frames their lines would hide the curves


def chart_marks(result: dict, rows: list[dict]) -> list[tuple[float, str]]:
    """Where each scene after the first starts, and each frame of a video after the first (up to MAX_FRAME_MARKS
    frames), as (step, label) for the charts."""
    marks = [(scene["start"] * result["steps"], f"scene {i}") for i, scene in enumerate(result["story"], 1)
             if scene["start"] > 0]
    starts = {}
    for i, row in enumerate(rows):
        starts.setdefault(row.get("frame", 0), i)
    if 1 < len(starts) <= MAX_FRAME_MARKS + 1:
        marks += [(i, f"frame {frame}") for frame, i in starts.items() if frame > 0]
    return marks


def write_page(out: Path, result: dict, rows: list[dict], frames: list[tuple[str, torch.Tensor]]) -> Path:
    """report.html: prompts, settings, seed, the CLIP weights (file and sha256), frames and the loss curve."""
    steps = list(range(len(rows)))
    losses = {"loss": (steps, [r["loss"] for r in rows])}
    if any(r.get("clip_loss", r["loss"]) != r["loss"] for r in rows):  # --init-weight adds its pull to the loss
        losses["prompts alone (without the init pull)"] = (steps, [r.get("clip_loss") for r in rows])
    curves = {}
    labels = list(dict.fromkeys(k for r in rows for k in r["similarity"]))  # every scene's prompts, in order
    for label, name in zip(labels, unique_names(labels, 28)):
        curves[f"sim {name}"] = (steps, [r["similarity"].get(label) for r in rows])
    marks = chart_marks(result, rows)
    save_picture(line_plot(losses, "loss (all steps in order)", marks=marks), out / "loss.png")
    save_picture(line_plot(curves, "cosine similarity of the cutouts with each prompt", marks=marks),
                 out / "similarity.png")
    shown = frames[-12:] if len(frames) > 12 else frames
    if shown:
        per_row = 6
        batch = [f for _, f in shown]
        grid_rows = [torch.cat(batch[i:i + per_row]) for i in range(0, len(batch), per_row)]
        scale = max(1, math.ceil(128 / batch[0].shape[-1]))
        save_picture(image_grid(grid_rows, scale=scale), out / "frames.png")
    prompts = [{"scene start": s["start"], "prompt": p["label"], "kind": p["kind"], "weight": p["weight"],
                "stop": p["stop"]} for s in result["story"] for p in s["prompts"]]
    settings = [{"setting": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
                for k, v in result["settings"].items()]
    clips = [{k: c.get(k, "") for k in ("model", "pretrained", "activation", "file", "sha256", "checked")}
             for c in result["clip"]]
    names = ", ".join(html.escape(n) for n, _ in shown)
    animations = {Path(p).name for p in result["animation"]}  # this run's, not a file an earlier run left
    sections = [
        ("Result", "<img src='final.png' style='min-width:256px'>" + (
            f"<p class=note>Interrupted after {result['stopped_at']} of {result['steps']} steps: this is the image "
            "as it stood then.</p>" if result.get("stopped_at") is not None else "")),
        ("Prompts", table(prompts)),
        ("Settings", table(settings) + f"<p class=note>seed {result['seed']} on {html.escape(result['device'])}: "
                                       "the same seed gives the same image on the same device and software</p>"),
        ("CLIP weights", table(clips) + "<p class=note>Images are only as good as these weights: random or "
                                        "wrong weights steer toward nothing a person would recognise.</p>"),
        ("Frames", f"<p class=note>{names}</p><img src='frames.png'>" + (
            "<p><img src='animation.gif'></p>" if "animation.gif" in animations else "") + (
            "<p><a href='animation.mp4'>animation.mp4</a></p>" if "animation.mp4" in animations else "")),
        ("Loss", "<img src='loss.png'><img src='similarity.png'>"),
    ]
    return write_report(out / "report.html", "vqgan imagine", sections)  # itself atomic
