"""Condition maps end to end: a segmentation tokenizer, a paired token store, map-conditioned sampling at
the training size and larger, completion, and the commands around them."""
import numpy as np
import pytest
import torch
from conftest import tiny_train_config
from PIL import Image

from vqgan.cli import main
from vqgan.config import VQGANConfig, quantizer_config
from vqgan.data.maps import one_hot
from vqgan.data.scenes import SEGMENT_CLASSES, render_scene
from vqgan.data.tokens import TokenStore
from vqgan.tokenizers import VQModel


def f4(**kw) -> VQGANConfig:
    return VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                       z_channels=32, quantizer=quantizer_config(n_embed=32, embed_dim=16), **kw)


def seg_config() -> VQGANConfig:
    n = len(SEGMENT_CLASSES)
    return f4(input_kind="segmentation", in_channels=n, out_ch=n)


def test_segmentation_tokenizer_learns(tmp_path):
    from vqgan.train.stage1 import train_tokenizer

    def run(name, steps):
        return train_tokenizer(tiny_train_config(
            tmp_path / name, model={"input_kind": "segmentation", "in_channels": 8, "out_ch": 8, "ch_mult": [1, 2, 2],
                                    "attn_resolutions": []},
            loss={"disc_factor": 0.0}, data={"path": "builtin:scenes-seg", "builtin_count": 96},
            train={"steps": steps, "batch_size": 8, "base_learning_rate": 5e-5, "eval_every": 1000,
                   "ckpt_every": 1000}), progress=False)

    first, result = run("one", 1), run("forty", 40)
    assert result["accuracy"] > first["accuracy"] + 0.1 and result["accuracy"] > 0.6, (first, result)
    assert 0 < result["miou"] <= 1


def test_map_tokenizer_settings_are_checked(tmp_path):
    from vqgan.errors import UserError

    with pytest.raises(UserError, match="perceptual_weight=0"):
        tiny_train_config(tmp_path, model={"input_kind": "depth", "in_channels": 1, "out_ch": 1},
                          loss={"perceptual_weight": 1.0}).validate()
    with pytest.raises(UserError, match="number of"):
        VQGANConfig(input_kind="segmentation", in_channels=3, out_ch=8).validate()


@pytest.fixture
def conditioned_prior(tmp_path):
    VQModel(f4()).save_pretrained(tmp_path / "tok")
    VQModel(seg_config()).save_pretrained(tmp_path / "segtok")
    assert main(["tokenize", str(tmp_path / "tok"), "builtin:scenes", str(tmp_path / "store"), "--count", "40",
                 "--cond-maps", "builtin:scenes-seg", "--cond-tokenizer", str(tmp_path / "segtok"),
                 "--no-progress"]) == 0
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", "model.n_layer=1",
                 "model.n_embd=32", "model.n_head=2", "train.steps=3", "train.batch_size=8", "data.holdout=8",
                 f"train.out_dir={tmp_path / 'prior'}", "--no-progress"]) == 0
    return tmp_path


def test_paired_store_holds_the_maps_tokens(conditioned_prior):
    tmp = conditioned_prior
    store = TokenStore(tmp / "store")
    assert store.cond_grids == [(8, 8)] and store.cond_tokens.shape == (40, 64)
    segtok = VQModel.from_pretrained(tmp / "segtok").eval()
    seg = torch.from_numpy(np.asarray(render_scene(7, 32)[1], dtype=np.int64))
    assert torch.equal(store[7]["cond"], segtok.encode(one_hot(seg, 8)[None]).reshape(-1))
    assert (tmp / "prior" / "model" / "cond_tokenizer" / "model.safetensors").is_file()
    assert "kind: spatial" in (tmp / "prior" / "model" / "config.yaml").read_text()
    page = (tmp / "prior" / "report.html").read_text()  # the run's page: what was trained, samples, the NLL
    assert "held-out NLL (nats/token)" in page and "report/samples.png" in page and "spatial" in page
    assert (tmp / "prior" / "report" / "nll.png").is_file() and (tmp / "prior" / "report" / "samples.png").is_file()


def test_sample_on_a_segmentation_map_at_and_beyond_the_training_size(conditioned_prior):
    tmp = conditioned_prior
    Image.fromarray(np.asarray(render_scene(3, 32)[1])).save(tmp / "small.png")
    Image.fromarray(np.asarray(render_scene(3, 64)[1])[:48]).save(tmp / "large.png")  # 48x64 px: 12x16 tokens
    assert main(["sample", str(tmp / "prior"), str(tmp / "a"), "--cond-map", str(tmp / "small.png"), "--n", "2",
                 "--no-progress"]) == 0
    assert Image.open(tmp / "a" / "sample_001.png").size == (32, 32)
    assert main(["sample", str(tmp / "prior"), str(tmp / "b"), "--cond-map", str(tmp / "large.png"), "--n", "1",
                 "--no-progress"]) == 0
    assert Image.open(tmp / "b" / "sample_000.png").size == (64, 48)
    assert main(["sample", str(tmp / "prior"), str(tmp / "c"), "--n", "1"]) == 2  # no map given: a clear error
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp / "bad.png")
    assert main(["sample", str(tmp / "prior"), str(tmp / "c"), "--cond-map", str(tmp / "bad.png")]) == 2


def test_complete_with_a_segmentation_conditioned_prior(conditioned_prior):
    tmp = conditioned_prior
    out = tmp / "completed"
    assert main(["complete", str(tmp / "prior"), "builtin:scenes", str(out), "--n", "2", "--n-images", "3",
                 "--cond-maps", "builtin:scenes-seg"]) == 0
    assert Image.open(out / "completions.png").size[0] == 5 * 32 + 6 * 2  # 5 tiles: map, image, masked, 2 completions
    assert (out / "completion_002_001.png").is_file()
    assert main(["complete", str(tmp / "prior"), "builtin:scenes", str(tmp / "x")]) == 2  # the maps are needed


def test_unconditional_large_samples_and_completions(tmp_path):
    VQModel(f4()).save_pretrained(tmp_path / "tok")
    assert main(["tokenize", str(tmp_path / "tok"), "builtin:scenes", str(tmp_path / "store"), "--count", "24",
                 "--no-progress"]) == 0
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", "model.n_layer=1",
                 "model.n_embd=32", "model.n_head=2", "train.steps=2", "train.batch_size=4", "data.holdout=4",
                 f"train.out_dir={tmp_path / 'prior'}", "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "big"), "--n", "1", "--size", "32x96",
                 "--no-progress"]) == 0
    assert Image.open(tmp_path / "big" / "sample_000.png").size == (96, 32)
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "x"), "--size", "30x30"]) == 2
    assert main(["complete", str(tmp_path / "prior"), "builtin:scenes", str(tmp_path / "done"), "--n", "2",
                 "--n-images", "2", "--box", "0.25,0.25,0.75,0.75"]) == 0
    assert (tmp_path / "done" / "completions.png").is_file()
    assert (tmp_path / "done" / "completion_001_001.png").is_file()


def taming_vq_params(model: VQModel) -> dict:
    c = model.config
    return {"embed_dim": c.quantizer.embed_dim, "n_embed": c.quantizer.n_embed,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
            "ddconfig": {"double_z": False, "z_channels": c.z_channels, "resolution": c.resolution,
                         "in_channels": c.in_channels, "out_ch": c.out_ch, "ch": c.ch, "ch_mult": c.ch_mult,
                         "num_res_blocks": c.num_res_blocks, "attn_resolutions": c.attn_resolutions, "dropout": 0.0}}


def test_segmentation_conditioned_taming_transformer_converts_and_samples(tmp_path):
    """A checkpoint in the layout of taming's S-FLCKR model: transformer.*, first_stage_model.*, and a
    VQModel condition stage on one-hot segmentation maps (cond_stage_model.*, with its `colorize` buffer)."""
    import yaml

    from vqgan.priors import GPT, GPTConfig
    from vqgan.priors.load import load_prior

    first, cond_stage = VQModel(f4()).eval(), VQModel(seg_config()).eval()
    gpt = GPT(GPTConfig(vocab_size=32, block_size=127, n_layer=1, n_head=2, n_embd=32)).eval()
    sd = {f"transformer.{k}": v for k, v in gpt.state_dict().items()}
    sd["transformer.blocks.0.attn.mask"] = torch.tril(torch.ones(127, 127)).view(1, 1, 127, 127)
    sd.update({f"first_stage_model.{k}": v for k, v in first.state_dict().items()})
    sd.update({f"cond_stage_model.{k}": v for k, v in cond_stage.state_dict().items()})
    sd["cond_stage_model.colorize"] = torch.randn(3, 8, 1, 1)
    torch.save({"state_dict": sd, "global_step": 0}, tmp_path / "last.ckpt")
    config = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": "segmentation",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
            "vocab_size": 32, "block_size": 127, "n_layer": 1, "n_head": 2, "n_embd": 32}},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": taming_vq_params(first)},
        "cond_stage_config": {"target": "taming.models.vqgan.VQModel", "params": taming_vq_params(cond_stage)}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    assert main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "prior")]) == 0
    for source in (tmp_path / "prior", tmp_path / "last.ckpt"):
        prior = load_prior(str(source))
        assert prior.layout.spatial and prior.layout.taming and prior.layout.cond_len == 64
        assert prior.cond_tokenizer.config.input_kind == "segmentation"
        seg = torch.from_numpy(np.asarray(render_scene(1, 32)[1], dtype=np.int64))
        cond = prior.encode_maps(one_hot(seg, 8)[None])
        assert torch.equal(cond, cond_stage.encode(one_hot(seg, 8)[None]))
        seq = torch.cat([cond.reshape(1, -1), torch.randint(0, 32, (1, 63))], 1)  # taming: no offsets, no start
        with torch.no_grad():
            assert torch.equal(prior.gpt(seq), gpt(seq))
    Image.fromarray(np.asarray(render_scene(1, 32)[1])).save(tmp_path / "map.png")
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "out"), "--cond-map", str(tmp_path / "map.png"),
                 "--n", "1", "--no-progress"]) == 0


def test_depth_conditioning_end_to_end(tmp_path):
    """A depth tokenizer (one channel, L1) on the built-in scenes' depth maps, a store pairing them with the
    images, a depth-conditioned prior, and sampling on a 16-bit depth PNG."""
    from vqgan.data.scenes import depth_from_segmentation
    from vqgan.train.stage1 import train_tokenizer

    def run(name, steps):
        return train_tokenizer(tiny_train_config(
            tmp_path / name, model={"input_kind": "depth", "in_channels": 1, "out_ch": 1, "ch_mult": [1, 2, 2],
                                    "attn_resolutions": []},
            data={"path": "builtin:scenes-depth", "builtin_count": 64},
            train={"steps": steps, "batch_size": 8, "base_learning_rate": 5e-5, "eval_every": 1000,
                   "ckpt_every": 1000}), progress=False)

    first, result = run("one", 1), run("depth", 30)
    assert result["psnr"] > first["psnr"] + 3, (first["psnr"], result["psnr"])
    VQModel(f4()).save_pretrained(tmp_path / "tok")
    assert main(["tokenize", str(tmp_path / "tok"), "builtin:scenes", str(tmp_path / "store"), "--count", "24",
                 "--cond-maps", "builtin:scenes-depth", "--cond-tokenizer", str(tmp_path / "depth" / "run" / "model"),
                 "--no-progress"]) == 0
    assert TokenStore(tmp_path / "store").condition["kind"] == "depth"
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", "model.n_layer=1",
                 "model.n_embd=32", "model.n_head=2", "train.steps=2", "train.batch_size=4", "data.holdout=4",
                 f"train.out_dir={tmp_path / 'prior'}", "--no-progress"]) == 0
    depth = np.asarray(depth_from_segmentation(render_scene(5, 32)[1]))
    Image.fromarray((depth * 65535).astype(np.uint16)).save(tmp_path / "depth16.png")
    assert main(["sample", str(tmp_path / "prior"), str(tmp_path / "out"), "--cond-map", str(tmp_path / "depth16.png"),
                 "--n", "1", "--no-progress"]) == 0
    assert Image.open(tmp_path / "out" / "sample_000.png").size == (32, 32)


def test_complete_never_pairs_an_image_with_another_images_map(conditioned_prior):
    """An unreadable image drops its pair; the next image keeps its own map (they were paired by position)."""
    from vqgan.data.maps import colorize
    from vqgan.eval.report import to_uint8

    tmp = conditioned_prior
    (tmp / "imgs").mkdir()
    (tmp / "maps").mkdir()
    for name, scene in (("a", 1), ("b", 2), ("c", 3)):
        image, seg, _ = render_scene(scene, 32)
        image.save(tmp / "imgs" / f"{name}.png")
        Image.fromarray(np.asarray(seg)).save(tmp / "maps" / f"{name}.png")
    whole = (tmp / "imgs" / "b.png").read_bytes()
    (tmp / "imgs" / "b.png").write_bytes(whole[: len(whole) // 2])  # truncated
    out = tmp / "completed_folder"
    assert main(["complete", str(tmp / "prior"), str(tmp / "imgs"), str(out), "--n", "1", "--cond-maps",
                 str(tmp / "maps"), "--no-progress"]) == 0
    grid = np.asarray(Image.open(out / "completions.png"))
    header = grid.shape[0] - (2 * 34 + 2)  # two rows (a and c) under the column headings
    assert 8 < header < 30
    for row, scene in enumerate((1, 3)):
        expected = to_uint8(colorize(torch.from_numpy(np.asarray(render_scene(scene, 32)[1], dtype=np.int64))[None]))[0]
        tile = grid[header + 2 + row * 34: header + 2 + row * 34 + 32, 2:34]
        assert np.array_equal(tile, expected), f"row {row} shows another image's map"
