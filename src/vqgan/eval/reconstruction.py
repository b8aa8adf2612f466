"""`vqgan eval TOKENIZER DATA`: how well a tokenizer reconstructs a folder of images, by the standard protocol.

Each image: its short side resized to the resolution by a named filter and centre-cropped (uint8), encoded,
decoded, the reconstruction rounded to uint8; then both uint8 images are measured (PSNR, SSIM, MS-SSIM, LPIPS:
one value per image, averaged over images). Over the set: rFID (Inception features of the inputs against
those of the reconstructions), codebook use, and where the time went. Unreadable images are skipped and
counted. Under torchrun, process r takes files r, r + world, ...; per-image rows are gathered and histograms
and Inception statistics summed, so the numbers equal one process's. Outputs: `outputs.py`.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..checkpoint import fingerprint, replace_files
from ..data.images import ReadableItems, collate_readable
from ..data.sources import sources_and_unreadable
from ..data.tokens import absolute_source, check_output_dir, check_resolution, load_tokenizer
from ..errors import UserError
from ..train.common import Runtime, cleanup_runtime, setup_runtime
from ..userinput import at_least, resolve_device
from . import similarity
from .protocol import RESIZE_FILTERS, ProtocolImages, round_to_uint8, to_signed
from .shards import all_reduce
from .usage import CodeUsage
from .weights import LPIPS_NETS, file_record, load_inception_or_reason, load_lpips_or_reason, weights_option

if TYPE_CHECKING:
    from .fid import FeatureStats

log = logging.getLogger("vqgan.eval")


@dataclass
class EvalOptions:
    batch_size: int = 32
    resolution: int | None = None  # default: the tokenizer's
    resize_filter: str = "lanczos"
    device: str | None = None  # default: the process's device (cuda:LOCAL_RANK under torchrun)
    num_workers: int = 0
    # LPIPS on alex (AlexNet, the lpips package's default for measuring) or vgg (VGG16); None: vgg when only
    # vgg_weights is given, else alex
    lpips_net: str | None = None
    vgg_weights: str | None = None
    alexnet_weights: str | None = None
    lpips_heads: str | None = None
    inception_weights: str | None = None
    save_stats: str | None = None  # write the inputs' Inception statistics (.npz with mu, sigma)
    reference_stats: str | None = None  # FID of the reconstructions against these
    show: int = 8  # the k worst and k best reconstructions in the report
    progress: bool = True

    def lpips_choice(self) -> tuple[str, str | None]:
        """(the LPIPS network, the weights file given for it)."""
        net = self.lpips_net or ("vgg" if self.vgg_weights and not self.alexnet_weights else "alex")
        return net, self.vgg_weights if net == "vgg" else self.alexnet_weights


@dataclass
class Clock:
    """Seconds spent per part, each measured after the device finished its work."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("data", "encode", "decode", "metrics", "lpips", "inception"), 0.0))

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start


@dataclass
class Measures:
    """What a process accumulates over its share of the set."""

    usage: CodeUsage
    rows: list[dict] = field(default_factory=list)
    skipped: int = 0
    skipped_files: list[int] = field(default_factory=list)  # the indices of the files that could not be read
    real: object = None  # FeatureStats of the inputs' Inception features (None: rFID not computed)
    fake: object = None  # ... and of the reconstructions'
    real_given: bool = False  # `real` came complete from the caller (the same inputs, measured before)
    seconds: dict[str, float] = field(default_factory=dict)  # Clock's parts, summed over processes


def reconstruct(model, images: torch.Tensor, clock: Clock | None = None) -> tuple[torch.Tensor, object]:
    """uint8 images on the model's device -> (uint8 reconstructions, tokens)."""
    clock = clock or Clock(images.device)
    with clock.part("encode"):
        tokens = model.encode(to_signed(images))
    with clock.part("decode"):
        rec = round_to_uint8(model.decode(tokens))
    return rec, tokens


def measure_batch(x: torch.Tensor, rec: torch.Tensor, lpips, inception, m: Measures, clock: Clock) -> list[dict]:
    """Per-image metrics of a uint8 batch and its reconstruction; Inception features into the set's stats."""
    with clock.part("metrics"):
        values = {"psnr": similarity.psnr(x, rec), "ssim": similarity.ssim(x, rec)}
        if similarity.ms_ssim_fits(*x.shape[-2:]):
            values["ms_ssim"] = similarity.ms_ssim(x, rec)
    if lpips is not None:
        with clock.part("lpips"):
            values["lpips"] = lpips(to_signed(x), to_signed(rec)).double()
    if inception is not None:
        with clock.part("inception"):
            if not m.real_given:
                m.real.update(inception(x)["pool"])
            m.fake.update(inception(rec)["pool"])
    columns = {k: v.cpu().tolist() for k, v in values.items()}
    return [{k: columns[k][i] if k in columns else None for k in ("psnr", "ssim", "ms_ssim", "lpips")}
            for i in range(x.shape[0])]


def check_model(model, path: str, resolution: int) -> None:
    kind = getattr(model.config, "input_kind", "rgb")
    if kind != "rgb" or getattr(model.config, "in_channels", 3) != 3:
        raise UserError(f"{path} is a {kind} tokenizer; vqgan eval measures RGB image reconstructions")
    if resolution % model.downsample_factor:
        raise UserError(f"resolution {resolution} is not a multiple of {path}'s grid factor "
                        f"{model.downsample_factor}; pass --resolution N with N a multiple of it")


def eval_device(rt: Runtime, name: str | None) -> torch.device:
    return resolve_device(name) if name else rt.device


@dataclass
class Networks:
    """The measuring networks (None: that metric is not computed) and the records of their weights files."""

    lpips: object
    inception: object
    weights: dict


@dataclass
class Evaluation:
    """One tokenizer measured on a set: its summary, per-image rows (in file order) and what remakes them."""

    summary: dict
    measures: Measures
    names: list[str]  # by row index: the images' absolute paths
    model: torch.nn.Module
    images: ProtocolImages


def check_options(opts: EvalOptions) -> None:
    at_least(opts.batch_size, 1, "--batch-size")
    at_least(opts.num_workers, 0, "--num-workers")
    at_least(opts.show, 0, "--show")
    check_resolution(opts.resolution)
    if opts.resize_filter not in RESIZE_FILTERS:
        raise UserError(f"--resize-filter {opts.resize_filter!r}: choose {' or '.join(RESIZE_FILTERS)}")
    if opts.lpips_net is not None and opts.lpips_net not in LPIPS_NETS:
        raise UserError(f"--lpips-net {opts.lpips_net!r}: choose {' or '.join(LPIPS_NETS)}")
    net, _ = opts.lpips_choice()
    other = next(n for n in LPIPS_NETS if n != net)
    if (opts.vgg_weights, opts.alexnet_weights)[net == "vgg"]:
        raise UserError(f"{weights_option(other)} is for LPIPS on {other}; with --lpips-net {net} pass "
                        f"{weights_option(net)}, or --lpips-net {other}")


def load_networks(opts: EvalOptions, dev: torch.device, resolution: int, is_main: bool = True) -> Networks:
    """The measuring networks at `resolution` (a warning about their files from process 0 only)."""
    net, weights = opts.lpips_choice()
    lpips, lpips_record = load_lpips_or_reason(net, weights, opts.lpips_heads, dev, resolution, warn=is_main)
    inception, inception_record = load_inception_or_reason(
        opts.inception_weights, dev, needed_by=[o for o, v in (("--save-stats", opts.save_stats),
                                                               ("--reference-stats", opts.reference_stats)) if v],
        warn=is_main)
    return Networks(lpips, inception, {"lpips": lpips_record, "inception": inception_record})


def protocol_images(data: str, resolution: int, opts: EvalOptions, limit: int | None = None, is_main: bool = True
                    ) -> tuple[ProtocolImages, list[str]]:
    """The images under `data` (the first `limit` by name) prepared by the protocol, and the files the scan could
    not read (skipped). Process 0 warns about images smaller than the resolution (`ProtocolImages.upscaled`)."""
    sources, unreadable = sources_and_unreadable(data, builtin_size=resolution)
    ds = ProtocolImages(sources[:limit], resolution, RESIZE_FILTERS[opts.resize_filter][0])
    if ds.upscaled and is_main:
        log.warning("%d of the %d images under %s are smaller than %d px on their short side: the protocol's resize "
                    "enlarges them, which blurs the inputs (counted as data.upscaled)", ds.upscaled, len(ds), data,
                    resolution)
    return ds, [absolute_source(str(p), data) for p in unreadable]


def evaluate_model(model, tokenizer: str, ds: ProtocolImages, data: str, unreadable: list[str], opts: EvalOptions,
                   rt: Runtime, dev: torch.device, nets: Networks, inputs_stats: FeatureStats | None = None
                   ) -> Evaluation:
    """Measure a loaded tokenizer (from path `tokenizer`) on `ds`; every process gets the gathered result.
    `inputs_stats`: the Inception statistics of `ds` from an earlier evaluation on it (`measures.real`), reused
    for the rFID instead of running the inputs through Inception again."""
    from .outputs import summarize

    check_model(model, tokenizer, ds.resolution)
    m = _run(model, ds, rt, dev, opts, nets.lpips, nets.inception, inputs_stats)
    names = [absolute_source(ds.name(i), data) for i in range(len(ds))]
    summary = summarize(
        m, names, ds.resolution, opts, unreadable=unreadable,
        tokenizer={"path": str(Path(tokenizer).expanduser().resolve()), "fingerprint": fingerprint(model),
                   **model_record(model, tokenizer)},
        data={"folder": absolute_source(os.path.expanduser(data), data), "files": len(ds) + len(unreadable),
              "upscaled": ds.upscaled},
        weights=nets.weights, world_size=rt.world_size)
    return Evaluation(summary, m, names, model, ds)


def write_evaluation(folder: Path, ev: Evaluation, show: int, dev: torch.device) -> None:
    """summary.json, per_image.csv, report.html and its pictures into `folder` (a temporary one: no atomicity)."""
    from .outputs import write_files

    worst_best = _worst_and_best(ev.model, ev.images, ev.measures.rows, show, dev)
    write_files(folder, ev.summary, ev.measures.rows, ev.names, worst_best)


@torch.no_grad()
def evaluate_folder(tokenizer: str, data: str, out: str, opts: EvalOptions | None = None) -> dict:
    """Evaluate `tokenizer` on the images under `data`; write summary.json, per_image.csv and report.html to
    `out` (process 0); the summary (every process)."""
    opts = opts or EvalOptions()
    check_options(opts)
    out_dir = check_output_dir(out, "--out")
    rt = setup_runtime()
    try:
        dev = eval_device(rt, opts.device)
        model = load_tokenizer(tokenizer, dev)
        ds, unreadable = protocol_images(data, opts.resolution or model.config.resolution, opts, is_main=rt.is_main)
        _check_stats_count(opts, len(ds), data)  # before the work
        nets = load_networks(opts, dev, ds.resolution, rt.is_main)
        ev = evaluate_model(model, tokenizer, ds, data, unreadable, opts, rt, dev, nets)
        if rt.is_main:
            refused = None
            if opts.save_stats:
                from .fid import save_stats

                try:  # files found unreadable while decoding may leave fewer than the scan counted
                    _check_stats_count(opts, ev.measures.real.count, data)
                    save_stats(opts.save_stats, *ev.measures.real.mean_cov())
                    ev.summary["metrics"]["saved_stats"] = str(Path(opts.save_stats).resolve())
                except UserError as e:
                    refused = e
                    ev.summary["metrics"]["saved_stats"] = f"not saved: {e}"
            with replace_files(out_dir) as tmp:  # the evaluation is kept even when the statistics are refused
                write_evaluation(tmp, ev, opts.show, dev)
            if refused is not None:
                raise refused
        return ev.summary
    finally:
        cleanup_runtime(rt)


def _check_stats_count(opts: EvalOptions, count: int, data: str) -> None:
    if opts.save_stats and count < 2:
        raise UserError(f"--save-stats {opts.save_stats}: FID statistics need at least 2 images, {count} under {data}")


def _run(model, ds: ProtocolImages, rt: Runtime, dev: torch.device, opts: EvalOptions, lpips, inception,
         inputs_stats: FeatureStats | None = None) -> Measures:
    """This process's share of the set, then everything gathered and summed over processes."""
    m = Measures(CodeUsage(model.code_spec))
    if inception is not None:
        from .fid import FeatureStats

        m.real, m.fake = FeatureStats() if inputs_stats is None else inputs_stats, FeatureStats()
        m.real_given = inputs_stats is not None
    shard = Subset(ReadableItems(ds), range(rt.rank, len(ds), rt.world_size))
    loader = DataLoader(shard, batch_size=opts.batch_size, shuffle=False, num_workers=opts.num_workers,
                        collate_fn=collate_readable)
    clock = Clock(dev)
    start = time.perf_counter()
    bar = tqdm(total=len(ds), desc="eval", unit="img", disable=not (opts.progress and rt.is_main))
    batches = iter(loader)
    while True:
        with clock.part("data"):
            batch = next(batches, None)
            if batch is not None and batch["image"] is not None:
                x = batch["image"].to(dev)
        if batch is None:
            break
        m.skipped += batch["skipped"]
        m.skipped_files += batch["skipped_index"]
        bar.update(min((len(batch["index"]) + batch["skipped"]) * rt.world_size, bar.total - bar.n))
        if batch["image"] is None:
            continue
        rec, tokens = reconstruct(model, x, clock)
        with clock.part("metrics"):
            m.usage.update(tokens)
        rows = measure_batch(x, rec, lpips, inception, m, clock)
        m.rows += [{"index": i, **r} for i, r in zip(batch["index"], rows)]
    bar.close()
    clock.seconds["wall"] = time.perf_counter() - start
    _reduce(m, clock, rt)
    m.seconds = clock.seconds
    return m


def _reduce(m: Measures, clock: Clock, rt: Runtime) -> None:
    """Sum over processes: rows (gathered, in file order), histograms, Inception statistics, skip counts and
    seconds; the wall time is the slowest process's."""
    if rt.distributed:
        shards: list = [None] * rt.world_size
        dist.all_gather_object(shards, (m.rows, m.skipped_files))
        m.rows = [r for s in shards for r in s[0]]
        m.skipped_files = sorted(i for s in shards for i in s[1])
        m.usage.all_reduce()
        if m.real is not None:
            if not m.real_given:
                m.real.all_reduce()
            m.fake.all_reduce()
        parts = list(clock.seconds)
        totals = torch.tensor([m.skipped, *[clock.seconds[p] for p in parts]], dtype=torch.float64)
        all_reduce(totals)
        wall = all_reduce(torch.tensor([clock.seconds["wall"]], dtype=torch.float64), op=dist.ReduceOp.MAX)
        m.skipped = int(totals[0])
        clock.seconds = {**dict(zip(parts, totals[1:].tolist())), "process_seconds": float(totals[1 + parts.index(
            "wall")]), "wall": float(wall[0])}
    else:
        clock.seconds["process_seconds"] = clock.seconds["wall"]
    m.rows.sort(key=lambda r: r["index"])


def _worst_and_best(model, ds: ProtocolImages, rows: list[dict], k: int, dev: torch.device
                    ) -> dict[str, tuple[list[dict], torch.Tensor, torch.Tensor]]:
    """The k rows of lowest and of highest PSNR, with their inputs and reconstructions (uint8, made again)."""
    ranked = sorted(rows, key=lambda r: r["psnr"])
    k = min(k, len(ranked))
    out = {}
    for name, chosen in (("worst", ranked[:k]), ("best", ranked[::-1][:k])):
        if not chosen:
            continue
        x = torch.stack([ds.read(r["index"]) for r in chosen]).to(dev)
        rec, _ = reconstruct(model, x)
        out[name] = (chosen, x.cpu(), rec.cpu())
    return out


def model_record(model, path: str) -> dict:
    """The tokenizer's kind (and its parts' kinds) and the sha256 of the weights file it was loaded from."""
    from ..checkpoint import WEIGHTS_FILE, resolve_model_path

    config = model.config_dict()
    where = resolve_model_path(path)
    record = {"kind": config.get("kind"), "codes": model.code_spec.describe()}
    for part in ("encoder", "quantizer", "decoder"):
        if isinstance(config.get(part), dict) and "kind" in config[part]:
            record[f"{part}_kind"] = config[part]["kind"]
    levels = [config[k]["kind"] for k in ("top_quantizer", "bottom_quantizer") if isinstance(config.get(k), dict)]
    if levels and "quantizer_kind" not in record:  # two levels (VQ-VAE-2): top / bottom
        record["quantizer_kind"] = " / ".join(levels)
    return {**record, "weights": file_record(where / WEIGHTS_FILE if where.is_dir() else where)}
