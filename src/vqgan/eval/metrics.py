"""Reconstruction metrics."""
from __future__ import annotations

import math

import torch

from ..errors import UserError


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0)


def psnr_per_image(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair, on [0, 1] images (inputs in [-1, 1]); (B,)."""
    mse = ((to_unit(rec).double() - to_unit(x).double()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10.0 * torch.log10(1.0 / mse)


def perplexity(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def label_scores(labels: torch.Tensor, predicted: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image pixel accuracy (B,) and the (n_labels, 2) [intersection, union] pixel counts."""
    acc = (labels == predicted).double().mean(dim=(1, 2))
    inter = torch.bincount(labels[labels == predicted].reshape(-1), minlength=n_labels)
    union = torch.bincount(labels.reshape(-1), minlength=n_labels) + torch.bincount(
        predicted.reshape(-1), minlength=n_labels) - inter
    return acc, torch.stack([inter, union], 1)


@torch.no_grad()
def evaluate_reconstruction(model, loader, device: torch.device, max_batches: int | None = None) -> dict:
    """Held-out PSNR (segmentation maps: pixel accuracy and mean IoU), L1, codebook usage and perplexity
    (over all latent positions; per stream of the code spec, i.e. per depth and level, where it has several:
    `usage` and `perplexity` are then the streams' means, `codes_used` and `n_embed` their sums)."""
    from ..data.maps import to_display

    was_training = model.training
    model.eval()
    kind = model.config.input_kind
    spec = model.code_spec
    counts = [torch.zeros(v, dtype=torch.long) for v in spec.streams]
    psnrs, l1s, iou = [], [], 0
    examples, unreadable = None, []
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        unreadable += batch.get("skipped_index", [])  # a loader of ReadableItems leaves unreadable files out
        if batch["image"] is None:
            continue
        x = batch["image"].to(device)
        tokens = model.encode(x)
        rec = model.decode(tokens)
        for c, codes in zip(counts, spec.stream_codes(tokens)):
            c += torch.bincount(codes.cpu(), minlength=len(c))
        if kind == "segmentation":
            acc, inter_union = label_scores(x.argmax(1).cpu(), rec.argmax(1).cpu(), x.shape[1])
            psnrs.append(acc)
            iou = iou + inter_union
            l1s.append(1.0 - acc)
        else:
            psnrs.append(psnr_per_image(x, rec).cpu())
            l1s.append((to_unit(rec) - to_unit(x)).abs().mean(dim=(1, 2, 3)).cpu())
        if examples is None:
            examples = (to_display(x[:16], kind).cpu(), to_display(rec[:16], kind).cpu())
    model.train(was_training)
    if not psnrs:
        raise UserError(f"none of the {len(unreadable)} held-out images could be read")
    score = torch.cat(psnrs)
    usage = [float((c > 0).float().mean()) for c in counts]
    perplexities = [perplexity(c) for c in counts]
    result = {"l1": float(torch.cat(l1s).mean()), "codes_used": int(sum(int((c > 0).sum()) for c in counts)),
              "n_embed": sum(spec.streams), "usage": sum(usage) / len(usage),
              "perplexity": sum(perplexities) / len(perplexities), "n_images": int(score.numel()),
              "counts": counts[0] if len(counts) == 1 else torch.cat(counts), "examples": examples,
              "stream_counts": counts, "stream_labels": spec.stream_labels,
              "unreadable": unreadable}
    if len(counts) > 1:
        result.update(usage_per_stream=usage, perplexity_per_stream=perplexities)
    if kind == "segmentation":  # "l1" is then the pixel error rate
        present = iou[:, 1] > 0
        result.update(accuracy=float(score.mean()),
                      miou=float((iou[present, 0].double() / iou[present, 1]).mean()))
    else:
        result.update(psnr=float(score.mean()), psnr_std=float(score.std()) if score.numel() > 1 else 0.0)
    return result


def quality_summary(result: dict) -> str:
    """One line for people: PSNR, or pixel accuracy / mIoU for label maps, and codebook use."""
    head = (f"pixel accuracy {result['accuracy']:.4f}, mIoU {result['miou']:.4f}" if "accuracy" in result
            else f"PSNR {result['psnr']:.2f} dB")
    return (f"held-out {head}, codebook usage {result['usage']:.3f} ({result['codes_used']}/{result['n_embed']}), "
            f"perplexity {result['perplexity']:.1f}")
