"""`vqgan eval-samples` and `vqgan fid-stats`: generation metrics of a folder of images, or of samples drawn
from a prior, against reference images or FID statistics.

Images go to the Inception network as they are stored (uint8, own size); torch-fidelity's network resizes them
to 299x299 the way the original TF code did. Samples from a prior are rounded to uint8 first, exactly as their
PNGs would be.

Under torchrun the work is split (`eval/shards.py`): process r of W takes files r, r + W, ... of a folder, and
batches r, r + W, ... of the samples (each batch seeded by its position, so the samples do not depend on W);
the features come back to process 0 in the set's order, which computes the metrics and writes the summary and
statistics files, so the numbers are those of one process. Each process writes its own samples' PNGs.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.images import PROGRAM_ERRORS, error_reason, load_rgb, report_bad_file, scan_images
from .errors import UserError
from .eval.generation import IS_SPLITS, KID_SUBSET_SIZE, FeatureSet, generation_metrics
from .eval.inception import InceptionFeatures, load_inception
from .eval.reconstruction import eval_device
from .eval.shards import all_reduce, rank_and_world, share
from .train.common import cleanup_runtime, setup_runtime

PROTOCOL = ("Inception-v3 (torch-fidelity's TF port, FID weights) pool features (2048) for FID, KID and "
            "precision/recall (k=3), fc logits without bias for IS (10 splits); uint8 images resized to 299x299 "
            "with TF-1.x bilinear inside the network; KID: unbiased MMD^2, cubic polynomial kernel, 100 subsets")
STANDARD_COUNT = 50_000


class _Files(Dataset):
    """Each file as a uint8 (3, H, W) tensor, or None when it cannot be decoded (reported once)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return torch.from_numpy(np.asarray(load_rgb(self.paths[i]), dtype=np.uint8).copy()).permute(2, 0, 1)
        except PROGRAM_ERRORS:
            raise
        except Exception as e:  # PIL raises many types for corrupt files
            report_bad_file(self.paths[i], error_reason(e))
            return None


Batch = tuple[list[int], torch.Tensor]  # (the images' positions in their set, uint8 images (B, 3, H, W))


def _same_size_batches(images, batch_size: int, counts: dict) -> Iterator[Batch]:
    """Consecutive (position, image) pairs of one size stacked, at most `batch_size`; None images counted as
    skipped."""
    index: list[int] = []
    batch: list[torch.Tensor] = []
    for i, im in images:
        if im is None:
            counts["skipped"] += 1
            continue
        if batch and (len(batch) == batch_size or im.shape != batch[0].shape):
            yield index, torch.stack(batch)
            index, batch = [], []
        index.append(i)
        batch.append(im)
    if batch:
        yield index, torch.stack(batch)


def folder_features(inception: InceptionFeatures, folder: str, batch_size: int = 50, num_workers: int = 2,
                    progress: bool = True, what: str = "images") -> tuple[FeatureSet, dict]:
    """The Inception features of every readable image under `folder` (recursive), and a record of the folder
    (path, count, skipped: unreadable files). Under torchrun: this process's share, gathered (`_features`)."""
    good, bad = scan_images(folder)
    mine = share(len(good))
    counts = {"skipped": 0}
    loader = DataLoader(_Files([good[i] for i in mine]), batch_size=None, num_workers=num_workers)
    features = _features(inception, _same_size_batches(zip(mine, loader), batch_size, counts), len(good), progress,
                         what)
    skipped = len(bad) + int(all_reduce(torch.tensor([counts["skipped"]]))[0])
    if features.count < 2:
        raise UserError(f"{folder}: {features.count} decodable images; the metrics need at least 2 (FID's covariance)")
    return features, {"folder": str(folder), "count": features.count, "skipped": skipped}


def _features(inception: InceptionFeatures, batches: Iterator[Batch], total: int, progress: bool, what: str
              ) -> FeatureSet:
    """The features of this process's batches, gathered (`FeatureSet.gather`): the statistics on every process,
    the rows on process 0 in their set's order."""
    device = next(inception.parameters()).device
    rank, world = rank_and_world()
    out, positions = FeatureSet(), []
    with tqdm(total=total, desc=f"Inception features: {what}", unit="img", disable=not progress or rank != 0) as bar:
        for index, batch in batches:
            out.add(inception(batch.to(device)))
            positions += index
            bar.update(min(batch.shape[0] * world, total - bar.n))  # the other processes keep pace
    return out.gather(positions)


def class_plan(n: int, n_classes: int) -> list[int | None]:
    """The class of each of `n` samples, balanced: each class n // C, the first n % C classes one more;
    None for every sample of an unconditional prior (`n_classes` 0)."""
    if not n_classes:
        return [None] * n
    return [c for c in range(n_classes) for _ in range(n // n_classes + (c < n % n_classes))]


def sample_batches(n: int, n_classes: int, batch_size: int) -> list[tuple[int, int, int | None]]:
    """(first sample, size, class) of each batch drawn: consecutive samples of one class (`class_plan`), at most
    `batch_size`. Fixed by these three alone, not by the number of processes that draw them."""
    plan, out, start = class_plan(n, n_classes), [], 0
    while start < n:
        label, size = plan[start], 1
        while size < batch_size and start + size < n and plan[start + size] == label:
            size += 1
        out.append((start, size, label))
        start += size
    return out


def prior_batches(prior, n: int, batch_size: int, seed: int, sampling: dict, save_to: Path | None = None
                  ) -> Iterator[Batch]:
    """`n` samples of `prior` as uint8 batches (B, 3, H, W) with their sample numbers, one class per batch
    (balanced over the classes of a class-conditional prior); batch k seeded from `seed` and k, so a run is
    reproducible and its samples are the same however many processes draw them (process r: batches r, r + W,
    ...)."""
    from PIL import Image

    from .eval.report import to_uint8
    from .generate import sample_images

    if prior.layout.spatial:
        raise UserError("this prior is conditioned on maps: draw samples with `vqgan sample --cond-map` and pass "
                        "their folder with --images")
    batches, names = sample_batches(n, prior.layout.n_classes, batch_size), prior.class_names
    for k in share(len(batches)):
        start, size, label = batches[k]
        name = None if label is None else (names[label] if label < len(names) else str(label))
        images, _ = sample_images(prior, size, name, seed=seed * 1_000_003 + k, progress=False, batch_size=size,
                                  **sampling)
        batch = to_uint8(images)  # what the PNGs would hold
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(batch):
                Image.fromarray(im).save(save_to / f"{start + i:06d}{'' if label is None else f'_class{label}'}.png")
        yield list(range(start, start + size)), torch.from_numpy(batch).permute(0, 3, 1, 2)


def reference_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics from an `.npz` file, checked to be of the 2048 pool features."""
    from .eval.fid import load_stats

    mu, sigma = load_stats(path)
    if mu.shape != (2048,):
        raise UserError(f"{path} holds statistics of {mu.shape[0]}-dimensional features; FID here uses the 2048 "
                        "Inception pool features (pytorch-fid's default --dims 2048)")
    return mu, sigma


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _check_common(args) -> None:
    from .userinput import at_least, resolve_device

    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.num_workers, 0, "--num-workers")
    resolve_device(args.device)  # a wrong --device before any work


def eval_samples(args) -> dict:
    """The `eval-samples` command: every input checked before the long work starts. Under torchrun process 0
    computes, writes and returns the summary; the others return {}."""
    from .userinput import at_least, sampling_options

    _check_common(args)
    at_least(args.kid_subset_size, 2, "--kid-subset-size")
    at_least(args.is_splits, 1, "--is-splits")
    from_stats = Path(args.reference).suffix == ".npz"
    if from_stats and args.save_stats:
        raise UserError("--save-stats writes a reference folder's statistics; the reference is already a .npz file")
    reference = reference_statistics(args.reference) if from_stats else None
    if args.images and not Path(args.images).exists():
        raise UserError(f"--images {args.images}: no such folder")
    sampling = None
    if args.prior:
        at_least(args.n, 2, "--n")
        sampling = sampling_options(args)
    rt = setup_runtime()
    try:
        return _eval_samples(args, eval_device(rt, args.device), reference, sampling, rt.is_main)
    finally:
        cleanup_runtime(rt)


def _eval_samples(args, device: torch.device, reference: tuple[np.ndarray, np.ndarray] | None,
                  sampling: dict | None, is_main: bool) -> dict:
    from .eval.fid import save_stats

    progress = not args.no_progress
    prior = None
    if args.prior:
        from .generate import open_prior

        prior = open_prior(args.prior, args.tokenizer, device, force=args.force)
    inception = load_inception(args.inception_weights, device)
    if reference is None:
        ref_features, ref_record = folder_features(inception, args.reference, args.batch_size, args.num_workers,
                                                   progress, "reference")
        reference = ref_features
        if args.save_stats and is_main:
            ref_record["statistics_saved"] = str(save_stats(args.save_stats, *ref_features.stats.mean_cov()))
    else:
        ref_record = {"statistics": str(args.reference)}
    if prior is not None:
        save_to = Path(args.save_samples) if args.save_samples else None
        batches = prior_batches(prior, args.n, args.sample_batch_size, args.seed, sampling, save_to)
        samples = _features(inception, batches, args.n, progress, "samples")
        layout = prior.layout
        sample_record = {"prior": str(args.prior), "count": samples.count, "seed": args.seed, **sampling,
                         "classes": ({"balanced_over": layout.n_classes, "names": prior.class_names,
                                      "per_class": [args.n // layout.n_classes + (c < args.n % layout.n_classes)
                                                    for c in range(layout.n_classes)]}  # as class_plan
                                     if layout.n_classes else None),
                         "saved_to": str(save_to) if save_to else None}
    else:
        samples, sample_record = folder_features(inception, args.images, args.batch_size, args.num_workers, progress,
                                                 "samples")
    if not is_main:  # the features' rows are on process 0
        return {}
    summary = {"metrics": generation_metrics(samples, reference, args.kid_subset_size, args.is_splits),
               "samples": sample_record, "reference": ref_record, "inception_weights": inception.describe(),
               "protocol": PROTOCOL}
    if samples.count < STANDARD_COUNT:
        summary["note"] = (f"{samples.count} samples: FID falls as the sample count grows; published FIDs use "
                           f"{STANDARD_COUNT} samples against the whole reference set, so compare like with like")
    if args.out:
        _write_json(Path(args.out), summary)
    return summary


def fid_stats(args) -> dict:
    """The `fid-stats` command: a folder's FID statistics as an `.npz` file (under torchrun: the features in
    shards, written by process 0; the others return {})."""
    from .eval.fid import save_stats

    _check_common(args)
    if Path(args.out).suffix != ".npz":
        raise UserError(f"{args.out}: the statistics file must end in .npz")
    rt = setup_runtime()
    try:
        inception = load_inception(args.inception_weights, eval_device(rt, args.device))
        features, record = folder_features(inception, args.folder, args.batch_size, args.num_workers,
                                           not args.no_progress, "reference")
        if not rt.is_main:
            return {}
        save_stats(args.out, *features.stats.mean_cov())
        return {"out": str(args.out), **record, "inception_weights": inception.describe()}
    finally:
        cleanup_runtime(rt)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception-weights", default=None,
                   help="the FID Inception weights file (default: weights-inception-2015-12-05-6726825d.pth or "
                        "pt_inception-2015-12-05-6726825d.pth in $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub) -> None:
    """Register `eval-samples` and `fid-stats` on the `vqgan` subcommands."""
    e = sub.add_parser("eval-samples", help="FID, KID, Inception Score, precision/recall of generated images")
    e.add_argument("reference", help="folder of reference images, or FID statistics .npz (then FID only)")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of generated images")
    source.add_argument("--prior", help="prior directory to draw --n samples from (class priors: balanced)")
    e.add_argument("--n", type=int, default=STANDARD_COUNT, help="samples drawn from --prior")
    e.add_argument("--sample-batch-size", type=int, default=16, help="samples drawn together")
    e.add_argument("--save-samples", default=None, help="also write the drawn samples as PNGs to this folder")
    e.add_argument("--tokenizer", default=None, help="default: the one the prior records")
    e.add_argument("--force", action="store_true", help="use --tokenizer even if the prior was not trained on it")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-k", type=int, default=0, help="0: all codes")
    e.add_argument("--top-p", type=float, default=0.0, help="0: off")
    e.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (recorded)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-stats", default=None, help="write the reference folder's FID statistics to this .npz")
    e.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE,
                   help="features per KID subset (shrinks to the smaller set)")
    e.add_argument("--is-splits", type=int, default=IS_SPLITS)
    e.add_argument("--out", default=None, help="also write the JSON summary to this file")
    _common_options(e)
    e.set_defaults(func=eval_samples)

    s = sub.add_parser("fid-stats", help="FID statistics (mu, sigma .npz, pytorch-fid's format) of an image folder")
    s.add_argument("folder")
    s.add_argument("out", help="the .npz file to write")
    _common_options(s)
    s.set_defaults(func=fid_stats)
