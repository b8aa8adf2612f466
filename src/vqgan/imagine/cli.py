"""`vqgan imagine`: the command's options and handler (registered by the package's cli.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


class _WithDefaults(argparse.HelpFormatter):
    """Each option's default after its help, where it has one the help does not already name."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or d == []:
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub) -> None:
    p = sub.add_parser("imagine", help="VQGAN+CLIP: steer a tokenizer's decoder toward text / image prompts",
                       formatter_class=_WithDefaults)
    p.add_argument("tokenizer", help="tokenizer directory (a run, a checkpoint, a converted model) or a taming .ckpt")
    p.add_argument("--prompt", default=None,
                   help="'TEXT[:WEIGHT[:STOP]] | ...', e.g. 'a red house:1 | fog:-0.5'. STOP: the spherical distance "
                        "(theta^2 / 2 for the angle theta between embeddings: 0 same, 1.23 at 90 degrees, 4.93 "
                        "opposite; a cosine of 0.3 is 0.80) below which the prompt stops pulling; a negative prompt's STOP is negative "
                        "(-1.23: stop pushing past 90 degrees)")
    p.add_argument("--story", default=None,
                   help="prompts changing over the run: scenes separated by '||', each may end with @START (0..1), "
                        "e.g. 'a red house || the sea @0.6'")
    p.add_argument("--image-prompt", action="append", default=[], help="PATH[:WEIGHT[:STOP]] (repeatable)")
    p.add_argument("--init-image", default=None, help="start from this image (default: random codes)")
    p.add_argument("--init-weight", type=float, default=0.0,
                   help="pull toward the start latents (the init image or the noise; each video frame's own start), "
                        "decaying to 0 over the run")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="multiples of the tokenizer's factor (default: its training resolution)")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps (of the first frame, in a video)")
    p.add_argument("--cutn", type=int, default=16, help="random cutouts per step")
    p.add_argument("--cut-pow", type=float, default=1.0, help="> 1 favours small cutouts, < 1 large ones")
    p.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate on the latents")
    p.add_argument("--lr-end", type=float, default=0.1, help="the rate decays to lr * this by half a cosine")
    p.add_argument("--no-augment", action="store_true", help="cutouts without flips, warps and colour jitter")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same image on the same device")
    p.add_argument("--clip-model", action="append", default=[],
                   help="open_clip model name (default ViT-B-32; OpenAI's names such as ViT-B/32 work too); repeat "
                        "for an ensemble")
    p.add_argument("--clip-weights", action="append", default=[],
                   help="its weights file: open_clip's, or OpenAI's (ViT-B-32.pt) (repeatable, one per --clip-model); "
                        "default: the Hugging Face cache, then ~/.cache/clip")
    p.add_argument("--clip-pretrained", action="append", default=[],
                   help="open_clip's tag of the weights (e.g. openai, laion2b_s34b_b79k): which set the caches are "
                        "searched for (default openai) and the activation it needs (QuickGELU for openai); give it "
                        "with an open_clip --clip-weights file; one for all models, or one per --clip-model")
    p.add_argument("--save-every", type=int, default=None,
                   help="a still image: a PNG (and an animation frame) every N steps (default 50; 0: off)")
    p.add_argument("--frames", type=int, default=0, help="zoom/pan video: this many frames after the first")
    p.add_argument("--frame-steps", type=int, default=30, help="steps per video frame after the first")
    p.add_argument("--zoom", type=float, default=1.02, help="zoom per video frame")
    p.add_argument("--pan", type=float, nargs=2, metavar=("DX", "DY"), default=(0.0, 0.0),
                   help="shift per video frame in pixels")
    p.add_argument("--fps", type=int, default=10, help="frames per second of the animation")
    p.add_argument("--out", default="imagine",
                   help="output folder: an earlier run's outputs there (found by its log.jsonl) are replaced at the "
                        "first step, its step pictures, frames and animations removed; other files are kept")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_command)


def run_command(args) -> dict:
    from .clip_models import clip_specs
    from .optimise import OptimiseConfig
    from .prompts import story_from_options
    from .run import imagine
    from .settings import ImagineConfig, VideoConfig

    story = story_from_options(args.prompt, args.story, args.image_prompt)
    cfg = ImagineConfig(
        tokenizer=args.tokenizer, story=story, out=Path(args.out).expanduser(),
        size=tuple(args.size) if args.size else None, seed=args.seed, save_every=args.save_every,
        init_image=Path(args.init_image).expanduser() if args.init_image else None,
        device=args.device, clips=clip_specs(args.clip_model, args.clip_weights, args.clip_pretrained),
        optimise=OptimiseConfig(steps=args.steps, lr=args.lr, lr_end=args.lr_end, cutn=args.cutn,
                                cut_pow=args.cut_pow, augment=not args.no_augment, init_weight=args.init_weight),
        video=VideoConfig(frames=args.frames, frame_steps=args.frame_steps, zoom=args.zoom, pan=tuple(args.pan),
                          fps=args.fps),
        progress=not args.no_progress)
    result = imagine(cfg)
    if result["stopped_at"] is not None:
        print(f"stopped after {result['stopped_at']} of {result['steps']} steps: the image as it stood is kept")
    print(f"image:  {result['final']}")
    print(f"report: {result['report']}")
    return {"exit_code": result["exit_code"]} if "exit_code" in result else {}
