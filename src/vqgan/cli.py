"""The `vqgan` command line. Bad input: one line on stderr naming the file or option, exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError
from .parallel import is_first_process
from .presets import preset_names


def _train_tokenizer(args) -> dict:
    from .config import TokenizerTrainConfig, load_config
    from .eval.metrics import quality_summary
    from .eval.report import tokenizer_report
    from .presets import resolve_config_path
    from .train.stage1 import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, resolve_config_path(args.config), args.overrides)
    result = train_tokenizer(cfg, resume=args.resume, progress=not args.no_progress)
    if result.get("stopped"):
        return _stopped(result, args)
    if is_first_process():  # under torchrun only rank 0 reports
        report = tokenizer_report(cfg.train.out_dir, result)
        print(quality_summary(result))
        print(f"report: {report.resolve()}")
        print(f"model:  {(report.parent / 'model').resolve()}")
    return {}


def _stopped(result: dict, args) -> dict:
    """A run stopped by a signal (or its launcher gone) before its last step: no final model, a checkpoint."""
    if is_first_process():
        again = " ".join(["vqgan", args.command, args.config, *args.overrides, "--resume"])
        print(f"stopped at step {result['step']} before the end: no final model yet; checkpoint "
              f"{result['checkpoint']}\ncontinue with: {again}", file=sys.stderr)
    return {"exit_code": result["exit_code"]}


def _demo(args) -> dict:
    from .demo import run_demo

    result = run_demo(args.out, args.steps, progress=not args.no_progress, overrides=args.overrides, quick=args.quick)
    print(f"report: {Path(result['report']).resolve()}")
    return {}


def _encode(args) -> dict:
    from .inference import encode_folder

    return encode_folder(args.model, args.images, args.out, args.batch_size, args.crop, args.resolution,
                         args.device, progress=not args.no_progress, builtin_count=args.count)


def _decode(args) -> dict:
    from .inference import decode_tokens

    return decode_tokens(args.model, args.tokens, args.out, args.batch_size, args.device, args.force,
                         progress=not args.no_progress)


def _reconstruct(args) -> dict:
    from .inference import reconstruct_folder

    return reconstruct_folder(args.model, args.images, args.out, args.batch_size, args.crop, args.resolution,
                              args.device, progress=not args.no_progress, builtin_count=args.count)


def _train_transformer(args) -> dict:
    from .config import load_config
    from .presets import resolve_config_path
    from .train.stage2 import TransformerTrainConfig, train_prior

    source = {} if args.config == "-" else resolve_config_path(args.config)
    cfg = load_config(TransformerTrainConfig, source, args.overrides)
    result = train_prior(cfg, resume=args.resume, progress=not args.no_progress)
    if result.get("stopped"):
        return _stopped(result, args)
    if is_first_process():
        from .eval.report import prior_report

        report = prior_report(result["out"], result)
        print(f"held-out NLL {result['nll']:.4f} nats/token; model: {Path(result['out']) / 'model'}")
        print(f"report: {report.resolve()}")
    return {}


def _sample(args) -> dict:
    from .generate import open_prior as load_prior
    from .generate import sample_images, write_grid, write_images
    from .userinput import at_least, output_dir, resolve_device, sampling_options

    sampling = sampling_options(args)
    at_least(args.batch_size, 1, "--batch-size")
    device, out = resolve_device(args.device), output_dir(args.out, "output folder")
    prior = load_prior(args.model, args.tokenizer, device, force=args.force)
    images, shown = sample_images(prior, args.n, args.label, args.size, args.cond_map, args.seed,
                                  progress=not args.no_progress, batch_size=args.batch_size, **sampling)
    write_images(images, out)
    write_grid(([shown] if shown is not None else []) + [images], out / "samples.png")
    return {"out": str(out), "count": args.n, "size": list(images.shape[2:])}


def _complete(args) -> dict:
    import torch
    from tqdm import tqdm

    from .data.images import ImageDataset
    from .data.maps import to_display
    from .data.sources import image_sources
    from .data.tokens import match_maps
    from .generate import complete_images, write_grid, write_images
    from .generate import open_prior as load_prior
    from .userinput import at_least, output_dir, resolve_device, sampling_options

    sampling = sampling_options(args)
    at_least(args.n_images, 1, "--n-images")
    device, out = resolve_device(args.device), output_dir(args.out, "output folder")
    prior = load_prior(args.model, args.tokenizer, device, force=args.force)
    if prior.layout.spatial and not args.cond_maps:
        raise UserError(f"this prior is conditioned on {prior.cond_tokenizer.config.input_kind} maps: pass "
                        "--cond-maps DIR (maps named like the images, or builtin:scenes-seg)")
    if args.cond_maps and not prior.layout.spatial:
        raise UserError("this prior is not conditioned on maps; leave out --cond-maps")
    box = None
    if args.box:
        try:
            box = tuple(float(v) for v in args.box.split(","))
            assert len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        except (ValueError, AssertionError):
            raise UserError(f"--box {args.box!r}: expected TOP,LEFT,BOTTOM,RIGHT as fractions 0..1") from None
    if not 0.0 <= args.keep <= 1.0:
        raise UserError(f"--keep {args.keep}: expected a fraction of the rows between 0 and 1")
    f = prior.tokenizer.downsample_factor
    sources, _ = image_sources(args.images, builtin_count=args.n_images, builtin_size=prior.grid[0] * f)
    sources = sources[:args.n_images]
    common = dict(resolution=prior.grid[0] * f, crop="center", flip=False, train=False)
    kind, maps = None, None
    if args.cond_maps:  # each image's map, cropped alike
        kind = prior.cond_tokenizer.config.input_kind
        sources, map_sources = match_maps(sources, args.images, args.cond_maps, kind, common["resolution"])
        maps = ImageDataset(map_sources, kind=kind, n_labels=prior.cond_tokenizer.config.in_channels, **common)
    images = ImageDataset(sources, **common)
    # an image and its map are read together: an unreadable one drops the pair, never shifts the pairing
    pairs = [(x, m) for x, m in ((images.read(i), maps.read(i) if maps else None) for i in range(len(images)))
             if x is not None and (maps is None or m is not None)]
    if not pairs:
        raise UserError(f"no readable image{' with a readable map' if maps else ''} in {args.images}")
    rows = []
    bar = tqdm(total=len(pairs), desc="complete", unit="image", disable=args.no_progress)
    for start in range(0, len(pairs), 8):
        batch = torch.stack([x for x, _ in pairs[start:start + 8]])
        map_images = torch.stack([m for _, m in pairs[start:start + 8]]) if maps else None
        # each batch its own seed, so that batches do not repeat one another's noise
        masked, outs = complete_images(prior, batch, args.n, args.keep, box, args.label, args.seed + start,
                                       maps=map_images, on_image=bar.update, **sampling)
        for i in range(masked.shape[0]):
            shown = [] if map_images is None else [to_display(map_images[i:i + 1], kind).to(masked.device)]
            rows.append(torch.cat([*shown, batch[i:i + 1].to(masked.device), masked[i:i + 1], outs[i]]))
            write_images(outs[i], out, stem=f"completion_{len(rows) - 1:03d}")
    bar.close()
    headers = [*(["map"] if maps else []), "image", "kept", *(f"sample {j + 1}" for j in range(args.n))]
    write_grid(rows, out / "completions.png", headers=headers)
    return {"out": str(out), "images": len(rows), "completions_per_image": args.n, "skipped": len(images) - len(pairs)}


def _tokenize(args) -> dict:
    from .data.tokens import tokenize_folder

    return tokenize_folder(args.model, args.images, args.out, args.batch_size, args.crops, args.labels, args.device,
                           progress=not args.no_progress, cond_maps=args.cond_maps,
                           cond_tokenizer=args.cond_tokenizer, builtin_count=args.count)


def _convert(args) -> dict:
    from .convert import convert

    return convert(args.checkpoint, args.out, args.config, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqgan", description="VQGAN image tokenizers and token-based generators")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a VQGAN tokenizer on a folder of images")
    t.add_argument("config", help=f"YAML config file or preset name ({', '.join(preset_names())})")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.path=~/photos train.steps=2000")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train_tokenizer)

    d = sub.add_parser("demo", help="both stages on the built-in scenes, with samples and an HTML report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=0, help="image tokenizer steps (default: the preset's)")
    d.add_argument("--resume", action="store_true", help="(always on: finished stages are skipped)")
    d.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not a result")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=_demo)

    for name, helptext, fn in (("encode", "images -> token files", _encode),
                               ("reconstruct", "images -> reconstructions + PSNR per image", _reconstruct)):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("model", help="tokenizer directory (a run, a checkpoint, or a converted model)")
        e.add_argument("images", help="image file or folder (recursive), or builtin:scenes")
        e.add_argument("out", help="output directory (reconstruct: mirrors the input's sub-folders)")
        e.add_argument("--batch-size", type=int, default=16)
        e.add_argument("--crop", choices=["center", "resize"], default="center")
        e.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's training resolution")
        e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
        e.add_argument("--count", type=int, default=1024, help="images taken from built-in data")
        e.add_argument("--no-progress", action="store_true")
        e.set_defaults(func=fn)

    g = sub.add_parser("train-transformer", help="train the GPT prior on a token store")
    g.add_argument("config", help=f"YAML config file, preset name ({', '.join(preset_names('prior'))}), or '-' "
                                  "for defaults")
    g.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.tokens=store/ train.steps=2000")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=_train_transformer)

    m = sub.add_parser("sample", help="sample images from a trained (or converted) transformer prior")
    m.add_argument("model", help="prior directory (a train-transformer run or `vqgan convert` output)")
    m.add_argument("out", help="output directory for PNGs")
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--batch-size", type=int, default=16, help="samples drawn together")
    m.add_argument("--label", default=None, help="class name or id (class-conditional priors)")
    m.add_argument("--size", default=None,
                   help="HEIGHTxWIDTH in pixels; larger than the training size samples with a sliding window")
    m.add_argument("--cond-map", default=None,
                   help="segmentation / depth map file (map-conditioned priors); its size sets the output size")
    m.add_argument("--tokenizer", default=None, help="default: the one the prior records")
    m.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("complete", help="complete images: keep their top rows (or all but a box), sample the rest")
    c.add_argument("model", help="prior directory")
    c.add_argument("images", help="image file or folder, or builtin:scenes")
    c.add_argument("out")
    c.add_argument("--n", type=int, default=4, help="completions per image")
    c.add_argument("--n-images", type=int, default=8, help="at most this many images")
    c.add_argument("--keep", type=float, default=0.5, help="fraction of token rows kept from the top")
    c.add_argument("--box", default=None, help="TOP,LEFT,BOTTOM,RIGHT fractions: regenerate this box instead")
    c.add_argument("--label", default=None)
    c.add_argument("--cond-maps", default=None,
                   help="for a map-conditioned prior: the images' segmentation/depth maps (same file stems), "
                        "or builtin:scenes-seg / builtin:scenes-depth")
    c.add_argument("--tokenizer", default=None, help="default: the one the prior records")
    for parser in (m, c):
        parser.add_argument("--force", action="store_true",
                            help="use --tokenizer even if it is not the tokenizer the prior was trained on")
        parser.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is closer to greedy")
        parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
        parser.add_argument("--top-p", type=float, default=0.0,
                            help="sample within this much probability mass, 0..1 (0: off)")
        parser.add_argument("--guidance", type=float, default=1.0,
                            help="classifier-free guidance scale (1 = none); a class prior trained with label "
                                 "dropout, with --label")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    c.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_sample)
    c.set_defaults(func=_complete)

    k = sub.add_parser("tokenize", help="encode an image folder once into a token store (for stage 2)")
    k.add_argument("model", help="tokenizer directory")
    k.add_argument("images", help="image folder (recursive) or builtin:scenes")
    k.add_argument("out", help="token store directory (an interrupted run resumes there)")
    k.add_argument("--labels", default=None,
                   help="'folders' (sub-folder names are classes) or a CSV (file,label) / JSON ({file: label}) "
                        "file; files are keyed by their path under IMAGES or by file name")
    k.add_argument("--crops", type=int, default=1, help="random crops per image (1: one centre crop)")
    k.add_argument("--cond-maps", default=None,
                   help="folder of segmentation / depth maps named like the images (or builtin:scenes-seg)")
    k.add_argument("--cond-tokenizer", default=None, help="the stage-1 model trained on those maps")
    k.add_argument("--count", type=int, default=1024, help="images taken from built-in data")
    k.add_argument("--batch-size", type=int, default=32)
    k.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=_tokenize)

    v = sub.add_parser("convert", help="an original taming-transformers .ckpt -> this project's format")
    v.add_argument("checkpoint", help="the .ckpt file (read safely: tensors and plain values only)")
    v.add_argument("out", help="output directory: model.safetensors, config.yaml (+ loss weights, loss.yaml)")
    v.add_argument("--config", default=None,
                   help="its model.yaml / *-project.yaml (default: found beside it, one folder up, or in configs/ "
                        "there)")
    v.add_argument("--overwrite", action="store_true",
                   help="convert into a folder that holds files: replace only the converted model's files there")
    v.set_defaults(func=_convert)

    c = sub.add_parser("decode", help="token files -> PNG images")
    c.add_argument("model")
    c.add_argument("tokens", help="token store from `vqgan encode` or `vqgan tokenize` (or an older tokens.npy folder)")
    c.add_argument("out")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    c.add_argument("--force", action="store_true", help="decode even if another tokenizer made the tokens")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_decode)

    from .eval.compare_cli import add_parser as add_compare
    from .eval.reconstruct_cli import add_parser as add_eval
    from .eval_samples import add_parser as add_eval_samples
    from .imagine.cli import add_parser as add_imagine

    add_eval(sub)
    add_compare(sub)
    add_eval_samples(sub)
    add_imagine(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .native.malloc import keep_freed_memory
    from .train.common import configure_logging

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list at the first option)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.verbose)
    keep_freed_memory()
    try:
        result = args.func(args)
    except UserError as e:
        print(f"vqgan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    code = result.pop("exit_code", 0) if result else 0
    if result:
        print(json.dumps(result, indent=1, default=str))
    logging.shutdown()
    return code


def entry() -> None:
    """The `vqgan` command. A torchrun worker leaves without interpreter finalization (see `leave_worker`)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train.common import leave_worker

        leave_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
