"""Codebook upkeep for nearest-neighbour VQ: data-dependent initialisation and dead-code restarts.

The state of a quantizer's upkeep (`Quantizer.start_upkeep`); the quantizer passes its codebook in. It counts
codebook rows (`QuantizerOutput.codes`), never token ids, which a quantizer may renumber (taming's remap).

Vanilla VQ collapses: codes that start far from the encoder's outputs never win the argmin, never get a
gradient and stay dead (the reference uses ~1% of its codebook after a short run). Two remedies, as in
Jukebox (Dhariwal et al. 2020) and SoundStream (Zeghidour et al. 2021):
- initialise the codes from actual encoder outputs;
- every `restart_every` steps, move codes unused for `restart_after` steps onto recent encoder outputs.
Decisions are identical on every rank: usage counts are all-reduced and new codes are broadcast.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import CodebookCareConfig
from ..parallel import is_distributed

__all__ = ["CodebookUpkeep", "broadcast", "forget_moments"]


class CodebookUpkeep:
    def __init__(self, n_embed: int, embed_dim: int, config: CodebookCareConfig, total_steps: int,
                 seed: int = 0, pool_size: int | None = None):
        self.config = config
        self.n_embed = n_embed
        self.total_steps = total_steps
        self.pool_size = pool_size or max(4 * n_embed, 4096)
        self.last_used = torch.zeros(n_embed, dtype=torch.long)  # step at which each code last won
        self.epoch_counts = torch.zeros(n_embed, dtype=torch.long)
        self.pool = torch.empty(0, embed_dim)  # recent encoder outputs (CPU, float32)
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.initialized = False
        self.restarts_total = 0

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_used": self.last_used, "epoch_counts": self.epoch_counts, "pool": self.pool,
                "generator": self.generator.get_state(), "initialized": self.initialized,
                "restarts_total": self.restarts_total}

    def load_state_dict(self, state: dict) -> None:
        self.last_used = state["last_used"].clone()
        self.epoch_counts = state["epoch_counts"].clone()
        self.pool = state["pool"].clone()
        self.generator.set_state(state["generator"])
        self.initialized = bool(state["initialized"])
        self.restarts_total = int(state["restarts_total"])

    # -- the work -------------------------------------------------------------------------------
    def _sample(self, vectors: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of `vectors` (without replacement where possible), plus a little noise."""
        if vectors.shape[0] >= n:
            idx = torch.randperm(vectors.shape[0], generator=self.generator)[:n]
        else:
            idx = torch.randint(vectors.shape[0], (n,), generator=self.generator)
        picked = vectors[idx]
        noise = torch.randn(picked.shape, generator=self.generator) * (0.01 * vectors.std().clamp_min(1e-6))
        return picked + noise

    @torch.no_grad()
    def initialize(self, codebook: torch.Tensor, latents: torch.Tensor) -> None:
        """Codes := random encoder outputs, refined by `kmeans_iters` k-means iterations on them. `latents`: (N, D)
        from this rank; rank 0's are used."""
        vectors = latents.detach().float().cpu()
        codes = kmeans(vectors, self._sample(vectors, self.n_embed), self.config.kmeans_iters)
        codebook.copy_(codes.to(codebook))
        broadcast(codebook)
        self.initialized = True

    @torch.no_grad()
    def observe(self, codes: torch.Tensor, latents: torch.Tensor, step: int) -> None:
        """Record which codebook rows won this step (all ranks) and keep some encoder outputs (N, D) for restarts."""
        counts = torch.bincount(codes.reshape(-1), minlength=self.n_embed)
        if is_distributed():
            dist.all_reduce(counts)
        counts = counts.cpu()
        self.last_used[counts > 0] = step
        self.epoch_counts += counts
        flat = latents.detach().float().reshape(-1, latents.shape[-1]).cpu()
        keep = min(flat.shape[0], max(1, self.pool_size // 8))
        flat = flat[torch.randperm(flat.shape[0], generator=self.generator)[:keep]]
        self.pool = torch.cat([self.pool, flat])[-self.pool_size:] if self.pool.shape[0] else flat[-self.pool_size:]

    @torch.no_grad()
    def maybe_restart(self, codebook: torch.Tensor, step: int, optimizer: torch.optim.Optimizer | None) -> int:
        """Move dead codes onto recent encoder outputs; returns how many were moved."""
        dead = self.dead_codes(step)
        if dead is None or self.pool.shape[0] == 0:
            return 0
        n = int(dead.sum())
        new = self._sample(self.pool, n).to(codebook)
        codebook[dead.to(codebook.device)] = new
        broadcast(codebook)
        forget_moments(optimizer, codebook, dead)
        self.restarted(dead, step)
        return n

    def dead_codes(self, step: int) -> torch.Tensor | None:
        """The (n_embed,) bool mask of codes to restart at `step` (unused for `restart_after` steps), or None when
        no restart is due: not a restart step, past `restart_until`, or no code dead. The same on every rank."""
        cfg = self.config
        if cfg.restart_every <= 0 or step % cfg.restart_every or step >= cfg.restart_until * self.total_steps:
            return None
        dead = (step - self.last_used) >= cfg.restart_after
        return dead if bool(dead.any()) else None

    def restarted(self, dead: torch.Tensor, step: int) -> None:
        """Count the codes of `dead` as restarted, and as used at `step` (they get `restart_after` steps to win)."""
        self.last_used[dead] = step
        self.restarts_total += int(dead.sum())

    def epoch_usage(self, reset: bool = True) -> float:
        used = float((self.epoch_counts > 0).float().mean())
        if reset:
            self.epoch_counts.zero_()
        return used

    def window_usage(self, step: int) -> float:
        """Fraction of codes that won at least once in the last `restart_after` steps."""
        return float(((step - self.last_used) < self.config.restart_after).float().mean())


def kmeans(vectors: torch.Tensor, codes: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's iterations from `codes` (K, D) on `vectors` (N, D): each code moves to the mean of the vectors
    nearest to it; a code nearest to none stays where it is (a restart can move it later)."""
    codes = codes.clone()
    for _ in range(iters):
        nearest = torch.cdist(vectors, codes).argmin(1)
        counts = torch.bincount(nearest, minlength=codes.shape[0])
        sums = torch.zeros_like(codes).index_add_(0, nearest, vectors)
        filled = counts > 0
        codes[filled] = sums[filled] / counts[filled, None]
    return codes


def forget_moments(optimizer: torch.optim.Optimizer | None, tensor: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero Adam's moments of the restarted `rows` (a bool mask over dim 0) of parameter `tensor`: stale moments
    would drag the new values back."""
    if optimizer is None:
        return
    state = optimizer.state.get(_param_of(optimizer, tensor), {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows.to(state[key].device)] = 0


def _param_of(optimizer: torch.optim.Optimizer, tensor: torch.Tensor):
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is tensor or p.data_ptr() == tensor.data_ptr():
                return p
    return None


def broadcast(t: torch.Tensor) -> None:
    """Rank 0's `t` on every rank (in place; nothing outside torchrun)."""
    if is_distributed():
        dist.broadcast(t, src=0)
