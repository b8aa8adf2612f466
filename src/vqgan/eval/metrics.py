"""Reconstruction metrics."""
from __future__ import annotations

import math

import torch


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


@torch.no_grad()
def evaluate_reconstruction(model, loader, device: torch.device, max_batches: int | None = None) -> dict:
    """Held-out PSNR, L1, codebook usage and perplexity (over all latent positions)."""
    was_training = model.training
    model.eval()
    n_embed = model.quantize.n_embed
    counts = torch.zeros(n_embed, dtype=torch.long)
    psnrs, l1s = [], []
    examples = None
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x = batch["image"].to(device)
        tokens = model.encode(x)
        rec = model.decode(tokens)
        counts += torch.bincount(tokens.reshape(-1).cpu(), minlength=n_embed)
        psnrs.append(psnr_per_image(x, rec).cpu())
        l1s.append((to_unit(rec) - to_unit(x)).abs().mean(dim=(1, 2, 3)).cpu())
        if examples is None:
            examples = (x[:16].cpu(), rec[:16].cpu())
    model.train(was_training)
    psnr = torch.cat(psnrs)
    return {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()) if psnr.numel() > 1 else 0.0,
            "l1": float(torch.cat(l1s).mean()), "codes_used": int((counts > 0).sum()), "n_embed": n_embed,
            "usage": float((counts > 0).float().mean()), "perplexity": perplexity(counts),
            "n_images": int(psnr.numel()), "counts": counts, "examples": examples}
