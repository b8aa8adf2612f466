"""`vqgan eval-samples` and `vqgan fid-stats`: generation metrics of a folder of images, or of samples drawn
from a prior, against reference images or FID statistics.

Images go to the Inception network as they are stored (uint8, own size); torch-fidelity's network resizes them
to 299x299 the way the original TF code did. Samples from a prior are rounded to uint8 first, exactly as their
PNGs would be.
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

from .data.images import error_reason, load_rgb, report_bad_file, scan_images
from .errors import UserError
from .eval.generation import IS_SPLITS, KID_SUBSET_SIZE, FeatureSet, generation_metrics
from .eval.inception import InceptionFeatures, load_inception

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
        except Exception as e:  # PIL raises many types for corrupt files
            report_bad_file(self.paths[i], error_reason(e))
            return None


def _same_size_batches(images, batch_size: int, counts: dict) -> Iterator[torch.Tensor]:
    """Consecutive images of one size stacked, at most `batch_size`; None items counted as skipped."""
    batch: list[torch.Tensor] = []
    for im in images:
        if im is None:
            counts["skipped"] += 1
            continue
        if batch and (len(batch) == batch_size or im.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(im)
    if batch:
        yield torch.stack(batch)


def folder_features(inception: InceptionFeatures, folder: str, batch_size: int = 50, num_workers: int = 2,
                    progress: bool = True, what: str = "images") -> tuple[FeatureSet, dict]:
    """The Inception features of every readable image under `folder` (recursive), and a record of the folder
    (path, count, skipped: unreadable files)."""
    good, bad = scan_images(folder)
    counts = {"skipped": len(bad)}
    loader = DataLoader(_Files(good), batch_size=None, num_workers=num_workers)
    features = _features(inception, _same_size_batches(loader, batch_size, counts), len(good), progress, what)
    if features.count < 2:
        raise UserError(f"{folder}: {features.count} decodable images; the metrics need at least 2 (FID's covariance)")
    return features, {"folder": str(folder), "count": features.count, "skipped": counts["skipped"]}


def _features(inception: InceptionFeatures, batches, total: int, progress: bool, what: str) -> FeatureSet:
    device = next(inception.parameters()).device
    out = FeatureSet()
    with tqdm(total=total, desc=f"Inception features: {what}", unit="img", disable=not progress) as bar:
        for batch in batches:
            out.add(inception(batch.to(device)))
            bar.update(batch.shape[0])
    return out


def class_plan(n: int, n_classes: int) -> list[int | None]:
    """The class of each of `n` samples, balanced: each class n // C, the first n % C classes one more;
    None for every sample of an unconditional prior (`n_classes` 0)."""
    if not n_classes:
        return [None] * n
    return [c for c in range(n_classes) for _ in range(n // n_classes + (c < n % n_classes))]


def prior_batches(prior, n: int, batch_size: int, seed: int, sampling: dict, save_to: Path | None = None
                  ) -> Iterator[torch.Tensor]:
    """`n` samples of `prior` as uint8 batches (B, 3, H, W), one class per batch (balanced over the classes of
    a class-conditional prior); each batch seeded from `seed` and its position, so a run is reproducible."""
    from PIL import Image

    from .eval.report import to_uint8
    from .generate import sample_images

    if prior.layout.spatial:
        raise UserError("this prior is conditioned on maps: draw samples with `vqgan sample --cond-map` and pass "
                        "their folder with --images")
    plan, names = class_plan(n, prior.layout.n_classes), prior.class_names
    start, chunk = 0, 0
    while start < n:
        label, size = plan[start], 1
        while size < batch_size and start + size < n and plan[start + size] == label:
            size += 1
        name = None if label is None else (names[label] if label < len(names) else str(label))
        images, _ = sample_images(prior, size, name, seed=seed * 1_000_003 + chunk, progress=False, batch_size=size,
                                  **sampling)
        batch = to_uint8(images)  # what the PNGs would hold
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(batch):
                Image.fromarray(im).save(save_to / f"{start + i:06d}{'' if label is None else f'_class{label}'}.png")
        yield torch.from_numpy(batch).permute(0, 3, 1, 2)
        start, chunk = start + size, chunk + 1


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


def _check_common(args) -> torch.device:
    from .userinput import at_least, resolve_device

    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.num_workers, 0, "--num-workers")
    return resolve_device(args.device)


def eval_samples(args) -> dict:
    """The `eval-samples` command: every input checked before the long work starts."""
    from .eval.fid import save_stats
    from .userinput import at_least, sampling_options

    device = _check_common(args)
    at_least(args.kid_subset_size, 2, "--kid-subset-size")
    at_least(args.is_splits, 1, "--is-splits")
    progress = not args.no_progress
    from_stats = Path(args.reference).suffix == ".npz"
    if from_stats and args.save_stats:
        raise UserError("--save-stats writes a reference folder's statistics; the reference is already a .npz file")
    reference = reference_statistics(args.reference) if from_stats else None
    if args.images and not Path(args.images).exists():
        raise UserError(f"--images {args.images}: no such folder")
    prior = None
    if args.prior:
        at_least(args.n, 2, "--n")
        sampling = sampling_options(args)
        from .generate import open_prior

        prior = open_prior(args.prior, args.tokenizer, device, force=args.force)
    inception = load_inception(args.inception_weights, device)
    if reference is None:
        ref_features, ref_record = folder_features(inception, args.reference, args.batch_size, args.num_workers,
                                                   progress, "reference")
        reference = ref_features
        if args.save_stats:
            ref_record["statistics_saved"] = str(save_stats(args.save_stats, *ref_features.stats.mean_cov()))
    else:
        ref_record = {"statistics": str(args.reference)}
    if prior is not None:
        save_to = Path(args.save_samples) if args.save_samples else None
        batches = prior_batches(prior, args.n, args.sample_batch_size, args.seed, sampling, save_to)
        samples = _features(inception, batches, args.n, progress, "samples")
        layout = prior.layout
        sample_record = {"prior": str(args.prior), "count": samples.count, "seed": args.seed, **sampling,
                         "classes": ({"balanced_over": layout.n_classes, "names": prior.class_names}
                                     if layout.n_classes else None),
                         "saved_to": str(save_to) if save_to else None}
    else:
        samples, sample_record = folder_features(inception, args.images, args.batch_size, args.num_workers, progress,
                                                 "samples")
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
    """The `fid-stats` command: a folder's FID statistics as an `.npz` file."""
    from .eval.fid import save_stats

    device = _check_common(args)
    if Path(args.out).suffix != ".npz":
        raise UserError(f"{args.out}: the statistics file must end in .npz")
    inception = load_inception(args.inception_weights, device)
    features, record = folder_features(inception, args.folder, args.batch_size, args.num_workers,
                                       not args.no_progress, "reference")
    save_stats(args.out, *features.stats.mean_cov())
    return {"out": str(args.out), **record, "inception_weights": inception.describe()}


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
