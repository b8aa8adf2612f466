"""The VQGAN objective (Esser et al. 2021, eq. 5-7).

generator:      L = pixel_w * |x - x^| + l2_w * (x - x^)^2 + logit_laplace_w * NLL(x | mu, ln b)
                    (cross-entropy for segmentation maps) + perceptual_w * LPIPS(x, x^) + codebook_w * L_VQ
                    + lambda * disc_factor * (-mean D(x^))
                NLL: DALL-E's logit-Laplace likelihood (likelihood.py), read from the decoder's raw output `output`
                (B, 2C, H, W): location mu and log-scale ln b; the image x^ = median(mu) is computed from it by
                the model. The extra channels stay inside the model and this loss: every other path sees x^.
lambda:         ||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4), clamped to [0, 1e4], times disc_weight,
                W = the decoder's last conv weight, detached.
discriminator:  disc_factor * hinge (or softplus) loss on D(x), D(x^); D is the PatchGAN or, with
                `loss.disc_kind: stylegan`, the StyleGAN one (stylegan_discriminator.py).

Two ways to take the generator's gradients:
- `generator_loss_reference`: as the paper's code, the obviously correct way: gradients of both
  losses with respect to W through autograd, then a full backward of the total loss (LPIPS and D are
  back-propagated twice).
- `generator_loss`: gradients of both losses with respect to the reconstruction x^, once each. Where the
  last layer is a conv whose output is x^ itself, grad_W = conv2d_weight(its input, grad_x^) gives lambda;
  for any other last layer (a ViT decoder's linear patch projection, followed by unpatchify) grad_W is the
  exact vector-Jacobian product of x^ with respect to W, through autograd (a short backward). The combined
  gradient g_rec + lambda * g_gan is then pushed through the autoencoder in one backward. With a raw decoder
  output (logit-Laplace), the gradients with respect to x^ are first carried back to that output (an
  elementwise VJP) and added to the NLL's own, so lambda's reconstruction norm holds every term and the conv
  shortcut applies to the conv that makes the output. The
  discriminator logits on x^ are kept for the discriminator step, which reuses them.
Both give the same lambda and the same parameter gradients (tests/test_objective.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig
from .discriminator import NLayerDiscriminator
from .likelihood import logit_laplace_nll
from .lpips import LPIPS
from .stylegan_discriminator import StyleGANDiscriminator


@dataclass
class GeneratorResult:
    loss: torch.Tensor  # call .backward() on it
    logs: dict[str, torch.Tensor]
    logits_fake: torch.Tensor | None  # D(x^) with its graph to D's parameters, for the D step


class VQGANLoss(nn.Module):
    def __init__(self, config: LossConfig, perceptual: LPIPS | None, in_channels: int = 3, input_kind: str = "rgb",
                 resolution: int = 256):
        super().__init__()
        self.config = config
        self.input_kind = input_kind
        self.perceptual = perceptual if config.perceptual_weight > 0 else None
        self.discriminator = build_discriminator(config, in_channels, resolution)

    @property
    def perceptual_description(self) -> str:
        if self.perceptual is None:
            return "none (loss.perceptual_weight = 0)"
        return self.perceptual.description

    # -- schedule --------------------------------------------------------------------------------
    def gan_factor(self, step: int) -> float:
        """Weight of the GAN term for the generator: 0 before disc_start."""
        return self.config.disc_factor if step >= self.config.disc_start else 0.0

    def disc_trains(self, step: int) -> bool:
        return self.config.disc_factor > 0 and step >= self.config.disc_train_step

    # -- terms -----------------------------------------------------------------------------------
    def reconstruction_loss(self, x: torch.Tensor, rec: torch.Tensor,
                            output: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The weighted reconstruction terms of images `x` and reconstructions `rec`; `output`: the decoder's raw
        output (B, 2C, H, W) = (location, log-scale) where it predicts the logit-Laplace statistics."""
        cfg = self.config
        if self.input_kind == "segmentation":  # one-hot labels in, logits out
            ce = F.cross_entropy(rec.float(), x.argmax(1))
            return cfg.pixel_weight * ce, {"ce": ce.detach()}
        l1 = (x - rec).abs().mean()
        loss = cfg.pixel_weight * l1
        logs = {"l1": l1.detach()}
        if cfg.l2_weight > 0:
            l2 = (x.float() - rec.float()).square().mean()
            loss = loss + cfg.l2_weight * l2
            logs["l2"] = l2.detach()
        if cfg.logit_laplace_weight > 0:
            c = x.shape[1]
            if output is None or output.shape[1] != 2 * c:
                raise ValueError("loss.logit_laplace_weight needs the decoder's (location, log-scale) output of "
                                 f"{2 * c} channels (model.decoder_output=logit_laplace); got "
                                 f"{None if output is None else tuple(output.shape)}")
            nll = logit_laplace_nll(x, output[:, :c], output[:, c:]).mean()
            loss = loss + cfg.logit_laplace_weight * nll
            logs["logit_laplace"] = nll.detach()
        if self.perceptual is not None:
            p = self.perceptual(x.contiguous(), rec.contiguous()).mean()
            loss = loss + self.config.perceptual_weight * p
            logs["lpips"] = p.detach()
        return loss, logs

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.config.disc_loss == "hinge":
            return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())

    def _lambda(self, rec_norm: torch.Tensor, gan_norm: torch.Tensor) -> torch.Tensor:
        w = rec_norm / (gan_norm + 1e-4)
        return w.clamp(0.0, self.config.adaptive_weight_max).detach() * self.config.disc_weight

    # -- generator step --------------------------------------------------------------------------
    def generator_loss(self, x: torch.Tensor, rec: torch.Tensor, codebook_loss: torch.Tensor,
                       last_layer: nn.Module, last_input: torch.Tensor | None, step: int,
                       output: torch.Tensor | None = None) -> GeneratorResult:
        """Fast path. Returns a surrogate loss whose gradient, for the autoencoder, is the objective's:
        sum(top * g) + codebook_weight * L_VQ with g = dL/dtop computed here (LPIPS and D back-propagated
        once, never into D's parameters); `top` is `rec`, or the decoder's raw `output` that `rec` is computed
        from (logit-Laplace). Call `.backward()` on it (through a GradScaler if any)."""
        cfg = self.config
        rec_leaf = rec.detach().requires_grad_(True)
        out_leaf = None if output is None else output.detach().requires_grad_(True)
        rec_loss, logs = self.reconstruction_loss(x, rec_leaf, out_leaf)
        factor = self.gan_factor(step)
        logits_fake = self.discriminator(rec_leaf) if (factor > 0 or self.disc_trains(step)) else None
        leaves = [rec_leaf] if out_leaf is None else [rec_leaf, out_leaf]
        g_leaves = torch.autograd.grad(rec_loss, leaves, allow_unused=True)
        top = rec if output is None else output

        def to_top(g_rec: torch.Tensor | None, g_out: torch.Tensor | None = None) -> torch.Tensor:
            """A gradient with respect to rec (and one with respect to the raw output) -> one with respect to top."""
            g_rec = torch.zeros_like(rec_leaf) if g_rec is None else g_rec
            if output is None:
                return g_rec
            (g,) = torch.autograd.grad(rec, output, grad_outputs=g_rec.to(rec.dtype), retain_graph=True)
            return g.float() + (0 if g_out is None else g_out.float())

        grad = to_top(*g_leaves)
        lam = torch.zeros((), device=x.device)
        total = rec_loss.detach() + cfg.codebook_weight * codebook_loss.detach()
        if factor > 0:
            gan_loss = -logits_fake.mean()
            (g_gan,) = torch.autograd.grad(gan_loss, rec_leaf, retain_graph=True)  # D graph kept for the D step
            g_gan = to_top(g_gan)
            lam = self._lambda(_last_layer_grad(last_layer, last_input, top, grad).norm(),
                               _last_layer_grad(last_layer, last_input, top, g_gan).norm())
            grad = grad + (lam * factor) * g_gan
            total = total + lam * factor * gan_loss.detach()
            logs["gan"] = gan_loss.detach()
        surrogate = (top.float() * grad.detach().float()).sum() + cfg.codebook_weight * codebook_loss
        logs.update(rec=rec_loss.detach(), codebook=codebook_loss.detach(), adaptive_weight=lam,
                    gan_factor=torch.tensor(factor), total=total)
        return GeneratorResult(surrogate, logs, logits_fake)

    def generator_loss_reference(self, x: torch.Tensor, rec: torch.Tensor, codebook_loss: torch.Tensor,
                                 last_layer: nn.Module, step: int,
                                 output: torch.Tensor | None = None) -> GeneratorResult:
        """Slow path, as the paper's code: autograd to W for lambda; returns the total loss itself."""
        cfg = self.config
        rec_loss, logs = self.reconstruction_loss(x, rec, output)
        factor = self.gan_factor(step)
        lam = torch.zeros((), device=x.device)
        loss = rec_loss + cfg.codebook_weight * codebook_loss
        if factor > 0:
            d_params = list(self.discriminator.parameters())
            flags = [p.requires_grad for p in d_params]
            for p in d_params:
                p.requires_grad_(False)  # the generator step must not train D
            gan_loss = -self.discriminator(rec).mean()
            for p, f in zip(d_params, flags):
                p.requires_grad_(f)
            (g_rec,) = torch.autograd.grad(rec_loss, last_layer.weight, retain_graph=True)
            (g_gan,) = torch.autograd.grad(gan_loss, last_layer.weight, retain_graph=True)
            lam = self._lambda(g_rec.norm(), g_gan.norm())
            loss = loss + lam * factor * gan_loss
            logs["gan"] = gan_loss.detach()
        logs.update(rec=rec_loss.detach(), codebook=codebook_loss.detach(), adaptive_weight=lam,
                    total=loss.detach(), gan_factor=torch.tensor(factor))
        return GeneratorResult(loss, logs, None)

    # -- discriminator step ----------------------------------------------------------------------
    def discriminator_loss_step(self, x: torch.Tensor, rec: torch.Tensor,
                                logits_fake: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """D's loss; `logits_fake` from the generator step is reused when given. Back-propagate it with
        `.backward(inputs=D's parameters)`."""
        if logits_fake is None:
            logits_fake = self.discriminator(rec.detach())
        logits_real = self.discriminator(x.detach())
        loss = self.config.disc_factor * self.discriminator_loss(logits_real, logits_fake)
        return loss, {"disc": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}


def build_discriminator(config: LossConfig, in_channels: int, resolution: int) -> nn.Module:
    """`loss.disc_kind`: the PatchGAN (a logit per patch, any image size) or the StyleGAN one (a logit per image,
    built for `resolution`). Both losses (hinge, vanilla) average whatever logits D gives."""
    if config.disc_kind == "stylegan":
        return StyleGANDiscriminator(in_channels, config.disc_ndf, resolution)
    return NLayerDiscriminator(in_channels, config.disc_ndf, config.disc_layers, config.disc_norm)


def _last_layer_grad(layer: nn.Module, inp: torch.Tensor | None, rec: torch.Tensor,
                     grad_rec: torch.Tensor) -> torch.Tensor:
    """d(sum(grad_rec * rec)) / d(layer.weight): the conv shortcut where `rec` is the conv's output itself,
    else the exact path through autograd (the graph is kept for the autoencoder's backward)."""
    if (isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str) and inp is not None and inp.dim() == 4
            and rec.shape[1] == layer.out_channels and tuple(rec.shape[-2:]) == _conv_output_size(layer, inp)):
        return _conv_weight_grad(layer, inp, grad_rec)
    (g,) = torch.autograd.grad(rec, layer.weight, grad_outputs=grad_rec.to(rec.dtype), retain_graph=True)
    return g.float()


def _conv_output_size(conv: nn.Conv2d, inp: torch.Tensor) -> tuple[int, int]:
    out = []
    for size, k, s, p, d in zip(inp.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def _conv_weight_grad(conv: nn.Conv2d, inp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(sum(grad_out * conv(inp))) / d(conv.weight), in float32 even under autocast."""
    with torch.autocast(device_type=inp.device.type, enabled=False):
        return torch.nn.grad.conv2d_weight(inp.float(), conv.weight.shape, grad_out.float(), stride=conv.stride,
                                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
