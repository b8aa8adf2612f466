"""The contract every quantizer honours: `forward(z) -> QuantizerOutput`, `decode_indices(indices)`, its code
spec (`vocab_per_depth`: how many codes each position holds, and the vocabulary of each; see codes.py), and its
own codebook upkeep (`start_upkeep`, `initialize_from`, `maintain`), which the trainer only calls."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import CodebookCareConfig, QuantizerConfig
from .codebook import CodebookUpkeep


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, h, w), straight-through: the value of the codes, the gradient of z
    indices: torch.Tensor  # (B, h, w, depth) int64 token ids; depth d lies in [0, vocab_per_depth[d])
    loss: torch.Tensor  # scalar auxiliary loss (codebook + commitment, entropy, KL: the quantizer's own)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging
    # (B, h, w, depth) int64: the codebook rows that won, which upkeep counts. The token ids unless the quantizer
    # renumbers its tokens (taming's `remap`: token t stands for row used[t]); filled in when not given.
    codes: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.codes is None:
            self.codes = self.indices


class Quantizer(nn.Module):
    """Base of every quantizer: built from its typed config section (`config`) and the latent width."""

    config: QuantizerConfig
    upkeep: CodebookUpkeep | None = None

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w, depth) int64 -> (B, C, h, w) code vectors: the `quantized` of the forward pass."""
        raise NotImplementedError

    def set_step(self, step: int) -> dict[str, float]:
        """Called by the trainer before each training step's forward with the step about to run (0-based; a resumed
        run passes its restored step): a kind with schedules (Gumbel: temperature, KL weight) sets them from it,
        statelessly. Returns the scheduled values for the logs; the default has none."""
        return {}

    def grid_position(self, latents: torch.Tensor) -> torch.Tensor | None:
        """(N, C) latents -> where each channel lies on the grid, in grid steps, for a kind whose codes are a fixed
        grid over the latent's channels (fsq, lfq: grid_start.py checks that training starts on it); else None."""
        return None

    def grid_values(self, latents: torch.Tensor) -> torch.Tensor | None:
        """(N, C) latents -> the value each channel rounds to, for a grid kind (as `grid_position`); else None."""
        return None

    @property
    def starts_from_data(self) -> bool:
        """Whether the trainer's data initialisation has work here: a codebook to fill, or a grid to start on."""
        return self.trainable_codebook() is not None or type(self).grid_values is not Quantizer.grid_values

    def indices_of(self, z: torch.Tensor) -> torch.Tensor:
        """Just the indices of latents `z` (tokenizing): a kind may skip its losses and statistics here."""
        return self(z).indices

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return self.config.vocab_per_depth

    @property
    def depth(self) -> int:
        return len(self.vocab_per_depth)

    def check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """`indices` as int64 (B, h, w, depth), or a TypeError / ValueError naming what is wrong."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        if indices.dim() != 4 or indices.shape[-1] != self.depth:
            raise ValueError(f"indices must be (B, h, w, {self.depth}), got shape {tuple(indices.shape)}")
        return indices.long()

    # -- codebook upkeep -------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """How many codebook rows upkeep counts (the token vocabulary unless tokens are renumbered)."""
        return max(self.vocab_per_depth)

    def trainable_codebook(self) -> torch.Tensor | None:
        """The codebook that data initialisation and dead-code restarts rewrite; None where codes are not
        learnt as vectors matched by distance (e.g. Gumbel: chosen by logits), which only tracks usage."""
        return None

    def start_upkeep(self, config: CodebookCareConfig, total_steps: int, seed: int = 0) -> CodebookUpkeep:
        """Begin upkeep for a training run; returns its state (plain values: `state_dict`/`load_state_dict`,
        which the trainer saves with its checkpoints) and usage read-outs for the logs."""
        width = self.trainable_codebook().shape[1] if self.trainable_codebook() is not None else 0
        self.upkeep = CodebookUpkeep(self.codebook_size, width, config, total_steps, seed=seed)
        return self.upkeep

    @torch.no_grad()
    def initialize_from(self, latents: torch.Tensor) -> None:
        """Data-dependent initialisation: codes := random encoder outputs `latents` (N, D) (rank 0's)."""
        codebook = self.trainable_codebook()
        if codebook is not None:
            self._require_upkeep().initialize(codebook, latents)
        self._require_upkeep().initialized = True

    @torch.no_grad()
    def maintain(self, step: int, latents: torch.Tensor, codes: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """One step of upkeep after the optimizer step: count the rows that won (`codes`, QuantizerOutput.codes,
        all-reduced across ranks), keep some encoder outputs `latents` (B, D, h, w), restart dead codes (the same
        change on every rank). Returns `usage_window` (the share of codes that won at least once in the last
        `restart_after` steps of training batches: codes kept alive by restarts count, so it overstates what
        held-out images use) and `restarted` for the logs."""
        upkeep = self._require_upkeep()
        flat = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        upkeep.observe(codes, flat, step)
        codebook = self.trainable_codebook()
        restarted = upkeep.maybe_restart(codebook, step, optimizer) if codebook is not None else 0
        return {"usage_window": upkeep.window_usage(step), "restarted": restarted}

    def _require_upkeep(self) -> CodebookUpkeep:
        if self.upkeep is None:
            raise RuntimeError(f"{type(self).__name__}: call start_upkeep(...) before codebook upkeep")
        return self.upkeep


def codebook_stats(indices: torch.Tensor, n_embed: int) -> dict[str, torch.Tensor]:
    """Fraction of codes used and perplexity (exp of the entropy of the code histogram)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_embed).float()
    return stats_from_counts(counts)


def stats_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": torch.exp(entropy)}


def perplexity_from_counts(counts) -> float:
    total = float(sum(counts))
    if total == 0:
        return 0.0
    return math.exp(-sum((c / total) * math.log(c / total) for c in counts if c > 0))
