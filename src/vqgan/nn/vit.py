"""Vision Transformer parts (Dosovitskiy et al. 2021), as the ViT-VQGAN uses them (Yu et al. 2021, sec. 3.1).

A pre-norm block (x + attn(LN(x)), x + mlp(LN(x))), attention through `F.scaled_dot_product_attention`, a GELU
MLP, a fixed 2-D sin-cos position embedding, and the patch <-> grid rearrangements.

Position embedding: fixed 2-D sin-cos (as MAE, and the public ViT-VQGAN reimplementations), not learned. The
paper does not say which it used. A fixed table has no parameters tied to a resolution, so a tokenizer trained at
one size encodes and decodes grids of another (the sampler decodes grids larger than the training size through
its sliding window); a learned table would fix the grid at construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed position embedding of an h x w grid, raster order: (h*w, dim). The first half of the channels encodes
    the row, the second the column, each as sin/cos pairs at `dim // 4` frequencies (1 / 10000^(k / (dim/4)))."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (dim/4,)
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * freqs  # (h, dim/4)
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * freqs  # (w, dim/4)
    row_emb = torch.cat([rows.sin(), rows.cos()], 1)[:, None, :].expand(h, w, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], 1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([row_emb, col_emb], 2).reshape(h * w, dim)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Linear -> activation -> Linear: the block's feed-forward (GELU), and the ViT-VQGAN's output head (tanh)."""

    def __init__(self, width: int, hidden: int, out: int | None = None, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, out or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Tokens of an h x w grid (B, h*w, width) -> the same, after the position embedding, `depth` blocks and a
    final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + sincos_2d(*grid, self.width, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), raster order."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def unpatchify(x: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """Per-token pixel patches (B, h*w, C*p*p), each laid out (C, p, p), -> image (B, C, h*p, w*p)."""
    B, _, n = x.shape
    c = n // (patch * patch)
    x = x.reshape(B, h, w, c, patch, patch).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, c, h * patch, w * patch)


def init_vit_weights(module: nn.Module) -> None:
    """ViT's init: truncated normal (std 0.02) linear weights, zero biases; LayerNorm at identity; the patch
    embedding as a linear layer over the flattened patch (Xavier-uniform)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + module.out_channels))
        nn.init.uniform_(module.weight, -bound, bound)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
