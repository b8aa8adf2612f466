"""Entropy penalties that keep codes used: confident assignments per position, all codes used on the batch.

    penalty = E_z[H(p(.|z))] - H(E_z[p(.|z)])          (in nats; MaskGIT, MAGVIT-v2, LlamaGen)

for a soft assignment p(c|z) of each position to the codes. Two shapes of codebook:
- explicit (vq, ema, each depth of residual): p(k|z) = softmax_k(-||z - e_k||^2 / t), one (N, K) block
  (`assignment_entropies`); gumbel's own logits over its codes (`softmax_entropies`);
- implicit grids (fsq): each channel's own soft assignment to its values, p(c|z) = prod_i p_i(c_i|z), so the
  per-position entropy is the sum of the channels' and the batch mean over all prod(levels) codes is one
  matmul of two channel groups' products (`grid_mean_probs`; never a (N, prod(levels)) tensor). LFQ (lfq.py)
  is the grid of two values a bit: its per-position entropy in closed form, its batch mean through
  `grid_mean_probs`.
Under DDP the batch is the global one: the mean distribution is averaged over ranks (`mean_over_ranks`), so
"all codes used" means over everything the replicas saw in the step, as one process with the whole batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..parallel import is_distributed


def mean_over_ranks(mean: torch.Tensor) -> torch.Tensor:
    """A rank's batch-mean distribution -> the mean over all ranks (equal batches), differentiable. The
    all-reduce's backward sums every rank's gradient of the (identical) loss, and DDP then averages parameter
    gradients over ranks: together exactly the gradient of one process's loss on the union of the batches."""
    if not is_distributed():
        return mean
    world = torch.distributed.get_world_size()
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(mean) / world


# Log-probabilities are floored here before exp: e^-87 .. e^-103 are subnormal floats, which x86 computes ~30x
# slower (exp of a 512 x 1000 block: 15 ms -> 0.5 ms), and products with small gradients fall there too; what the
# floor adds (< 1e-26 a code) is far below float32's resolution of the sums it enters.
LOG_FLOOR = -60.0


def entropy_of(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats of a distribution `p` (K,)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum()


def assignment_entropies(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignments p(k|z) = softmax_k(-||z - e_k||^2 / temperature) of rows z (N, D) to codes (K, D) ->
    (mean over rows of H(p(.|z)), H(mean over rows of p(.|z))), differentiable in both. One (N, K) block: a
    training batch's positions times the codebook (512 x 1024 on the CPU presets)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return softmax_entropies(assignment_logits(z.float(), codebook.float(), temperature))


def assignment_logits(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits (N, K) whose softmax over the codes is softmax_k(-||z_n - e_k||^2 / temperature), for rows z (N, D)
    and codes (K, D): -||z - e||^2 / t less its constant per row, ||z||^2 / t, which the softmax does not see (so
    neither do its gradients): one addmm, differentiable in both."""
    return torch.addmm(-(codebook * codebook).sum(1) / temperature, z, codebook.t(), alpha=2.0 / temperature)


def softmax_entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits (N, K) -> (mean over rows of H(softmax(row)), H(mean over rows of softmax(row)))."""
    with torch.autocast(device_type=logits.device.type, enabled=False):  # float32 throughout, as the sums need
        per_sample, mean = _SoftmaxEntropies.apply(logits.float())
        return per_sample, entropy_of(mean_over_ranks(mean))


class _SoftmaxEntropies(torch.autograd.Function):
    """logits (N, K) -> (mean_n H(p_n), mean_n p_n) with p_n = softmax(logits_n), in a few passes over the (N, K)
    block each way where autograd through the formula takes ~20 (memory-bound: 512 x 1024 x 8 codes, forward +
    backward of `assignment_entropies` on one CPU thread, 20-24 ms -> 6-8 ms). Backward, with a the gradient of
    the first output and g (K,) that of the second:
        d/dlogits_nk = p_nk / N * (-a (log p_nk + H(p_n)) + g_k - sum_j p_nj g_j)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # log_softmax by hand, flooring before the exp (LOG_FLOOR: no subnormals; 2-3x faster than F.log_softmax
        # on these blocks): the floor then sits at LOG_FLOOR - log(sum of the row), no more than log K lower
        log_p = logits - logits.amax(1, keepdim=True)
        p = log_p.clamp_min(LOG_FLOOR).exp_()
        total = p.sum(1, keepdim=True)
        p.div_(total)
        log_p.sub_(total.log_())
        entropies = -torch.linalg.vecdot(p, log_p, dim=1)  # (N,), without an (N, K) product
        ctx.save_for_backward(log_p, p, entropies)
        return entropies.mean(), p.mean(0)

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
        log_p, p, entropies = ctx.saved_tensors
        n = p.shape[0]
        # p_nk * (g_k / N - a / N * log p_nk + r_n), r_n = -(a H(p_n) + sum_j p_nj g_j) / N: three passes
        per_row = -(grad_entropy * entropies + p @ grad_mean) / n
        inner = torch.addcmul(grad_mean / n, log_p, -grad_entropy / n)  # no host sync on the scalar
        return inner.add_(per_row.unsqueeze(1)).mul_(p)


# -- implicit grids ---------------------------------------------------------------------------------------
def grid_log_probs(values: torch.Tensor, levels: Sequence[int], temperature: float) -> torch.Tensor:
    """Each channel's soft assignment to its integer grid: `values` (N, C), channel i bounded to the L_i integers
    -L_i//2 .. (L_i-1)//2 -> log p_i(g|z) = log_softmax_g(-(value_i - g)^2 / temperature), concatenated over the
    channels: (N, sum(levels))."""
    out = []
    for i, level in enumerate(levels):
        grid = torch.arange(level, device=values.device, dtype=values.dtype) - level // 2
        out.append(F.log_softmax(-(values[:, i:i + 1] - grid).square() / temperature, dim=1))
    return torch.cat(out, 1)


# a floor on each channel's probabilities in grid_mean_probs (as LOG_FLOOR elsewhere): e^-40 ~ 4e-18 a code
_GROUP_FLOOR = -40.0


def grid_mean_probs(log_probs: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """`grid_log_probs` output (N, sum(levels)) -> E_n[p(c|z_n)] for every code c of the grid (prod(levels),),
    p(c|z) = prod_i p_i(c_i|z), differentiable. The channels split into a low-digit and a high-digit group whose
    per-position products P_low (N, A) and P_high (N, B) give every code's mean in one matmul, P_low^T P_high / N
    (code c = a + A b, channel 0 the least significant, as fsq.py numbers its codes): no (N, prod(levels)) block
    ([8, 8, 8, 5, 5, 5], 64,000 codes: A = 512, B = 125)."""
    # each channel's probabilities and each group's products floored at e^-40, so that a product of the two
    # groups' stays a normal float (> e^-87)
    probs = log_probs.clamp_min(_GROUP_FLOOR).exp()
    blocks = list(probs.split(list(levels), dim=1))
    sizes = [math.prod(levels[:k]) for k in range(1, len(levels))]
    split = 1 + min(range(len(sizes)), key=lambda k: abs(math.log(sizes[k]) - math.log(math.prod(levels)) / 2),
                    default=0)
    low, high = _row_products(blocks[:split], probs), _row_products(blocks[split:], probs)
    return (high.t() @ low).div_(log_probs.shape[0]).reshape(-1)  # (B, A) row-major: index b * A + a


def _row_products(blocks: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per row, the outer product of the blocks (N, L_i), flattened with the first block's index the least
    significant: (N, prod(L_i)); ones (N, 1) for no block."""
    if not blocks:
        return like.new_ones(like.shape[0], 1)
    out = blocks[0]
    for block in blocks[1:]:  # each product floored as the channels are: no subnormal floats (30-100x slower)
        out = (block.unsqueeze(2) * out.unsqueeze(1)).reshape(out.shape[0], -1).clamp_min(math.exp(_GROUP_FLOOR))
    return out


def grid_entropies(log_probs: torch.Tensor, levels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`grid_log_probs` output (N, sum(levels)) -> (mean over positions of H(p(.|z)), H(mean of p(.|z))) over
    all prod(levels) codes, exactly."""
    per_sample = -(log_probs.clamp_min(LOG_FLOOR).exp() * log_probs).sum(1).mean()  # each channel's block sums to 1
    return per_sample, entropy_of(mean_over_ranks(grid_mean_probs(log_probs, levels)))
