import copy
import warnings

import pytest
import torch
from conftest import tiny_model_config

from vqgan.config import LossConfig
from vqgan.losses import VQGANLoss, build_lpips
from vqgan.losses.discriminator import NLayerDiscriminator
from vqgan.tokenizers import VQModel


def make_pair(disc_start=0, perceptual_weight=1.0, disc_norm="batch"):
    torch.manual_seed(0)
    model = VQModel(tiny_model_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lpips = build_lpips(allow_random=True) if perceptual_weight else None
    cfg = LossConfig(perceptual_weight=perceptual_weight, disc_start=disc_start, disc_ndf=8, disc_norm=disc_norm)
    loss = VQGANLoss(cfg, lpips)
    return (model, loss), (copy.deepcopy(model), copy.deepcopy(loss))


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("disc_start,perceptual_weight", [(0, 1.0), (0, 0.0), (10, 1.0)])
def test_fast_generator_step_equals_reference(disc_start, perceptual_weight):
    (fast_model, fast_loss), (ref_model, ref_loss) = make_pair(disc_start, perceptual_weight)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    step = 5

    tapped = {}
    hook = fast_model.decoder.last_layer.register_forward_pre_hook(lambda m, a: tapped.update(x=a[0]))
    rec, qloss, _ = fast_model(x)
    fast = fast_loss.generator_loss(x, rec, qloss, fast_model.decoder.last_layer, tapped["x"], step)
    fast.loss.backward()
    hook.remove()

    rec_r, qloss_r, _ = ref_model(x)
    ref = ref_loss.generator_loss_reference(x, rec_r, qloss_r, ref_model.decoder.last_layer, step)
    ref.loss.backward()

    torch.testing.assert_close(fast.logs["adaptive_weight"], ref.logs["adaptive_weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.logs["total"], ref.logs["total"], rtol=1e-5, atol=1e-6)
    g_fast, g_ref = grads(fast_model), grads(ref_model)
    assert g_fast.keys() == g_ref.keys() and len(g_fast) == len(list(fast_model.parameters()))
    for name in g_ref:  # fp32 sums in another order: errors scale with the gradient, not with each element
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4,
                                   atol=1e-6 + 1e-5 * float(g_ref[name].abs().max()),
                                   msg=name)
    # the generator step never trains the discriminator
    assert not grads(fast_loss.discriminator) and not grads(ref_loss.discriminator)
    if disc_start == 0:
        assert float(fast.logs["adaptive_weight"]) > 0
    else:
        assert float(fast.logs["adaptive_weight"]) == 0


def test_discriminator_step_reusing_generator_logits_equals_fresh_forward():
    (model, loss_a), (_, loss_b) = make_pair(perceptual_weight=0.0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec, qloss, _ = model(x)
    tapped = model.decoder.last_layer  # unused by the D step
    rec_a = rec.clone().requires_grad_(True)
    gen = loss_a.generator_loss(x, rec_a, qloss, tapped, torch.zeros(4, 32, 32, 32), step=0)
    d_a, logs_a = loss_a.discriminator_loss_step(x, rec, gen.logits_fake)
    d_a.backward(inputs=list(loss_a.discriminator.parameters()))
    loss_b.discriminator(rec)  # the same BatchNorm history as the generator step above
    d_b, logs_b = loss_b.discriminator_loss_step(x, rec)
    d_b.backward(inputs=list(loss_b.discriminator.parameters()))
    torch.testing.assert_close(d_a, d_b)
    for (n, ga), gb in zip(grads(loss_a.discriminator).items(), grads(loss_b.discriminator).values()):
        torch.testing.assert_close(ga, gb, msg=n)


def test_disc_schedule():
    loss = VQGANLoss(LossConfig(perceptual_weight=0, disc_start=100, disc_train_start=50, disc_ndf=8), None)
    assert loss.gan_factor(99) == 0 and loss.gan_factor(100) == 1.0
    assert not loss.disc_trains(49) and loss.disc_trains(50)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_losses(kind):
    loss = VQGANLoss(LossConfig(perceptual_weight=0, disc_loss=kind, disc_ndf=8), None)
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    value = float(loss.discriminator_loss(real, fake))
    assert value == pytest.approx(0.0 if kind == "hinge" else float(torch.nn.functional.softplus(torch.tensor(-2.0))))


def test_patchgan_layout_matches_released_keys():
    d = NLayerDiscriminator(3, 64, 3)
    keys = [k for k in d.state_dict() if k.endswith("weight")]
    assert keys == ["main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
                    "main.8.weight", "main.9.weight", "main.11.weight"]
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_actnorm_discriminator_initialises_from_data():
    d = NLayerDiscriminator(3, 8, 2, norm="actnorm")
    out = d.main[:4](torch.randn(4, 3, 32, 32))  # conv, lrelu, conv, actnorm
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_fast_generator_step_equals_reference_with_mse_and_logit_laplace():
    """The new reconstruction terms enter lambda's reconstruction norm on both paths; the logit-Laplace term reads
    the decoder's raw (location, log-scale) output, which the fast path folds the image's gradients into."""
    torch.manual_seed(0)
    mcfg = tiny_model_config()
    mcfg.decoder_output = "logit_laplace"
    model = VQModel(mcfg)
    cfg = LossConfig(pixel_weight=0.5, l2_weight=1.0, logit_laplace_weight=1.0, perceptual_weight=0.0, disc_start=0,
                     disc_ndf=8)
    fast_loss = VQGANLoss(cfg, None)
    ref_model, ref_loss = copy.deepcopy(model), copy.deepcopy(fast_loss)
    x = torch.rand(4, 3, 32, 32) * 2 - 1

    tapped = {}
    hook = model.decoder.last_layer.register_forward_pre_hook(lambda m, a: tapped.update(x=a[0]))
    rec, qloss, info = model(x)
    assert model.decoder.last_layer.out_channels == 6 and rec.shape[1] == 3
    fast = fast_loss.generator_loss(x, rec, qloss, model.decoder.last_layer, tapped["x"], 5,
                                    output=info["decoder_output"])
    fast.loss.backward()
    hook.remove()
    rec_r, qloss_r, info_r = ref_model(x)
    ref = ref_loss.generator_loss_reference(x, rec_r, qloss_r, ref_model.decoder.last_layer, 5,
                                            output=info_r["decoder_output"])
    ref.loss.backward()

    assert {"l1", "l2", "logit_laplace"} <= fast.logs.keys() and float(fast.logs["adaptive_weight"]) > 0
    torch.testing.assert_close(fast.logs["adaptive_weight"], ref.logs["adaptive_weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.logs["total"], ref.logs["total"], rtol=1e-5, atol=1e-6)
    g_fast, g_ref = grads(model), grads(ref_model)
    assert g_fast.keys() == g_ref.keys() and len(g_fast) == len(list(model.parameters()))
    for name in g_ref:  # gradients ~10x those of L1 alone (the NLL's 1/b): float32 rounding reaches ~1e-6
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
