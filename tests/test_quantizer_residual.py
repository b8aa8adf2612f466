"""The residual quantizer (RQ-VAE): residuals shrink with depth, prefixes of the codes decode to partial sums,
quantize_dropout, shared vs separate codebooks and their upkeep, its presets, and a tiny model through training,
`vqgan encode` / `decode` and a prior on its two-depth tokens."""
import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo_crops, tiny_train_config
from PIL import Image

from vqgan.checkpoint import load_model
from vqgan.cli import main
from vqgan.config import CodebookCareConfig, TokenizerTrainConfig, VQGANConfig, load_config, quantizer_config
from vqgan.data.tokens import TokenStore
from vqgan.errors import UserError
from vqgan.presets import CONFIG_DIR
from vqgan.quantizers import ResidualQuantizer, build_quantizer
from vqgan.tokenizers import VQModel
from vqgan.train.stage1 import TokenizerTrainer

CARE = CodebookCareConfig(restart_every=1, restart_after=1, restart_until=1.0)


def make(**options) -> ResidualQuantizer:
    cfg = quantizer_config("residual", **{"depth": 4, "n_embed": 64, "embed_dim": 8, **options})
    cfg.validate()
    return build_quantizer(cfg, cfg.code_width)


def data_initialised(q: ResidualQuantizer, n: int = 2048, scale: float = 1.0, care=CARE) -> ResidualQuantizer:
    q.start_upkeep(care, total_steps=100)
    q.initialize_from(torch.randn(n, q.config.embed_dim) * scale)
    return q


def rows(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@pytest.mark.parametrize("shared", [True, False])
def test_residual_shrinks_with_depth(shared):
    q = data_initialised(make(shared_codebook=shared)).eval()
    z = torch.randn(8, 8, 6, 6)
    out = q(z)
    with torch.no_grad():
        left = [float((z - q.partial_sum(out.indices, k)).square().mean()) if k else float(z.square().mean())
                for k in range(5)]
    assert all(a > b for a, b in itertools.pairwise(left)), left
    assert left[4] < 0.5 * left[0], left
    assert float(out.stats["residual"]) == pytest.approx(left[4] / left[0], rel=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_indices_decode_to_quantized_and_prefixes_to_partial_sums(shared):
    q = data_initialised(make(shared_codebook=shared)).eval()
    z = torch.randn(2, 8, 5, 7)
    out = q(z)
    assert out.indices.shape == (2, 5, 7, 4) and torch.equal(out.codes, out.indices)
    torch.testing.assert_close(q.decode_indices(out.indices), out.quantized, atol=1e-6, rtol=1e-6)
    for k in (1, 2, 3):
        # a quantizer of depth k with the same codebooks picks the same first k codes and returns their sum
        short = make(shared_codebook=shared, depth=k).eval()
        short.load_state_dict({n: t for n, t in q.state_dict().items() if shared or int(n.split(".")[1]) < k})
        head = short(z)
        assert torch.equal(head.indices, out.indices[..., :k])
        torch.testing.assert_close(q.partial_sum(out.indices, k), head.quantized, atol=1e-6, rtol=1e-6)
        codebook = [q.book(d).embedding.weight for d in range(k)]
        by_hand = sum(codebook[d][out.indices[..., d]] for d in range(k)).permute(0, 3, 1, 2)
        torch.testing.assert_close(q.partial_sum(out.indices, k), by_hand)


def depths_seen(q: ResidualQuantizer, z: torch.Tensor, out) -> list[int]:
    """For each sample, the k whose partial sum its `quantized` equals."""
    sums = [q.partial_sum(out.indices, k) for k in range(1, q.config.depth + 1)]
    seen = []
    for b in range(z.shape[0]):
        match = [k + 1 for k, s in enumerate(sums) if torch.allclose(out.quantized[b], s[b], atol=1e-5)]
        assert match, b
        seen.append(match[-1])
    return seen


@pytest.mark.parametrize("estimator", ["straight_through", "rotation"])
def test_the_estimator_per_depth_gives_the_same_codes_and_its_own_gradient(estimator):
    """Per depth: the same value; straight-through then passes `depth` times the gradient (one identity per
    depth, as ResidualVQ), and the rotation trick rotates each depth's residual onto its own code."""
    from vqgan.quantizers.vq import rotation_trick

    q = data_initialised(make(estimator=estimator)).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    g = torch.randn(2, 8, 3, 3)
    outputs, grads = [], []
    for per_depth in (False, True):
        q.config.estimator_per_depth = per_depth
        out = q(z)
        (grad,) = torch.autograd.grad((out.quantized * g).sum(), z)
        outputs.append(out)
        grads.append(grad)
    assert torch.equal(outputs[0].indices, outputs[1].indices)
    torch.testing.assert_close(outputs[0].quantized, outputs[1].quantized)
    if estimator == "straight_through":
        torch.testing.assert_close(grads[1], 4 * grads[0])
    else:  # by hand: each depth's rotation of its residual r_d = z - (codes of depths < d) onto its code
        expected, partial = torch.zeros_like(z), torch.zeros_like(z)
        for d in range(4):
            e = q.partial_sum(outputs[1].indices, d + 1) - partial
            r = z - partial
            expected = expected + torch.autograd.grad((rotation_trick(r, e) * g).sum(), z)[0]
            partial = partial + e
        torch.testing.assert_close(grads[1], expected, rtol=1e-4, atol=1e-5)


def test_quantize_dropout_drops_later_depths_of_some_samples_in_training_only():
    q = data_initialised(make(depth=3, quantize_dropout=0.5))
    z = torch.randn(64, 8, 2, 2)
    torch.manual_seed(3)
    train = q.train()(z)
    seen = depths_seen(q, z, train)
    assert min(seen) < 3 and 10 < seen.count(3) < 54, seen  # about half the samples keep all depths
    assert set(seen) == {1, 2, 3}
    assert train.indices.shape[-1] == 3  # tokens keep every depth
    assert depths_seen(q, z, q.eval()(z)) == [3] * 64
    plain = make(depth=3)
    plain.load_state_dict(q.state_dict())
    assert depths_seen(plain, z, plain.train()(z)) == [3] * 64


def test_shared_and_separate_codebooks_have_the_right_parameter_counts():
    def count(q):
        return sum(p.numel() for p in q.parameters())

    assert count(make(depth=4, shared_codebook=True)) == 64 * 8
    assert count(make(depth=4, shared_codebook=False)) == 4 * 64 * 8
    assert len(make(depth=3, shared_codebook=False).codebooks) == 3
    assert make(depth=3).vocab_per_depth == (64, 64, 64)


def test_data_initialisation_goes_depth_by_depth():
    """Separate codebooks: depth 1's codes come from the residuals after depth 0, far smaller than the latents."""
    q = data_initialised(make(depth=2, shared_codebook=False), scale=10.0)
    norm0 = q.book(0).embedding.weight.norm(dim=1).median()
    norm1 = q.book(1).embedding.weight.norm(dim=1).median()
    assert norm1 < 0.7 * norm0, (norm0, norm1)
    shared = data_initialised(make(depth=2, n_embed=64), scale=10.0)  # half its rows at the residuals' scale
    norms = shared.book(0).embedding.weight.norm(dim=1).sort().values
    assert norms[:16].median() < 0.7 * norms[-16:].median()


def clustered(n: int, width: int = 8) -> torch.Tensor:
    """n latents (n, width) around 16 far-apart centres: after depth 0 only the small spread is left."""
    centres = torch.randn(16, width, generator=torch.Generator().manual_seed(5)) * 10
    return centres[torch.randint(16, (n,))] + torch.randn(n, width)


def test_upkeep_restarts_each_depth_from_its_own_residuals():
    q = make(depth=2, n_embed=32, shared_codebook=False)
    q.start_upkeep(CARE, total_steps=100)
    q.initialize_from(clustered(2048))
    with torch.no_grad():  # rows no latent or residual will ever pick
        for d in range(2):
            q.book(d).embedding.weight[:8] = 1e4
    q.train()
    z = clustered(256).view(4, 8, 8, 8).permute(0, 3, 1, 2)
    for step in range(1, 4):
        out = q(z)
        logs = q.maintain(step, z, out.codes)
        assert set(logs) == {"usage_window", "restarted"}
    assert q.upkeep.restarts_total >= 16 and q.upkeep.last_used.shape == (2, 32)
    moved0 = q.book(0).embedding.weight[:8].norm(dim=1)
    moved1 = q.book(1).embedding.weight[:8].norm(dim=1)
    assert moved0.max() < 100 and moved1.max() < 100  # restarted
    assert moved1.median() < 0.7 * moved0.median()  # depth 1 from depth 1's residuals, not from the latents
    # the state of every depth's upkeep goes into the trainer's checkpoint and back
    saved = copy.deepcopy(q.upkeep.state_dict())
    again = make(depth=2, n_embed=32, shared_codebook=False)
    again.start_upkeep(CARE, total_steps=100).load_state_dict(saved)
    assert torch.equal(again.upkeep.last_used, q.upkeep.last_used)


def test_a_shared_codebook_counts_the_codes_of_every_depth():
    q = data_initialised(make(depth=2, n_embed=32), care=CodebookCareConfig(restart_every=0)).train()
    z = torch.randn(2, 8, 4, 4)
    out = q(z)
    q.maintain(5, z, out.codes)
    used = set(out.codes.reshape(-1).tolist())
    assert set(torch.nonzero(q.upkeep.last_used == 5).reshape(-1).tolist()) == used
    assert used - set(out.codes[..., 0].reshape(-1).tolist())  # some rows won at depth 1 only
    # residuals for latents the forward did not see are recomputed
    q.maintain(6, z.clone(), out.codes)


@pytest.mark.parametrize("options, key", [({"depth": 0}, "model.quantizer.depth"),
                                          ({"n_embed": 1}, "model.quantizer.n_embed"),
                                          ({"quantize_dropout": 1.0}, "model.quantizer.quantize_dropout"),
                                          ({"codebook_kind": "gumbel"}, "model.quantizer.codebook_kind"),
                                          ({"codebook_kind": "residual"}, "model.quantizer.codebook_kind"),
                                          ({"codebook_kind": "nope"}, "model.quantizer.codebook_kind")])
def test_bad_settings_are_one_line_errors(options, key):
    with pytest.raises(UserError, match=key) as err:
        load_config(VQGANConfig, {"quantizer": {"kind": "residual", **options}}).validate()
    assert "\n" not in str(err.value)


def test_presets_load_and_build():
    small = load_config(TokenizerTrainConfig, CONFIG_DIR / "small-cpu-rq.yaml")
    small.validate()
    model = VQModel(small.model)
    assert model.code_spec.levels[0].vocab == (32, 32) and small.model.latent_size == 8
    assert model.code_spec.bits_per_image(64, 64) == 64 * 10  # 10 bits per position
    big = load_config(TokenizerTrainConfig, CONFIG_DIR / "rq-8x8x4.yaml")
    big.validate()
    with torch.device("meta"):
        model = VQModel(big.model)
    assert big.model.latent_size == 8 and model.downsample_factor == 32
    assert model.code_spec.levels[0].vocab == (16384,) * 4 and big.model.quantizer.shared_codebook
    assert sum(p.numel() for p in model.quantize.parameters()) == 16384 * 256


def photos(folder):
    return photo_crops(folder)


def test_a_tiny_residual_model_trains_and_its_tokens_feed_a_prior(tmp_path):
    from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

    folder = photos(tmp_path / "photos")
    cfg = tiny_train_config(tmp_path, data={"path": str(folder), "holdout": 4, "crop": "center", "flip": False},
                            model={"quantizer": {"kind": "residual", "depth": 2, "n_embed": 32, "embed_dim": 16}},
                            loss={"disc_start": 10_000, "disc_train_start": 10_000},
                            train={"steps": 30, "batch_size": 8, "base_learning_rate": 1e-4, "eval_every": 1000,
                                   "ckpt_every": 1000, "codebook": {"restart_every": 10, "restart_after": 20}})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 2.0, (before, after["psnr"])

    model = load_model(tmp_path / "run")
    assert type(model.quantize) is ResidualQuantizer
    images = tmp_path / "some"
    images.mkdir()
    for f in sorted(folder.glob("*.png"))[:6]:
        f.rename(images / f.name)
    assert main(["encode", str(tmp_path / "run"), str(images), str(tmp_path / "tokens"), "--no-progress"]) == 0
    store = TokenStore(tmp_path / "tokens")
    assert store.meta["codes"] == {"levels": [{"factor": 2, "vocab": [32, 32]}]}
    assert np.asarray(store.tokens).shape == (6, 16 * 16 * 2)
    codes = store.rows_to_codes(torch.as_tensor(np.asarray(store.tokens[:1]).astype(np.int64)))
    first = Image.open(images / Path(store.meta["files"][0]).name)
    x = torch.from_numpy(np.array(first)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.equal(codes, model.encode(x))  # the rows hold (h, w, depth) codes, depths of a position together
    assert main(["decode", str(tmp_path / "run"), str(tmp_path / "tokens"), str(tmp_path / "dec"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 6

    prior_cfg = load_config(TransformerTrainConfig, {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "data": {"tokens": str(tmp_path / "tokens"), "holdout": 1},
        "train": {"out_dir": str(tmp_path / "prior"), "steps": 3, "batch_size": 2}})
    prior = PriorTrainer(prior_cfg, progress=False)
    assert prior.fit()["step"] == 3
    sampled = prior.sample(2, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 16, 16, 2) and 0 <= int(sampled.min()) and int(sampled.max()) < 32
    assert model.decode(sampled).shape == (2, 3, 32, 32)


def test_separate_codebooks_train_checkpoint_and_resume(tmp_path):
    quantizer = {"kind": "residual", "depth": 2, "n_embed": 16, "embed_dim": 16, "shared_codebook": False,
                 "quantize_dropout": 0.3}
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer}, train={"steps": 2, "ckpt_every": 2})
    TokenizerTrainer(cfg, progress=False).fit()
    cfg = tiny_train_config(tmp_path, model={"quantizer": quantizer}, train={"steps": 4, "ckpt_every": 2})
    resumed = TokenizerTrainer(cfg, resume=True, progress=False)
    assert resumed.step == 2 and resumed.care.initialized
    assert resumed.fit()["step"] == 4


def test_loss_is_the_commitment_on_the_partial_sums_plus_the_codebook_terms():
    """The gradient the loss sends to the latents: beta * mean over depths of d||z - sg[partial sum d]||^2 / dz."""
    q = data_initialised(make(depth=3, beta=0.25)).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    with torch.no_grad():
        partials = [q.partial_sum(out.indices, k) for k in (1, 2, 3)]
        expected = sum(2 * (z - p) / z.numel() for p in partials) * 0.25 / 3
    torch.testing.assert_close(z.grad, expected)
    q.zero_grad()
    q(z.detach()).loss.backward()  # the codebook terms pull the codes that won towards their residuals
    assert q.book(0).embedding.weight.grad.abs().sum() > 0
