"""DALL-E's dVAE (tokenizers/dvae.py): preset shapes, the logit-Laplace likelihood and the image it stands for,
the Gumbel schedules (values at given steps, after a resume), a tiny one learning real photographs, its saved
model and code contract, and its settings' errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_setting_error, photo_crops, run_two_processes, tiny_train_config, train_on_photos

from vqgan.config import CodebookCareConfig, LossConfig, TokenizerTrainConfig, load_config, quantizer_config
from vqgan.losses import VQGANLoss
from vqgan.losses.likelihood import logit_laplace_image, logit_laplace_nll
from vqgan.presets import resolve_config_path
from vqgan.quantizers import build_quantizer
from vqgan.tokenizers import VQModel
from vqgan.train.stage1 import TokenizerTrainer

GUMBEL = {"kind": "gumbel", "n_embed": 64, "embed_dim": 16, "temperature_steps": 8, "kl_warmup_steps": 4,
          "kl_weight": 0.03, "straight_through": False}
TINY = {"encoder": {"kind": "dvae", "hidden_channels": 16, "blocks_per_group": 1, "groups": 3},
        "decoder": {"kind": "dvae", "hidden_channels": 16, "blocks_per_group": 1, "init_channels": 16},
        "z_channels": 16, "decoder_output": "logit_laplace", "quantizer": GUMBEL}
LOSS = {"pixel_weight": 0.0, "logit_laplace_weight": 1.0, "disc_factor": 0.0}


@pytest.mark.parametrize("name,grid,vocab,meta", [("dvae", 32, 8192, True), ("small-cpu-dvae", 8, 256, False)])
def test_presets_build(name, grid, vocab, meta):
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(name))
    assert cfg.model.latent_size == grid and cfg.model.code_spec.levels[0].vocab == (vocab,)
    assert cfg.loss.logit_laplace_weight == 1 and cfg.loss.pixel_weight == cfg.loss.disc_factor == 0
    q = cfg.model.quantizer
    assert q.temperature_at(0) == 1 and q.temperature_at(q.temperature_steps) == 1 / 16
    assert q.kl_weight_at(0) == 0 and q.kl_weight_at(q.kl_warmup_steps) == pytest.approx(6.6 / 192, rel=1e-2)
    with torch.device("meta" if meta else "cpu"):
        model = VQModel(cfg.model)
    assert model.decoder.conv_out.out_channels == 6  # location and log-scale of each of 3 channels
    assert len(model.encoder.group) == len(model.decoder.group) == 4
    if not meta:
        model.eval()
        tokens = model.encode(torch.zeros(2, 3, 64, 64))
        assert tokens.shape == (2, grid, grid, 1) and model.decode(tokens).shape == (2, 3, 64, 64)


def test_logit_laplace_matches_a_hand_computation():
    x, mu, log_b = 0.5, 0.3, -0.7  # a pixel in [-1, 1]; location (logit space) and log-scale
    y = 0.1 + 0.8 * (x + 1) / 2  # mapped into (eps, 1 - eps), eps = 0.1
    b = math.exp(log_b)
    density = 1 / (2 * b * y * (1 - y)) * math.exp(-abs(math.log(y / (1 - y)) - mu) / b)
    got = logit_laplace_nll(torch.tensor([[[[x]]]]), torch.tensor([[[[mu]]]]), torch.tensor([[[[log_b]]]]))
    assert float(got) == pytest.approx(-math.log(density), rel=1e-6)
    # the image is the median sigmoid(mu), unmapped: (sigmoid(mu) - eps) / (1 - 2 eps) in [0, 1] units
    median01 = (1 / (1 + math.exp(-mu)) - 0.1) / 0.8
    assert float(logit_laplace_image(torch.tensor(mu))) == pytest.approx(2 * median01 - 1, rel=1e-6)
    # the loss term is its mean, read from the decoder's raw (location, log-scale) output
    loss = VQGANLoss(LossConfig(pixel_weight=0, logit_laplace_weight=2.0, perceptual_weight=0, disc_ndf=8), None)
    xs, out = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 6, 4, 4)
    value, logs = loss.reconstruction_loss(xs, logit_laplace_image(out[:, :3]), out)
    torch.testing.assert_close(value, 2.0 * logit_laplace_nll(xs, out[:, :3], out[:, 3:]).mean())
    with pytest.raises(ValueError, match="decoder_output=logit_laplace"):
        loss.reconstruction_loss(xs, out[:, :3])


def test_the_model_returns_images_and_hands_the_scale_to_the_loss_alone(tmp_path):
    cfg = tiny_train_config(tmp_path, model=TINY, loss=LOSS).model
    model = VQModel(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec, _, info = model(x)
    assert rec.shape == (2, 3, 32, 32) and info["decoder_output"].shape == (2, 6, 32, 32)
    torch.testing.assert_close(rec, logit_laplace_image(info["decoder_output"][:, :3]))
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 8, 1)
    torch.testing.assert_close(model.decode(tokens), rec)  # eval: argmax tokens, the same image


def test_schedules_follow_the_config():
    q = quantizer_config(**{**GUMBEL, "temperature": 1.0, "temperature_end": 1 / 16, "kl_weight_start": 0.0})
    quantizer = build_quantizer(q, 16)
    cosine = lambda t, a, b: b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))  # noqa: E731
    for step, t_frac, kl_frac in [(0, 0, 0), (2, 0.25, 0.5), (4, 0.5, 1), (8, 1, 1), (100, 1, 1)]:
        logs = quantizer.set_step(step)
        assert quantizer.temperature == pytest.approx(cosine(t_frac, 1.0, 1 / 16))
        assert quantizer.kl_weight == pytest.approx(cosine(kl_frac, 0.0, 0.03))
        assert logs == {"temperature": quantizer.temperature, "kl_weight": quantizer.kl_weight}
    # the KL term is weighted by the scheduled weight: none at step 0
    quantizer.train().set_step(0)
    assert float(quantizer(torch.randn(2, 16, 4, 4)).loss.detach()) == 0
    # no schedule: the constant settings
    plain = build_quantizer(quantizer_config("gumbel", n_embed=8, embed_dim=4, temperature=0.5, kl_weight=1e-3), 4)
    assert plain.set_step(10**6) == {"temperature": 0.5, "kl_weight": 1e-3}


def test_a_resumed_run_continues_the_schedules(tmp_path):
    cfg = tiny_train_config(tmp_path, model=TINY, loss=LOSS, train={"steps": 3, "ckpt_every": 3})
    TokenizerTrainer(cfg, progress=False).fit()
    cfg = tiny_train_config(tmp_path, model=TINY, loss=LOSS, train={"steps": 5, "ckpt_every": 3})
    resumed = TokenizerTrainer(cfg, resume=True, progress=False)
    assert resumed.step == 3
    seen, step = [], resumed.train_step

    def recording(batches):
        out = step(batches)
        seen.append((resumed.step, resumed.model.quantize.temperature, resumed.model.quantize.kl_weight, out))
        return out

    resumed.train_step = recording
    resumed.fit()
    q = cfg.model.quantizer
    assert [s for s, *_ in seen] == [3, 4]
    for s, temperature, kl_weight, logs in seen:
        assert temperature == q.temperature_at(s) and kl_weight == q.kl_weight_at(s)
        assert logs["temperature"] == temperature and "logit_laplace" in logs


@pytest.mark.parametrize("share,temperature", [(1.0, 1.0), (0.0, 1.0), (0.5, 7.0)])
def test_the_entropy_penalty_matches_a_hand_computation(share, temperature):
    """entropy_weight adds w * (s * mean per-position entropy of softmax(logits / t) - entropy of their batch
    mean) to the scheduled KL, s = sample_entropy_weight, t = entropy_temperature, in training only."""
    torch.manual_seed(0)
    q = build_quantizer(quantizer_config(**{**GUMBEL, "kl_weight": 0.0, "kl_warmup_steps": 0, "entropy_weight": 0.3,
                                            "sample_entropy_weight": share, "entropy_temperature": temperature}), 16)
    z = torch.randn(2, 16, 3, 3)
    logits = q.proj(z).detach().permute(0, 2, 3, 1).reshape(-1, 64).double()
    p = (logits / temperature).softmax(1)
    per_sample = -(p * p.log()).sum(1).mean()
    mean = p.mean(0)
    expected = 0.3 * (share * per_sample + (mean * mean.log()).sum())
    assert float(q.train()(z).loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(q.eval()(z).loss.detach()) == 0


def test_dead_codes_restart_as_noisy_copies_of_live_ones():
    """Gumbel codes are chosen by logits, not by distance: a dead code restarts as a copy of a live one (logit row,
    bias, code vector, a little noise), the copies sharing their donor's probability, so the output holds still;
    Adam forgets the restarted rows."""
    torch.manual_seed(0)
    q = build_quantizer(quantizer_config("gumbel", n_embed=16, embed_dim=8, init="dalle"), 8).train()
    q.start_upkeep(CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0), 100)
    q.initialize_from(torch.randn(10, 8))
    with torch.no_grad():
        q.proj.bias[[3, 5]] = 20.0  # two live codes
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    z = torch.randn(4, 8, 3, 3)
    out = q(z)
    (out.quantized.square().mean() + out.loss).backward()
    opt.step()
    with torch.no_grad():
        p_before = F.softmax(q.proj(z), 1)
        mean_code_before = torch.einsum("bkhw,kd->bd", p_before, q.embed.weight)
        donors_before = q.embed.weight[[3, 5]].clone()
    logs = q.maintain(1, z, out.codes, opt)
    assert logs["restarted"] == 14 and q.upkeep.restarts_total == 14 and logs["usage_window"] == 1.0
    with torch.no_grad():
        p_after = F.softmax(q.proj(z), 1)
        # each code is now a copy of 3 or 5: the one whose code vector it is nearly equal to
        origin = torch.cdist(q.embed.weight, donors_before).argmin(1)
        gap = (q.embed.weight - donors_before[origin]).abs().max()
        assert 0 < gap < 0.05 * donors_before.std()  # noise of 1% of a row's spread
        assert {int(origin[3]), int(origin[5])} == {0, 1} and origin.bincount().min() >= 2
        for donor, k in ((0, 3), (1, 5)):
            shared = p_after[:, origin == donor].sum(1)
            torch.testing.assert_close(shared, p_before[:, k], atol=0.02, rtol=0)
        torch.testing.assert_close(torch.einsum("bkhw,kd->bd", p_after, q.embed.weight), mean_code_before,
                                   atol=0.02, rtol=0)
    dead = torch.ones(16, dtype=torch.bool)
    dead[[3, 5]] = False
    for param in (q.proj.weight, q.proj.bias, q.embed.weight):
        moments = opt.state[param]["exp_avg"]
        assert moments[dead].abs().max() == 0 and moments[~dead].abs().max() > 0


def test_a_dead_code_restarts_on_half_of_a_busy_codes_region():
    """restart=data: one code wins every recent output, in two clusters; the dead code takes the cluster of the
    output it was restarted on and nothing of the other, with the busy code's vector, so nothing decoded
    changes; Adam forgets its rows."""
    torch.manual_seed(0)
    q = build_quantizer(quantizer_config("gumbel", n_embed=4, embed_dim=3, init="dalle", restart="data"), 2).train()
    q.start_upkeep(CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0), 100)
    with torch.no_grad():
        q.proj.weight.zero_()
        q.proj.bias.copy_(torch.tensor([5.0, -5.0, -5.0, -5.0]))  # code 0 wins everywhere
    side = torch.tensor([1.0, -1.0]).repeat(32)
    z = torch.stack([3 * side + 0.3 * torch.randn(64), torch.randn(64)], 1).view(8, 8, 2).permute(2, 0, 1)[None]
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    out = q(z)
    (out.quantized.square().mean() + out.loss).backward()
    opt.step()
    q.eval()
    before = q(z).quantized
    counted = torch.zeros(64, dtype=torch.long)
    counted[:2] = torch.tensor([2, 3])  # counted as used: only code 1 is dead
    q.maintain(1, z, counted.view(1, 8, 8, 1), opt)
    codes = q(z).codes.view(64)
    x_side = z[0, 0].reshape(64) > 0
    assert sorted(codes.unique().tolist()) == [0, 1]
    assert len({*codes[x_side].tolist()}) == 1 and len({*codes[~x_side].tolist()}) == 1  # a whole cluster each
    torch.testing.assert_close(q(z).quantized, before)
    with torch.no_grad():  # the output it restarted on (one of the kept ones) is where it leads by the margin, 2
        lead = q.proj(q.upkeep.pool.view(-1, 2, 1, 1)).flatten(1) @ torch.tensor([-1.0, 1.0, 0.0, 0.0])
    assert (lead - 2.0).abs().min() < 1e-4
    moments = opt.state[q.proj.weight]["exp_avg"]
    assert moments[1].abs().max() == 0 and moments[0].abs().max() > 0


def cosine_quantizer(**options) -> torch.nn.Module:
    """A gumbel quantizer with cosine logits in 3 dimensions whose projection is the identity."""
    torch.manual_seed(0)
    q = build_quantizer(quantizer_config("gumbel", n_embed=8, embed_dim=4, codebook_dim=3, init="dalle",
                                         **options), 3).train()
    with torch.no_grad():
        q.project_in.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        q.project_in.bias.zero_()
    return q


def test_cosine_logits_are_the_scaled_cosines_and_every_code_wins_its_own_direction():
    q = cosine_quantizer(logit_scale=5.0)
    z = torch.randn(2, 3, 4, 4) * 3
    cos = F.cosine_similarity(z[:, None], q.codes[None, :, :, None, None], dim=2)  # (B, K, h, w)
    torch.testing.assert_close(q.logits(z), 5.0 * cos)
    # the linear logits can leave a code that wins nowhere; on the sphere each wins at least at its own point
    at_codes = (2 * q.codes.detach()).t().reshape(1, 3, 8, 1)
    assert torch.equal(q.eval()(at_codes).codes.view(8), torch.arange(8))
    out = q.train()(z)
    (out.quantized.square().mean() + out.loss).backward()
    assert q.log_scale.grad is not None and q.codes.grad.abs().sum() > 0 and q.project_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        q.log_scale.fill_(10.0)  # capped at 100, as CLIP's
    torch.testing.assert_close(q.logits(z), 100.0 * cos)


def test_a_dead_cosine_code_restarts_where_a_recent_latent_lies():
    """restart=data with cosine logits: the dead code moves onto a recent latent's point of the sphere, wins it,
    and takes the code vector of the live code that won it, so that latent decodes as before; Adam forgets its rows."""
    q = cosine_quantizer(restart="data")
    q.start_upkeep(CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0), 100)
    near = q.codes.detach()[torch.tensor([1, 2]).repeat(18)]  # latents around codes 1 and 2: the others win none
    z = (2 * near + 0.05 * torch.randn(36, 3)).t().reshape(1, 3, 6, 6)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    out = q(z)
    (out.quantized.square().mean() + out.loss).backward()
    opt.step()
    q.eval()
    before = q(z)
    assert sorted(before.codes.unique().tolist()) == [1, 2]
    before = before.quantized.flatten(2)[0].t()  # (36 positions, 4)
    counted = torch.tensor([1, 2]).repeat(18)
    dead = torch.ones(8, dtype=torch.bool)
    dead[[1, 2]] = False
    logs = q.maintain(1, z, counted.view(1, 6, 6, 1), opt)
    assert logs["restarted"] == 6
    after = q(z)
    on_sphere = q.to_sphere(z.flatten(2)[0].t()).detach()  # the pool holds these 36 latents
    cosines = on_sphere @ F.normalize(q.codes.detach(), dim=1).t()
    for k in dead.nonzero().squeeze(1).tolist():  # each restarted code sits on a latent, wins it, decodes it as before
        row = int(cosines[:, k].argmax())
        assert cosines[row, k] == pytest.approx(1.0, abs=1e-5)
        assert cosines[row, after.codes.view(36)[row]] == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(after.quantized.flatten(2)[0, :, row], before[row])
    for param in (q.codes, q.embed.weight):
        moments = opt.state[param]["exp_avg"]
        assert moments[dead].abs().max() == 0 and moments[~dead].abs().max() > 0


@pytest.mark.slow
def test_two_processes_split_the_same_codes(tmp_path):
    """Each rank sees different latents; the usage counts are all-reduced, so both ranks split the same dead codes
    onto the same donors and end with the same parameters."""
    script = tmp_path / "gumbel_ddp.py"
    script.write_text("""
import torch, torch.distributed as dist
from vqgan.config import CodebookCareConfig, quantizer_config
from vqgan.quantizers import build_quantizer
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
q = build_quantizer(quantizer_config("gumbel", n_embed=32, embed_dim=8, init="dalle"), 8).train()
q.start_upkeep(CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0), 100)
q.initialize_from(torch.randn(10, 8))
with torch.no_grad():
    q.proj.bias[rank] = 20.0 + rank  # rank r's positions all pick code r
restarted = 0
for s in range(1, 3):
    z = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(100 * rank + s))
    restarted += q.maintain(s, z, q(z).codes)["restarted"]
flat = torch.cat([t.float().reshape(-1) for t in q.state_dict().values()])
both = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), "ranks diverged"
if rank == 0:
    print("GUMBEL_RANKS_IDENTICAL", restarted)
dist.barrier()
dist.destroy_process_group()
from vqgan.train.common import leave_worker
leave_worker(0)
""")
    out = run_two_processes(script)
    assert "GUMBEL_RANKS_IDENTICAL" in out
    assert int(out.split("GUMBEL_RANKS_IDENTICAL")[1].split()[0]) >= 30  # both ranks' codes stayed alive


def test_convs_start_as_the_released_code():
    """Normal 1/sqrt(fan_in) weights and zero biases, as dall_e's Conv2d; codes of the gumbel quantizer with
    init dalle as the released decoder's first conv reads a one-hot."""
    torch.manual_seed(0)
    cfg = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-dvae"))
    assert cfg.model.quantizer.init == "dalle"
    model = VQModel(cfg.model)
    convs = [c for part in (model.encoder, model.decoder) for c in part.modules() if isinstance(c, torch.nn.Conv2d)]
    convs.append(model.quantize.proj)
    for conv in convs:
        assert not conv.bias.any()
        if conv.weight.numel() >= 4096:  # enough samples for the std to be within a few percent
            assert conv.weight.std().item() == pytest.approx(conv.weight[0].numel() ** -0.5, rel=0.1)
    assert model.quantize.embed.weight.std().item() == pytest.approx(cfg.model.quantizer.n_embed ** -0.5, rel=0.1)
    taming = build_quantizer(quantizer_config("gumbel", n_embed=64, embed_dim=16), 16)
    assert taming.proj.bias.abs().sum() > 0 and taming.embed.weight.std() > 0.5  # PyTorch's defaults


def test_the_released_init_does_not_start_collapsed(tmp_path):
    """At init, real photographs' logits must depend on the image: with PyTorch's default init the biases
    outweighed the signal and every position picked one of a handful of codes (8 of 1024 on the photo crops)."""
    import numpy as np
    from PIL import Image

    folder = photo_crops(tmp_path / "photos")
    images = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
                          for f in sorted(folder.glob("*.png"))]).float() / 127.5 - 1
    torch.manual_seed(0)
    # the book of the measurement above (the preset's is smaller): what is tested is the init, not the book's size
    cfg = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-dvae"),
                      ["model.resolution=32", "model.quantizer.n_embed=1024"])
    with torch.no_grad():
        codes = VQModel(cfg.model).eval().encode(images)
    assert codes.unique().numel() >= 16, codes.unique().numel()


@pytest.mark.parametrize("override", [
    "model.quantizer.init=pytorch",
    "model.quantizer.restart=sideways",
    "model.encoder.groups=0",
    "model.encoder.residual_gain=0",
    "model.decoder.hidden_channels=30",
    "model.quantizer.temperature_end=0",
    "model.quantizer.kl_warmup_steps=-1",
    "model.quantizer.entropy_weight=-0.1",
    "model.quantizer.sample_entropy_weight=-1",
    "model.quantizer.entropy_temperature=0",
    "model.quantizer.codebook_dim=-1",
    "model.quantizer.logit_scale=0",
    "model.decoder_output=image",  # the logit-Laplace term needs the scale
    "model.decoder_output=gaussian",
    "loss.logit_laplace_weight=-1",
])
def test_bad_settings_are_one_line_errors_naming_the_key(override):
    assert_setting_error("small-cpu-dvae", override)


def test_residual_gain_scales_every_residual_path_and_defaults_to_the_papers():
    cfg = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-dvae"), ["model.decoder.residual_gain=0.5"])
    model = VQModel(cfg.model)
    blocks = cfg.model.encoder.groups * cfg.model.encoder.blocks_per_group
    assert {b.post_gain for g in model.encoder.group for b in g} == {1 / blocks ** 2}  # the paper's post-gain
    assert {b.post_gain for g in model.decoder.group for b in g} == {0.5}
    x = torch.randn(1, 3, 64, 64)
    block = model.decoder.group[1][0]
    h = torch.randn(1, block.res_path[0].in_channels, 8, 8)
    residual = block(h) - block.id_path(h)
    block.post_gain = 1.0
    torch.testing.assert_close(block(h) - block.id_path(h), 2 * residual)
    assert model(x)[0].shape == x.shape


@pytest.mark.slow
def test_a_tiny_dvae_learns_real_photographs(tmp_path):
    """The paper's recipe and the CPU preset's (hard samples, entropy penalty with the per-position term at half
    weight) both learn; in this short run the paper's picks a handful of codes for every photograph (8 of 64
    measured), the preset's keeps most of them in use (36)."""
    from PIL import Image

    preset = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-dvae")).model.quantizer
    recipe = {k: getattr(preset, k) for k in ("straight_through", "entropy_weight", "sample_entropy_weight")}
    assert recipe["straight_through"] and recipe["entropy_weight"] > 0 and 0 < recipe["sample_entropy_weight"] < 1
    photos = photo_crops(tmp_path / "photos")
    images = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
                          for f in sorted(photos.glob("*.png"))]).float() / 127.5 - 1
    distinct = {}
    for name, extra, care in (("paper", {}, {"restart_every": 0}), ("preset", recipe, {})):
        cfg, before, after, model = train_on_photos(
            tmp_path / name, 40, 2e-3, train={"codebook": care} if care else None, loss=LOSS, model={**TINY, "quantizer": {**GUMBEL, "temperature_steps": 40,
                                                                                **extra}})
        assert after > before + 2.0, (name, before, after)
        assert model.config == cfg.model
        distinct[name] = model.eval().encode(images).unique().numel()
    assert distinct["preset"] >= max(24, 2 * distinct["paper"]), distinct
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 8, 1) and model.decode(tokens).shape == (2, 3, 32, 32)
