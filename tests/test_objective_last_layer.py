"""The adaptive GAN weight for a decoder that does not end in a conv (a ViT decoder's linear patch projection)."""
import copy

import torch
from torch import nn

from vqgan.config import LossConfig
from vqgan.losses import VQGANLoss


class LinearHead(nn.Module):
    """Tokens (B, H*W, D) -> image (B, 3, H, W) through a last Linear layer, as a ViT decoder with 1x1 patches."""

    def __init__(self, dim: int = 8, size: int = 32):
        super().__init__()
        self.size = size
        self.body = nn.Linear(dim, dim)
        self.last_layer = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.last_layer(torch.tanh(self.body(tokens)))  # (B, H*W, 3)
        return out.transpose(1, 2).reshape(tokens.shape[0], 3, self.size, self.size)


def test_linear_last_layer_gives_the_reference_adaptive_weight_and_gradients():
    torch.manual_seed(0)
    fast_head, x, tokens = LinearHead(), torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 1024, 8)
    fast_loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_ndf=8), None)
    ref_head, ref_loss = copy.deepcopy(fast_head), copy.deepcopy(fast_loss)
    zero = torch.zeros(())

    tapped = {}
    hook = fast_head.last_layer.register_forward_pre_hook(lambda m, a: tapped.update(x=a[0]))
    fast = fast_loss.generator_loss(x, fast_head(tokens), zero, fast_head.last_layer, tapped["x"] if tapped else None,
                                    step=1)
    hook.remove()
    fast.loss.backward()
    ref = ref_loss.generator_loss_reference(x, ref_head(tokens), zero, ref_head.last_layer, step=1)
    ref.loss.backward()

    assert float(ref.logs["adaptive_weight"]) > 0
    torch.testing.assert_close(fast.logs["adaptive_weight"], ref.logs["adaptive_weight"], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(fast_head.named_parameters(), ref_head.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 + 1e-5 * float(q.grad.abs().max()), msg=name)
