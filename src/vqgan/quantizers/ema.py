"""VQ with an exponential-moving-average codebook (van den Oord et al. 2017, VQ-VAE appendix A.1; taming's
EMAVectorQuantizer).

Each code is the running mean of the encoder outputs assigned to it, not a learnt parameter: per step,

    N_k := decay N_k + (1 - decay) n_k          m_k := decay m_k + (1 - decay) sum of the vectors assigned to k
    e_k := m_k / N~_k,   N~_k = (N_k + eps) / (n + K eps) * n,   n = sum_k N_k   (Laplace smoothing)

and the loss is the commitment term alone, beta ||z - sg[e]||^2. The codebook and its statistics are buffers
(named as taming's EmbeddingEMA: `embedding.weight`, `.cluster_size`, `.embed_avg`), outside the optimizer.

One update per optimizer step, the same on every rank: training forward passes only add up n_k and the sums
(float32, no gradient; several micro-batches under gradient accumulation add up too); `maintain`, which the
trainer calls after the optimizer step, all-reduces them and applies the formulas above, then runs the usual
upkeep (CodebookUpkeep: usage, dead-code restarts). Evaluation forward passes change nothing.

Every code starts with a pseudo-count of one (N_k = 1, m_k = e_k), at construction, after data initialisation
and after a restart: an unused code then stays where it is instead of being divided by ~eps (taming starts at
N_k = 0, which flings every code unused in the first step far away), and a used one moves to its data at once.
Factorized / l2 codes (vq.py) work unchanged: the averages are taken in the lookup space, and with l2_norm the
codes are normalised where they are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..parallel import is_distributed
from ..registry import QUANTIZERS
from .vq import VectorQuantizer, VQConfig


@dataclass
class EMAConfig(VQConfig):
    """`kind: ema`: a `vq` codebook updated by moving averages of its assigned encoder outputs."""

    kind: str = "ema"
    decay: float = 0.99  # weight of the past in the moving averages
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes (no division by zero for unused codes)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if not 0.0 <= self.decay < 1.0:
            raise UserError(f"{where}.decay must be in [0, 1), e.g. 0.99; got {self.decay}")
        if not self.epsilon > 0:
            raise UserError(f"{where}.epsilon must be > 0, e.g. 1e-5; got {self.epsilon}")
        if self.legacy_beta:
            raise UserError(f"{where}.legacy_beta: kind ema has no codebook loss term to weigh; "
                            "set legacy_beta: false")
        if self.linear_codebook:
            raise UserError(f"{where}.linear_codebook: kind ema sets its codes by moving averages, not through a "
                            "learnt map; use kind vq for a linear codebook, or set linear_codebook: false")
        if self.estimator == "index_backprop":
            raise UserError(f"{where}.estimator: index_backprop moves codes by gradient, and kind ema's codes are "
                            "moving averages; use straight_through or rotation, or kind vq")


class EMACodebook(nn.Module):
    """The codes and their moving averages (buffers), plus this step's statistics (not saved: zero between steps)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        n, dim = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("cluster_size", torch.ones(n))
        self.register_buffer("embed_avg", weight.detach().clone())
        self.register_buffer("step_counts", torch.zeros(n), persistent=False)
        self.register_buffer("step_sums", torch.zeros(n, dim), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def reset(self, rows: torch.Tensor) -> None:
        """Rows whose codes were rewritten (data init, restarts) start again from a pseudo-count of one."""
        self.cluster_size[rows] = 1.0
        self.embed_avg[rows] = self.weight[rows].float()


@QUANTIZERS.register("ema", config=EMAConfig)
class EMAVectorQuantizer(VectorQuantizer):
    def __init__(self, config: EMAConfig, in_channels: int | None = None):
        super().__init__(config, in_channels)
        self.embedding = EMACodebook(self.embedding.weight)  # the same init as vq, as buffers

    def code_loss(self, x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        return self.config.beta * F.mse_loss(x.float(), x_q.detach().float())  # the codes have no gradient

    @torch.no_grad()
    def observe(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        if self.training:
            self.embedding.step_counts.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
            self.embedding.step_sums.index_add_(0, indices, flat.detach().float())

    @torch.no_grad()
    def update_codebook(self) -> None:
        """The EMA step from this step's statistics (summed over micro-batches and ranks); clears them."""
        e = self.embedding
        stats = torch.cat([e.step_counts[:, None], e.step_sums], 1)
        if is_distributed():
            dist.all_reduce(stats)  # one collective: every rank then makes the same update
        counts, sums = stats[:, 0], stats[:, 1:]
        e.step_counts.zero_()
        e.step_sums.zero_()
        # nothing seen (no training forward), or non-finite encoder outputs (a step the trainer skips): no update
        if not (bool(counts.sum() > 0) and bool(torch.isfinite(sums).all())):
            return
        decay, eps = self.config.decay, self.config.epsilon
        e.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        e.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
        n = e.cluster_size.sum()
        smoothed = (e.cluster_size + eps) / (n + e.num_embeddings * eps) * n
        e.weight.copy_(e.embed_avg / smoothed[:, None])

    # -- upkeep: the EMA step, then usage and restarts (whose rows restart their averages too) ------
    @torch.no_grad()
    def initialize_from(self, latents: torch.Tensor) -> None:
        super().initialize_from(latents)
        self.embedding.reset(torch.ones(self.embedding.num_embeddings, dtype=torch.bool,
                                        device=self.embedding.weight.device))

    @torch.no_grad()
    def maintain(self, step: int, latents: torch.Tensor, codes: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        self.update_codebook()
        before = self.embedding.weight.clone()
        logs = super().maintain(step, latents, codes, optimizer)
        if logs["restarted"]:
            self.embedding.reset((self.embedding.weight != before).any(1))
        return logs
