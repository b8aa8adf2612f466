"""The keys and values of the positions a GPT has seen, so that sampling costs one position per new token."""
from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """Per-layer keys and values of the positions seen so far, in buffers allocated once for `capacity`
    positions: (B, n_head, capacity, head_dim) each; new positions are written in place. A cache serves one
    model's weights and one batch size."""

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions stored (advanced by `advance` once every layer has appended)
        self.weights: list[tuple[torch.Tensor, ...]] | None = None  # GPT._next_position's, gathered once
        self.native: Any = None  # the C step (vqgan.native.decode) bound to those weights and these buffers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) after the cached positions; returns all keys and values so far."""
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_empty(b, h, self.capacity, d)
            self.values[layer] = v.new_empty(b, h, self.capacity, d)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
