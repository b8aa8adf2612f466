"""VQ-VAE-2 (Razavi et al. 2019): a tokenizer with two levels of codes, end to end: the model and its code
contract, training, files, token stores, a prior over [top | bottom] rows, and sampling across the levels
(KV cache, completion, a sliding window that keeps the top codes of its region in context)."""
import math

import numpy as np
import pytest
import torch
from conftest import photo_crops, start_inside_one_cell

import vqgan
from vqgan.codes import CodeLevel, CodeSpec
from vqgan.config import TokenizerTrainConfig, load_config
from vqgan.data.tokens import TokenStore, tokenize_folder, write_store
from vqgan.presets import CONFIG_DIR
from vqgan.priors import GPT, GPTConfig
from vqgan.priors.layout import TokenLayout
from vqgan.priors.sampling import sample_images_tokens, sample_levels
from vqgan.priors.windows import LevelWindows
from vqgan.quantizers.grid_start import START_STD
from vqgan.tokenizers import VQVAE2, VQVAE2Config
from vqgan.train.stage1 import TokenizerTrainer

TINY = {"kind": "vqvae2", "resolution": 32, "ch": 32, "res_ch": 16, "num_res_blocks": 1,
        "top_quantizer": {"kind": "ema", "n_embed": 32, "embed_dim": 16},
        "bottom_quantizer": {"kind": "ema", "n_embed": 32, "embed_dim": 16}}


def tiny_config(tmp_path, folder, steps=6, **train) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, {
        "model": TINY,
        "loss": {"perceptual_weight": 0.0, "disc_factor": 0.0, "disc_start": 10_000},
        "data": {"path": str(folder), "holdout": 4, "crop": "center", "flip": False, "num_workers": 0},
        "train": {"out_dir": str(tmp_path / "run"), "steps": steps, "batch_size": 8, "base_learning_rate": 2.5e-4,
                  "log_every": 10, "eval_every": 1000, "ckpt_every": 1000, "image_every": 1000, **train}})


def tiny_model(seed: int = 0) -> VQVAE2:
    torch.manual_seed(seed)
    cfg = load_config(TokenizerTrainConfig, {"model": TINY}).model
    return VQVAE2(cfg).eval()


# -- the model and its code contract ---------------------------------------------------------------


def test_paper_preset_shapes_on_the_meta_device():
    cfg = load_config(TokenizerTrainConfig, CONFIG_DIR / "vqvae2.yaml")
    assert isinstance(cfg.model, VQVAE2Config) and cfg.model.top_quantizer.kind == "ema"
    spec = cfg.model.code_spec
    assert spec.levels == (CodeLevel(8, (512,)), CodeLevel(4, (512,)))  # top first
    assert spec.grids(256, 256) == [(32, 32), (64, 64)] and spec.row_length(256, 256) == 1024 + 4096
    with torch.device("meta"):
        model = VQVAE2(cfg.model)
        x = torch.empty(2, 3, 256, 256)
        features = model.encoder_bottom(x)
        h_top = model.top_prequant(features)
        h_bottom = model.bottom_prequant(features, h_top)
        rec = model.decode_latents(h_top, h_bottom)
    assert features.shape == (2, 128, 64, 64) and h_top.shape == (2, 64, 32, 32)
    assert h_bottom.shape == (2, 64, 64, 64) and rec.shape == (2, 3, 256, 256)
    small = load_config(TokenizerTrainConfig, CONFIG_DIR / "small-cpu-vqvae2.yaml").model
    assert small.code_spec.row_length(64, 64) == 320  # 8x8 top + 16x16 bottom
    assert small.code_spec.bits_per_image(64, 64) == 16 * 16 * 10  # a one-level f4 model with 1024 codes


def test_encode_decode_follow_the_code_contract():
    model = tiny_model()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    spec = model.code_spec
    assert [tuple(c.shape) for c in codes] == [(3, 4, 4, 1), (3, 8, 8, 1)]
    rows = spec.flatten(codes)
    assert rows.shape == (3, spec.row_length(32, 32)) == (3, 16 + 64)
    again = spec.unflatten(rows, spec.grids(32, 32))
    assert all(torch.equal(a, b) for a, b in zip(again, codes))
    rec, loss, info = model(x)  # eval forward: the same codes, the same image as decode(encode(x))
    assert all(torch.equal(a, b) for a, b in zip(info["indices"], codes))
    torch.testing.assert_close(model.decode(codes), rec, atol=1e-5, rtol=1e-5)
    assert loss.dim() == 0 and [p.shape[1] for p in info["prequant"]] == [16, 16]
    with pytest.raises(ValueError, match="level 1"):
        model.decode([codes[0], codes[1] + 32])
    with pytest.raises(ValueError, match="twice the grid"):
        model.decode([codes[0], codes[1][:, :4, :4]])
    with pytest.raises(ValueError, match="2 level"):
        model.decode(codes[0])


def test_any_quantizer_kind_at_each_level():
    cfg = load_config(TokenizerTrainConfig, {"model": {**TINY, "top_quantizer": {"kind": "fsq", "levels": [5, 3]},
                                                        "bottom_quantizer": {"kind": "residual", "depth": 2,
                                                                             "n_embed": 16, "embed_dim": 16}}})
    model = VQVAE2(cfg.model).eval()
    assert model.code_spec.levels == (CodeLevel(8, (15,)), CodeLevel(4, (16, 16)))
    codes = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert codes[0].shape == (2, 4, 4, 1) and codes[1].shape == (2, 8, 8, 2)
    assert model.decode(codes).shape == (2, 3, 32, 32)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    loaded = vqgan.load(tmp_path / "m")
    assert isinstance(loaded, VQVAE2) and loaded.config == model.config
    assert isinstance(VQVAE2.from_pretrained(tmp_path / "m"), VQVAE2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), model.encode(x)))
    text = (tmp_path / "m" / "config.yaml").read_text()
    assert "kind: vqvae2" in text and text.count("factor:") == 2


# -- training ---------------------------------------------------------------------------------------


def test_a_tiny_model_learns_real_images(tmp_path):
    folder = photo_crops(tmp_path / "photos")
    trainer = TokenizerTrainer(tiny_config(tmp_path, folder, steps=30, base_learning_rate=1e-3), progress=False)
    before = trainer.evaluate()["psnr"]
    result = trainer.fit()
    assert result["psnr"] > before + 3, (before, result["psnr"])
    assert "usage_per_stream" in result and len(result["usage_per_stream"]) == 2
    model = vqgan.load(tmp_path / "run")
    assert isinstance(model, VQVAE2)


def test_data_init_goes_level_by_level_and_resume_checks_the_kind(tmp_path):
    folder = photo_crops(tmp_path / "photos")
    trainer = TokenizerTrainer(tiny_config(tmp_path, folder, steps=4, ckpt_every=2), progress=False)
    trainer.begin()
    assert trainer.care.initialized and len(trainer.care.parts) == 2
    # both codebooks hold encoder outputs of their own level (not the random init)
    x = torch.stack([trainer.train_set[i]["image"] for i in range(8)])
    with torch.no_grad():
        _, _, info = trainer.model(x)
    for level, h in zip(trainer.model.quantize.levels, info["prequant"]):
        codebook = level.embedding.weight
        assert codebook.norm(dim=1).mean() == pytest.approx(h.norm(dim=1).mean(), rel=0.5)
    trainer.fit()
    resumed = TokenizerTrainer(tiny_config(tmp_path, folder, steps=6, ckpt_every=2), resume=True, progress=False)
    assert resumed.step == 4


def test_grid_levels_that_start_inside_one_cell_are_centred_level_by_level():
    cfg = load_config(TokenizerTrainConfig, {"model": {**TINY, "top_quantizer": {"kind": "fsq", "levels": [8, 5, 5]},
                                                        "bottom_quantizer": {"kind": "lfq", "bits": 6}}})
    torch.manual_seed(0)
    model = VQVAE2(cfg.model).train()
    start_inside_one_cell(model.quant_conv_top)  # the VQ-VAE's start (grid_start.py), at both levels
    start_inside_one_cell(model.quant_conv_bottom)
    model.quantize.start_upkeep(cfg.train.codebook, total_steps=1)
    assert model.quantize.starts_from_data
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    done = model.initialize_codebook(lambda: iter([x]))
    assert done.count("inside one cell") == 2, done
    with torch.no_grad():
        features = model.encoder_bottom(x)
        top = model.top_prequant(features)
        # the bottom level was centred on the latents that the centred top level's codes give
        bottom = model.bottom_prequant(features, model.quantize_top.decode_indices(model.quantize_top.indices_of(top)))
    for h in (top, bottom):
        torch.testing.assert_close(h.mean((0, 2, 3)), torch.zeros(h.shape[1]), atol=1e-3, rtol=0)
        torch.testing.assert_close(h.std((0, 2, 3)), torch.full((h.shape[1],), START_STD), atol=1e-3, rtol=0)
    codes = model.eval().encode(x)
    assert all(c.reshape(-1, c.shape[-1]).unique(dim=0).shape[0] > 10 for c in codes)


# -- token stores ---------------------------------------------------------------------------------------


def test_a_token_store_of_a_two_level_model_round_trips(tmp_path):
    from vqgan.inference import decode_tokens

    folder = photo_crops(tmp_path / "photos", step=32)
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    result = tokenize_folder(str(tmp_path / "m"), str(folder), str(tmp_path / "store"), batch_size=4, progress=False)
    store = TokenStore(tmp_path / "store")
    assert store.spec == model.code_spec and store.grids == [(4, 4), (8, 8)] and store.row_length == 80
    assert result["count"] == len(store) == 36
    from vqgan.data.images import ImageDataset
    from vqgan.data.sources import image_sources

    sources, _ = image_sources(str(folder))
    ds = ImageDataset(sources, resolution=32, crop="center", flip=False, train=False)
    x = torch.stack([ds[i]["image"] for i in range(4)])
    codes = store.rows_to_codes(torch.stack([store[i]["tokens"] for i in range(4)]))
    assert all(torch.equal(a, b) for a, b in zip(codes, model.encode(x)))
    out = decode_tokens(str(tmp_path / "m"), str(tmp_path / "store"), str(tmp_path / "dec"), progress=False)
    assert out["count"] == 36


# -- the prior over [top | bottom] ------------------------------------------------------------------------

SPEC = CodeSpec((CodeLevel(8, (4,)), CodeLevel(4, (3,))))  # a 2x2 top grid of 4 codes, a 4x4 bottom of 3


def two_level_rows(n: int, seed: int = 0, top=(2, 2)) -> np.ndarray:
    """Top codes uniform over 4; each bottom code is its top parent's code mod 3: the bottom level holds no
    information of its own, so the row's entropy is the top's, 4 log 4 nats."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 4, (n, *top))
    b = (t % 3).repeat(2, 1).repeat(2, 2)
    return np.concatenate([t.reshape(n, -1), b.reshape(n, -1)], 1)


def parents_agree(codes: list[torch.Tensor]) -> float:
    top, bottom = codes[0][..., 0], codes[1][..., 0]
    return float((bottom == (top % 3).repeat_interleave(2, 1).repeat_interleave(2, 2)).float().mean())


def prior_trainer(tmp_path, rows: np.ndarray, top: tuple[int, int], window: int = 0):
    """A small GPT's trainer on a synthetic store of [top | bottom] rows (no tokenizer behind it)."""
    from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

    grids = [list(top), [2 * top[0], 2 * top[1]]]
    write_store(tmp_path / "store", rows, {"tokenizer": {"path": "synthetic", "fingerprint": "none"},
                                           "codes": SPEC.to_dict(), "grids": grids, "row_length": rows.shape[1],
                                           "dtype": SPEC.dtype, "class_names": [], "condition": None, "files": []})
    cfg = load_config(TransformerTrainConfig, {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64},
        "data": {"tokens": str(tmp_path / "store"), "holdout": 32, "window": window},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 150, "batch_size": 32, "learning_rate": 3e-3,
                  "warmup_steps": 10, "log_every": 50, "eval_every": 1000, "ckpt_every": 1000}})
    return PriorTrainer(cfg, progress=False)


def test_the_prior_learns_a_two_level_distribution_and_samples_it(tmp_path):
    trainer = prior_trainer(tmp_path, two_level_rows(384), (2, 2))
    assert trainer.layout.n_embed == 7 and trainer.gpt_config.block_size == 20  # ids: top 0-3, bottom 4-6
    result = trainer.fit()
    floor = 4 * math.log(4) / 20  # nats per token
    assert result["nll"] < floor + 0.08, (result["nll"], floor)
    codes = trainer.sample(64, generator=torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in codes] == [(64, 2, 2, 1), (64, 4, 4, 1)]
    assert parents_agree(codes) > 0.95
    # the loaded prior: cached == uncached, completion keeps the given codes, a larger grid slides across levels
    from vqgan.priors.bundle import Prior

    gpt = trainer.model.eval()
    prior = Prior(gpt, trainer.layout, None, (2, 2), {}, grids=[(2, 2), (4, 4)])
    a = prior.sample(8, generator=torch.Generator().manual_seed(1), use_cache=True)
    b = prior.sample(8, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    keep = [torch.tensor([[True, True], [False, False]]), torch.zeros(4, 4, dtype=torch.bool)]
    c = prior.sample(8, known=a, keep=keep, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c[0][:, 0], a[0][:, 0]) and parents_agree(c) > 0.9
    big = prior.sample(4, (3, 4), generator=torch.Generator().manual_seed(3))
    assert [tuple(x.shape) for x in big] == [(4, 3, 4, 1), (4, 6, 8, 1)]
    assert parents_agree(big) > 0.9  # each bottom window saw the top codes of its region
    slow = prior.sample(4, (3, 4), generator=torch.Generator().manual_seed(3), use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(big, slow))


def test_a_prior_trained_on_windows_samples_the_whole_grid_through_them(tmp_path):
    """The 256-px case in small (1024 + 4096 tokens are too many for one sequence): train on random windows of
    [top | bottom] rows (data.window: 2x2 top positions with their 4x4 bottom ones), sample the store's 4x4 / 8x8
    grids through the window across levels."""
    from vqgan.priors.bundle import Prior
    from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

    trainer = prior_trainer(tmp_path, two_level_rows(256, top=(4, 4)), (4, 4), window=2)
    assert trainer.n_tokens == 20 and trainer.gpt_config.block_size == 20 and trainer.grids == [(2, 2), (4, 4)]
    result = trainer.fit()
    assert result["nll"] < 4 * math.log(4) / 20 + 0.08
    recorded = trainer.config_dict()["conditioning"]  # what load_prior reads (this store has no tokenizer)
    assert recorded["grid"] == [2, 2] and recorded["grids"] == [[2, 2], [4, 4]]
    prior = Prior(trainer.model.eval(), trainer.layout, None, (2, 2), recorded, grids=[(2, 2), (4, 4)])
    codes = prior.sample(8, (4, 4), generator=torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in codes] == [(8, 4, 4, 1), (8, 8, 8, 1)]
    assert parents_agree(codes) > 0.9
    with pytest.raises(vqgan.UserError, match="data.window"):
        PriorTrainer(load_config(TransformerTrainConfig, {"data": {"tokens": str(tmp_path / "store"), "window": 5},
                                                          "train": {"out_dir": str(tmp_path / "run3")}}),
                     progress=False)


def test_the_window_across_levels_sees_the_top_codes_of_its_region():
    grids, windows = [(3, 4), (6, 8)], [(2, 2), (4, 4)]
    policy = LevelWindows(grids, windows, [1, 1])
    top_len = 12
    for pos in range(top_len + 48):
        win = policy(pos)
        seen = win.positions[:win.place]
        assert int(win.positions[win.place]) == pos and bool((seen < pos).all())  # only what is sampled before
        assert len(win.positions) <= 4 + 16 and win.place < len(win.positions)
        if pos >= top_len:  # a bottom position: its window holds the whole top region over the same pixels
            i, j = divmod(pos - top_len, 8)
            top = win.positions[:4]
            ti, tj = divmod(int(top[0]), 4)
            assert torch.equal(top, torch.tensor([ti * 4 + tj, ti * 4 + tj + 1, (ti + 1) * 4 + tj, (ti + 1) * 4 + tj + 1]))
            assert 2 * ti <= i < 2 * ti + 4 and 2 * tj <= j < 2 * tj + 4  # the position lies under that region
    # windows as large as the grids: the plain sampler, token for token
    torch.manual_seed(0)
    layout = TokenLayout.for_codes(SPEC)
    gpt = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=20, n_layer=1, n_head=2, n_embd=32)).eval()
    whole = sample_images_tokens(gpt, layout, 20, 3, generator=torch.Generator().manual_seed(0),
                                 grids=[(2, 2), (4, 4)])
    windowed = sample_images_tokens(gpt, layout, 20, 3, generator=torch.Generator().manual_seed(0),
                                    grids=[(2, 2), (4, 4)], windows=LevelWindows([(2, 2), (4, 4)],
                                                                                 [(2, 2), (4, 4)], [1, 1]))
    assert torch.equal(whole, windowed)
    with pytest.raises(ValueError, match="smaller than the window"):
        sample_levels(gpt, layout, [(1, 1), (2, 2)], 1, windows=[(2, 2), (4, 4)])


# -- the commands, end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_commands_work_on_two_levels(tmp_path):
    from vqgan.cli import main

    folder = photo_crops(tmp_path / "photos")
    cfg = tmp_path / "tiny.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"model": TINY, "loss": {"perceptual_weight": 0.0, "disc_factor": 0.0,
                                                           "disc_start": 10_000},
                                   "data": {"holdout": 4, "num_workers": 0},
                                   "train": {"steps": 10, "batch_size": 8, "eval_every": 1000, "ckpt_every": 1000,
                                             "image_every": 1000}}))
    run = tmp_path / "tok"
    assert main(["train-tokenizer", str(cfg), f"data.path={folder}", f"train.out_dir={run}", "--no-progress"]) == 0
    assert main(["tokenize", str(run), str(folder), str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", f"train.out_dir={tmp_path / 'prior'}",
                 "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "train.steps=5", "train.batch_size=4",
                 "data.holdout=4", "train.eval_every=1000", "train.ckpt_every=1000", "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "s"), "--n", "2", "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "big"), "--n", "1", "--size", "48x64",
                 "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "big" / "sample_000.png").size == (64, 48)
    assert main(["complete", str(tmp_path / "prior"), str(folder), str(tmp_path / "c"), "--n", "2",
                 "--n-images", "2", "--no-progress"]) == 0
    assert (tmp_path / "c" / "completions.png").is_file()


def test_reports_name_both_levels_quantizers(tmp_path):
    from vqgan.checkpoint import save_model
    from vqgan.eval.reconstruction import model_record
    from vqgan.eval.report import describe_config

    model = VQVAE2(load_config(TokenizerTrainConfig, CONFIG_DIR / "small-cpu-vqvae2.yaml").model)
    line = describe_config(model.config_dict())
    assert "top quantizer ema (" in line and "bottom quantizer ema (" in line
    assert "tokens per image: 8x8 x 1 + 16x16 x 1" in line
    save_model(model, tmp_path / "tok")
    assert model_record(model, str(tmp_path / "tok"))["quantizer_kind"] == "ema / ema"
