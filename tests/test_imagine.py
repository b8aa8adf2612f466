"""`vqgan imagine` (VQGAN+CLIP) without pretrained CLIP: open_clip's ViT-B-32 with random weights, saved in the
real key layout under the real file names, stands in for the released weights. What is checked: the prompt and
story syntax, the spherical-distance loss against a hand computation, loading (explicit file, Hugging Face cache
layout, missing and mismatched files), every steerable quantizer kind, that the optimisation raises the
similarity to the target through decoder, snapping and cutouts, reproducibility, outputs and one-line errors."""
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config, train_on_photos

from vqgan.checkpoint import current_umask
from vqgan.config import TokenizerTrainConfig, load_config
from vqgan.errors import UserError
from vqgan.imagine import memory
from vqgan.imagine.clip_models import ClipModel, ClipSpec, clip_specs, load_clip
from vqgan.imagine.latents import LevelSteer, Steerable
from vqgan.imagine.losses import prompt_loss, spherical_distance
from vqgan.imagine.optimise import OptimiseConfig, Optimiser, Targets
from vqgan.imagine.outputs import MAX_FRAME_MARKS, RunLog, chart_marks, save_animation
from vqgan.imagine.prompts import Prompt, parse_prompts, parse_story, story_from_options
from vqgan.imagine.run import imagine
from vqgan.imagine.settings import ImagineConfig, VideoConfig
from vqgan.quantizers import Quantizer
from vqgan.tokenizers import VQVAE2
from vqgan.tokenizers.model import VQModel

open_clip = pytest.importorskip("open_clip")


HF_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip keeps ViT-B-32 / openai


def one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# -- prompts ----------------------------------------------------------------------------------------------
def test_prompt_weights_negatives_and_stop():
    a, b, c, d = parse_prompts("a red house:1 | fog:-0.5 | a sign: open:2:0.3 | smoke:-1:-1.2")
    assert (a.text, a.weight, a.stop) == ("a red house", 1.0, -math.inf)
    assert (b.text, b.weight) == ("fog", -0.5)
    assert (c.text, c.weight, c.stop) == ("a sign: open", 2.0, 0.3)  # only trailing numbers are fields
    assert (d.weight, d.stop) == (-1.0, -1.2)
    # a STOP that would make the prompt never act: the signed distance of a negative prompt is <= 0
    for item, says in (("fog:-0.5:0.8", "of a negative prompt must lie in -4.93..0"),
                       ("a:1:-1", "must lie in 0..4.93"), ("a:1:10", "must lie in 0..4.93")):
        with pytest.raises(UserError) as err:
            parse_prompts(item)
        assert says in one_line(err), item
    assert parse_prompts("just text")[0].weight == 1.0
    with pytest.raises(UserError) as err:
        parse_prompts("fog:0")
    assert "weight 0" in one_line(err)


def test_image_prompts_and_story(tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"")
    (p,) = parse_prompts(f"{img}:0.5", image=True)
    assert p.image == img and p.weight == 0.5 and p.text == ""
    with pytest.raises(UserError, match="does not exist"):
        parse_prompts(str(tmp_path / "nope.png"), image=True, option="--image-prompt")
    story = parse_story("a house | fog:-0.5 || the sea || a storm @0.8", extra=[p])
    assert [s.start for s in story.scenes] == pytest.approx([0, 0.4, 0.8])
    assert [q.text for q in story.scenes[0].prompts] == ["a house", "fog", ""]
    assert story.at(0.5).prompts[0].text == "the sea" and story.at(0.99).prompts[0].text == "a storm"
    assert len(story.prompts) == 5  # every distinct prompt once (the image prompt joins each scene)
    with pytest.raises(UserError) as err:
        parse_story("a @0.6 || b @0.2")
    assert "first scene" in one_line(err)
    with pytest.raises(UserError, match="either --prompt or --story"):
        story_from_options("a", "b || c", [])


def test_labels_are_distinct_within_a_run(tmp_path):
    from vqgan.imagine.prompts import prompt_labels, unique_names

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cat.png").write_bytes(b"")
    one, two = (parse_prompts(str(tmp_path / f / "cat.png"), image=True)[0] for f in ("a", "b"))
    near, far = parse_prompts("fog:1 | fog:-0.5")
    labels = prompt_labels([one, two, near, far, Prompt("a red house")])
    assert list(labels.values()) == ["a/cat.png", "b/cat.png", "fog (1)", "fog (-0.5)", "a red house"]
    assert unique_names(["a red house at dawn", "a red house at dusk", "fog"], 12) == [
        "a red...awn", "a red...usk", "fog"]  # the start and the end kept
    assert unique_names(["a red house X at dawn", "a red house Y at dawn"], 12) == ["a re...wn #1", "a re...wn #2"]
    assert all(len(n) <= 12 for n in unique_names(["x" * 30, "x" * 31], 12))


# -- the loss ---------------------------------------------------------------------------------------------
def test_spherical_distance_by_hand():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 0.0]])
    # unit vectors at angle theta: ||a - b|| = 2 sin(theta / 2), so d = 2 arcsin(sin(theta / 2))^2 = theta^2 / 2
    expected = torch.tensor([[(math.pi / 2) ** 2 / 2, math.pi ** 2 / 2, 0.0]])
    assert torch.allclose(spherical_distance(a, b), expected, atol=1e-5)


def test_prompt_loss_weight_sign_and_stop():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([1.0, 0.0])
    d = (math.pi / 2) ** 2 / 2  # the second row's distance; the first's is 0
    assert prompt_loss(e, target, Prompt("x", weight=2.0)).item() == pytest.approx(2 * d / 2, rel=1e-5)
    assert prompt_loss(e, target, Prompt("x", weight=-0.5)).item() == pytest.approx(-0.5 * d / 2, rel=1e-5)
    loss = prompt_loss(e, target, Prompt("x", weight=1.0, stop=2.0))  # both distances below stop: no pull
    loss.backward()
    assert loss.item() == pytest.approx(d / 2, rel=1e-5) and e.grad.abs().sum() == 0


# -- CLIP weights -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Iterator[Path]:
    """ViT-B-32 with random weights in open_clip's key layout, under the file name of its Hugging Face repo."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    yield path
    path.unlink(missing_ok=True)  # 580 MB: not kept until the session ends


def hf_cache(root: Path, weights: Path) -> Path:
    """The Hugging Face hub cache layout holding `weights` as HF_REPO's file (a snapshot links to it)."""
    repo = root / ("models--" + HF_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / weights.name).symlink_to(weights)
    return root


@pytest.mark.slow
def test_clip_loads_from_a_file_and_from_the_hf_cache(clip_file, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO):
        clip = load_clip(ClipSpec(pretrained="openai", weights=clip_file))
    assert "No pretrained weights loaded" not in caplog.text  # open_clip's note before our file is loaded
    assert clip.source["file"] == "open_clip_pytorch_model.bin" and len(clip.source["sha256"]) == 64
    assert clip.source["activation"] == "QuickGELU" and clip.source["checked"].startswith("not checked")
    assert clip.input_size == 224
    text = clip.encode_text(["a red house"])
    assert text.shape == (1, 512) and torch.allclose(text.norm(dim=-1), torch.ones(1))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache(tmp_path / "hub", clip_file)))
    cached = load_clip(ClipSpec())  # no tag: openai's set is looked for
    assert cached.source["sha256"] == clip.source["sha256"] and cached.source["pretrained"] == "openai"
    assert torch.equal(cached.encode_text(["a red house"]), text)
    # the cached file passed by path without a tag takes the tag of the repo it lies in
    inside = load_clip(ClipSpec(weights=next((tmp_path / "hub").rglob("open_clip_pytorch_model.bin"))))
    assert inside.source["pretrained"] == "openai" and torch.equal(inside.encode_text(["a red house"]), text)


@pytest.mark.slow
def test_an_untagged_open_clip_file_gets_the_default_activation_and_a_warning(clip_file, caplog):
    with caplog.at_level(logging.WARNING, logger="vqgan.imagine"):
        clip = load_clip(ClipSpec(weights=clip_file))
    assert clip.source["pretrained"] == "not given" and clip.source["activation"] == "GELU"
    assert "no --clip-pretrained tag" in caplog.text and "--clip-pretrained openai" in caplog.text


def test_what_a_checksum_shows(tmp_path, caplog):
    from vqgan.checkpoint import file_sha256
    from vqgan.imagine.clip_checks import identity, published_sha256, tag_of_file

    openai_cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert published_sha256(openai_cfg["url"]) == "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    assert published_sha256("https://x/v0.2-weights/vit_b_32-quickgelu-laion400m_e31-d867053b.pt") == "d867053b"
    assert published_sha256("https://x/model.bin") is None
    blob = tmp_path / "blobs" / "x"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    sha = file_sha256(blob)
    blob = blob.rename(blob.parent / sha)
    link = tmp_path / "snapshots" / "0" / "open_clip_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert identity(link, sha, openai_cfg, "m / t").startswith("intact: sha256 equals the name the Hugging Face")
    with caplog.at_level(logging.WARNING, logger="vqgan.imagine"):
        assert identity(link, "0" * 64, openai_cfg, "m / t").startswith("sha256 differs")
        assert "changed or is corrupt" in caplog.text
        caplog.clear()
        named = tmp_path / "ViT-B-32.pt"
        named.write_bytes(b"random")
        assert identity(named, sha, openai_cfg, "m / t").startswith("NOT the released ViT-B-32.pt")
        assert "not the weights of m / t" in caplog.text
        caplog.clear()
        other = tmp_path / "mine.pt"
        assert identity(other, sha, openai_cfg, "m / t").startswith("not checked") and not caplog.text
    assert identity(other, openai_cfg["url"].split("/")[-2], openai_cfg, "m / t").startswith("sha256 matches the released")
    tags = {t: open_clip.get_pretrained_cfg("ViT-B-32", t) for t in ("openai", "laion2b_s34b_b79k")}
    assert tag_of_file(Path("/c/hub/models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/0/f"),
                              tags) == "laion2b_s34b_b79k"
    assert tag_of_file(Path("/data/open_clip_model.safetensors"), tags) is None
    tags["laion400m_e32"] = open_clip.get_pretrained_cfg("ViT-B-32", "laion400m_e32")
    assert tag_of_file(Path("/w/vit_b_32-quickgelu-laion400m_e32-46683a32.pt"), tags) == "laion400m_e32"
    assert tag_of_file(Path("/w/ViT-B-32.pt"), tags) == "openai"


def test_missing_clip_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip either
    with pytest.raises(UserError) as err:
        load_clip(ClipSpec("ViT-B-32", "openai"))
    message = one_line(err)
    assert "open_clip_model.safetensors" in message and HF_REPO in message and "--clip-weights" in message
    assert "ViT-B-32.pt (https://openaipublic" in message and str(tmp_path / ".cache" / "clip") in message
    with pytest.raises(UserError) as err:
        load_clip(ClipSpec(weights=tmp_path / "gone.bin"))
    assert "does not exist" in one_line(err)


def test_mismatched_clip_weights_are_refused(tmp_path):
    wrong = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"visual.proj": torch.zeros(3, 3), "foo": torch.zeros(1)}, wrong)
    with pytest.raises(UserError) as err:
        load_clip(ClipSpec(weights=wrong))
    assert "does not match the model" in one_line(err) and "missing keys" in str(err.value)


def test_ensemble_options():
    specs = clip_specs(["ViT-B-32"], ["a.bin", "b.bin"], "openai")
    assert [s.weights for s in specs] == [Path("a.bin"), Path("b.bin")]
    assert clip_specs([], [], None) == [ClipSpec()] and ClipSpec().tag == "openai"
    with pytest.raises(UserError, match="one file per model"):
        clip_specs(["ViT-B-32", "ViT-B-16", "RN50"], ["a", "b"], "openai")


# -- the tokenizer side -----------------------------------------------------------------------------------
KINDS = {"vq": {}, "ema": {"kind": "ema"}, "l2-factorized": {"codebook_dim": 4, "l2_norm": True},
         "residual": {"kind": "residual", "depth": 2}, "fsq": {"kind": "fsq", "levels": [4, 4, 2]},
         "lfq": {"kind": "lfq", "bits": 5}, "gumbel": {"kind": "gumbel"}}


def _kind_model(options: dict) -> VQModel:
    opts = dict(options)
    if opts.get("kind") in ("fsq", "lfq"):
        from vqgan.config import VQGANConfig, quantizer_config

        base = tiny_model_config()
        return VQModel(VQGANConfig(**{**base.__dict__, "quantizer": quantizer_config(**opts)})).eval()
    return VQModel(tiny_model_config(**opts)).eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_snaps_with_gradients(kind):
    steer = Steerable(_kind_model(KINDS[kind]))
    (z,) = steer.noise(48, 32, torch.Generator().manual_seed(0))
    z = z.requires_grad_(True)
    image = steer.decode(steer.snap([z]))
    assert image.shape == (1, 3, 32, 48)
    image.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        z.mul_(100)
    steer.clamp_([z])
    if steer.levels[0].range is not None:
        lo, hi = steer.levels[0].range
        assert (z >= lo - 1e-6).all() and (z <= hi + 1e-6).all()


def test_vqvae2_two_levels():
    from test_vqvae2 import TINY

    steer = Steerable(VQVAE2(load_config(TokenizerTrainConfig, {"model": TINY}).model).eval())
    assert steer.factor == 8
    top, bottom = steer.encode(torch.zeros(1, 3, 32, 64))
    assert top.shape[-2:] == (4, 8) and bottom.shape[-2:] == (8, 16)
    assert steer.decode(steer.snap([top, bottom])).shape == (1, 3, 32, 64)


def test_size_and_kind_errors():
    steer = Steerable(VQModel(tiny_model_config()).eval())
    with pytest.raises(UserError) as err:
        steer.check_size(33, 32)
    assert "multiples of the tokenizer's factor 2" in one_line(err)

    class Odd(Quantizer):
        config = type("C", (), {"kind": "odd"})()

    with pytest.raises(UserError) as err:
        LevelSteer(Odd(), 4)
    assert "'odd' cannot be steered" in one_line(err)
    with pytest.raises(UserError, match="not a Linear"):
        Steerable(torch.nn.Linear(2, 2))
    from vqgan.priors import GPT, GPTConfig

    with pytest.raises(UserError, match="not a GPT .a transformer prior: pass the tokenizer whose tokens it models"):
        Steerable(GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)))


def test_memory_suggestion_with_a_fake_budget():
    gib = 2.0**30
    # a fake device: 1 GiB fixed, 0.05 MiB per pixel, 0.25 GiB per cutout
    fake = memory.fit(lambda w, h, n: gib + w * h * 0.05 * 2**20 + n * 0.25 * gib, factor=16, cutn=16)
    assert fake.fixed == pytest.approx(gib) and fake.per_cutout == pytest.approx(0.25 * gib)
    assert fake.predict(0, 0, 0) == pytest.approx(memory.RUN_OVER_TRIALS * gib)  # what a whole run adds
    assert memory.check_fits(fake, 256, 256, 8, free_bytes=20 * gib, factor=16) < 20 * gib
    # 8 GiB free -> a budget of 7.2 = 1.25 * 5.76: 1 + 16 * 0.25 + 0.05 / 1024 * w * h <= 5.76 -> w * h <= 15565
    with pytest.raises(UserError) as err:
        memory.check_fits(fake, 512, 256, 16, free_bytes=8 * gib, factor=16)
    message = one_line(err)
    assert "needs about 14.2 GiB" in message and "--size 176 80 with --cutn 16" in message
    assert "--cutn" not in message.split("with --cutn 16")[1]  # no cutn makes 512 x 256 fit: not suggested
    with pytest.raises(UserError) as err:
        memory.check_fits(fake, 128, 128, 40, free_bytes=8 * gib, factor=16)
    assert one_line(err).endswith("fit: --cutn 15 at --size 128 128")  # (5.76 - 1 - 0.8) / 0.25; no size fits 40


# -- the optimisation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory) -> Path:
    """The tiny conftest tokenizer trained 12 steps on photo crops (its codebook initialised from data)."""
    root = tmp_path_factory.mktemp("tokenizer")
    *_, model = train_on_photos(root, steps=12, lr=2e-4)
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def small_clip() -> ClipModel:
    """ViT-B-32 (random weights) at 64 px input: the same network at ~1/10 of the cost of 224 px per cutout."""
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=64).eval().requires_grad_(False)
    return ClipModel(model, open_clip.get_tokenizer("ViT-B-32"), ClipSpec(), Path("random-vit-b-32.bin"), "-" * 64)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer, side", [("trained_tokenizer", 32), ("demo_tokenizer", 64)],
                         ids=["tiny-vq", "demo-fsq"])
def test_optimisation_raises_the_similarity(tokenizer, side, small_clip, request):
    """The tiny VQ tokenizer (12 steps) and the demo's recipe (FSQ, f = 8; 60 steps) at its 64 px: over 30 steps
    the cutouts' similarity to the prompt rises (measured with seeds 0-5 for the demo's: +0.039 to +0.076)."""
    from vqgan.checkpoint import load_model

    steer = Steerable(load_model(request.getfixturevalue(tokenizer)))
    prompt = Prompt("a red house")
    targets = Targets([small_clip], [prompt], None)
    g = torch.Generator().manual_seed(0)
    # without the augmentations: a random CLIP's response to them swamps its small range of similarities
    config = OptimiseConfig(steps=30, cutn=4, lr=0.1, lr_end=1.0, augment=False, noise=0.0)
    opt = Optimiser(steer, [small_clip], targets, config, steer.noise(side, side, g), None, g)
    sims = [opt.step(s, 30, (prompt,))["similarity"]["a red house"] for s in range(30)]
    assert sum(sims[-5:]) / 5 - sims[0] > 0.03, sims


@pytest.mark.slow
def test_same_seed_same_image_and_outputs(trained_tokenizer, small_clip, tmp_path):
    def run(out, seed=3, **video):
        cfg = ImagineConfig(tokenizer=str(trained_tokenizer), story=parse_story("a house | fog:-0.5 || the sea"),
                            out=tmp_path / out, size=(32, 32), seed=seed, save_every=None if video else 1,
                            progress=False,
                            optimise=OptimiseConfig(steps=3, cutn=2), video=VideoConfig(**video))
        return imagine(cfg, clips=[small_clip])

    first, again = run("a"), run("b")
    assert (tmp_path / "a" / "final.png").read_bytes() == (tmp_path / "b" / "final.png").read_bytes()
    assert first["final_similarity"] == again["final_similarity"]
    other = run("c", seed=4)
    assert (tmp_path / "c" / "final.png").read_bytes() != (tmp_path / "a" / "final.png").read_bytes()
    assert other["clip"][0]["file"] == "random-vit-b-32.bin"
    for name in ("log.jsonl", "report.html", "animation.gif", "steps/step_00001.png", "run.json"):
        assert (tmp_path / "a" / name).is_file(), name
    page = (tmp_path / "a" / "report.html").read_text()
    assert "random-vit-b-32.bin" in page and "the sea" in page and "seed 3" in page
    assert "step_00002, final" in page and "step_00003" not in page  # the last frame is final.png
    assert ("animation.mp4" in page) == any(p.endswith("animation.mp4") for p in first["animation"])
    video = run("v", frames=2, frame_steps=1)
    assert video["steps"] == 5 and (tmp_path / "v" / "frames" / "frame_00002.png").is_file()
    (tmp_path / "v" / "notes.txt").write_text("mine")
    run("v", frames=1, frame_steps=1)  # a shorter run in the same folder: none of the longer one's frames stay
    assert sorted(p.name for p in (tmp_path / "v" / "frames").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert (tmp_path / "v" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("setting, message", [
    ({"video": VideoConfig(frames=2, zoom=0)}, "--zoom 0: must be above 0"),
    ({"video": VideoConfig(fps=0)}, "--fps 0: must be at least 1"),  # the animation of a still run too
    ({"video": VideoConfig(zoom=1.1)}, "--zoom shapes a zoom/pan video: add --frames N"),
    ({"video": VideoConfig(frames=-1)}, "--frames -1: must be at least 0"),
    ({"video": VideoConfig(frames=1, frame_steps=0)}, "--frame-steps 0: must be at least 1"),
    ({"optimise": OptimiseConfig(lr=-1)}, "--lr -1: must be above 0"),
    ({"optimise": OptimiseConfig(cut_pow=-1)}, "--cut-pow -1: must be above 0"),
    ({"optimise": OptimiseConfig(init_weight=-1)}, "--init-weight -1: must be at least 0"),
    ({"optimise": OptimiseConfig(cutn=0)}, "--cutn 0: must be at least 1"),
    ({"optimise": OptimiseConfig(lr_end=float("nan"))}, "--lr-end nan: must be at least 0"),
    ({"seed": -1}, "--seed -1: must lie in 0..2^63-1"),
    ({"video": VideoConfig(frames=2), "save_every": 5}, "--save-every is for a still image"),
    ({"story": parse_story("a || b @1")}, "--story: scene 2 starts @1 and gets none of the run's 300 steps"),
    ({"story": parse_story("a || b @0.95"), "optimise": OptimiseConfig(steps=10)}, "--story: scene 2 starts @0.95 and gets none of the run's 10 steps"),
])
def test_bad_settings_are_refused_before_any_work(setting, message, tmp_path):
    cfg = ImagineConfig(tokenizer=str(tmp_path / "no-such-tokenizer"), story=setting.pop("story", parse_story("a")),
                        out=tmp_path / "out", progress=False, **setting)
    with pytest.raises(UserError) as err:  # the option, not the missing tokenizer: checked first
        imagine(cfg)
    assert one_line(err).startswith(message) and not (tmp_path / "out").exists()


def test_files_are_checked_before_anything_loads(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    taken = tmp_path / "afile"
    taken.write_text("")
    cases = [({"out": taken}, f"--out {taken}: cannot make that folder"),
             ({"out": taken / "sub"}, f"--out {taken / 'sub'}: cannot make that folder (Not a directory)"),
             ({"init_image": bad}, f"--init-image {bad}: not a readable image"),
             ({"story": story_from_options("a", None, [str(bad)])}, f"--image-prompt {bad}: not a readable image")]
    for setting, message in cases:
        cfg = ImagineConfig(tokenizer=str(tmp_path / "no-such-tokenizer"), story=setting.pop("story", parse_story("a")),
                            **{"out": tmp_path / "out", **setting}, progress=False)
        with pytest.raises(UserError) as err:  # before the (missing) tokenizer is loaded
            imagine(cfg)
        assert one_line(err).startswith(message), setting


def test_clip_tags_one_for_all_or_one_per_model(tmp_path, monkeypatch):
    specs = clip_specs(["ViT-B-32", "ViT-B-16"], [], ["laion400m_e32", "laion2b_s34b_b88k"])
    assert [(s.model, s.tag) for s in specs] == [("ViT-B-32", "laion400m_e32"), ("ViT-B-16", "laion2b_s34b_b88k")]
    assert [s.tag for s in clip_specs(["ViT-B-32", "ViT-B-16"], [], ["openai"])] == ["openai", "openai"]
    with pytest.raises(UserError, match="one tag for all, or one per model"):
        clip_specs(["ViT-B-32", "ViT-B-16", "RN50"], [], ["a", "b"])
    with pytest.raises(UserError) as err:  # an explicit file without a tag: no cache to name
        load_clip(ClipSpec(weights=tmp_path / "gone.bin"))
    assert one_line(err).endswith("does not exist; pass the path of an existing weights file")
    png = tmp_path / "house.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UserError) as err:
        load_clip(ClipSpec(weights=png))
    assert "is not a PyTorch file (neither a zip archive nor a pickle)" in one_line(err)


@pytest.mark.slow
def test_video_frames_pull_toward_their_own_start_and_every_scene_is_plotted(trained_tokenizer, small_clip,
                                                                             tmp_path, monkeypatch):
    from vqgan.imagine import outputs, run

    starts = []

    class Recording(Optimiser):
        def __init__(self, steer, clips, targets, config, latents, init, generator):
            super().__init__(steer, clips, targets, config, latents, init, generator)
            starts.append((latents, init))

    plotted = {}

    def line_plot(series, title, **kw):
        plotted[title] = list(series)
        return real_plot(series, title, **kw)

    real_plot = outputs.line_plot
    monkeypatch.setattr(run, "Optimiser", Recording)
    monkeypatch.setattr(outputs, "line_plot", line_plot)
    cfg = ImagineConfig(tokenizer=str(trained_tokenizer), story=parse_story("a house || the sea"),
                        out=tmp_path / "v", size=(32, 32), progress=False,
                        optimise=OptimiseConfig(steps=2, cutn=2, init_weight=1.0),
                        video=VideoConfig(frames=2, frame_steps=1))
    imagine(cfg, clips=[small_clip])
    for latents, pull in starts:  # each frame: its own start (the noise; then the previous frame zoomed)
        assert all(torch.equal(a, b) for a, b in zip(latents, pull))
    rows = [json.loads(line) for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == rows[0]["clip_loss"] and rows[1]["loss"] > rows[1]["clip_loss"]  # pulled from noise
    assert not all(torch.equal(a, b) for a, b in zip(starts[1][0], starts[2][0]))
    similarity = next(v for k, v in plotted.items() if k.startswith("cosine similarity"))
    assert similarity == ["sim a house", "sim the sea"]


@pytest.mark.slow
def test_memory_check_runs_its_trials_and_refuses_with_a_suggestion(trained_tokenizer, small_clip):
    """The check's own trial steps (on CPU here; CUDA's peak counter is the one part a CPU cannot run), measured
    by a fake counter linear in pixels and cutouts, against a fake free memory."""
    from vqgan.checkpoint import load_model
    from vqgan.imagine.run import memory_trial

    steer = Steerable(load_model(trained_tokenizer))
    prompts = (Prompt("a house"),)
    targets = Targets([small_clip], list(prompts), None)
    cfg = ImagineConfig(tokenizer=str(trained_tokenizer), story=parse_story("a house"), progress=False,
                        optimise=OptimiseConfig(cutn=8))
    trial, seen = memory_trial(steer, [small_clip], targets, cfg, prompts, torch.device("cpu")), []

    def measure(w, h, n):
        trial(w, h, n)  # a real step at that setting
        seen.append((w, h, n))
        return 2**30 + w * h * 2**14 + n * 2**27

    model = memory.fit(measure, steer.factor, cfg.optimise.cutn)
    assert seen == [(8, 8, 2), (16, 8, 2), (8, 8, 4)]  # 4 x the factor 2; doubled pixels; doubled cutouts
    with pytest.raises(UserError) as err:
        memory.check_fits(model, 256, 256, 8, free_bytes=4.0 * 2**30, factor=steer.factor)
    # 1.25 x (1 GiB fixed + 1 for 256 x 256 + 1 for 8 cutouts), against 90% of 4: 240 x 240 fits, or 7 cutouts
    assert one_line(err).endswith("needs about 3.8 GiB of GPU memory, 4.0 GiB are free; the largest that fit: "
                                  "--size 240 240 with --cutn 8 or --cutn 7 at --size 256 256")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_keeps_the_image_as_it_stood(signum, code, trained_tokenizer, small_clip, tmp_path, monkeypatch):
    from vqgan.imagine import run

    calls = []

    class SignalledInThird(Optimiser):
        def step(self, step, steps, prompts):
            calls.append(step)
            for _ in range(sends.get(len(calls), 0)):
                os.kill(os.getpid(), signum)  # delivered to the handler between bytecodes, mid-step
            return super().step(step, steps, prompts)

    monkeypatch.setattr(run, "Optimiser", SignalledInThird)
    cfg = ImagineConfig(tokenizer=str(trained_tokenizer), story=parse_story("a house"), out=tmp_path / "i",
                        size=(32, 32), progress=False, optimise=OptimiseConfig(steps=10, cutn=2))
    sends = {3: 1}
    # what the run must leave behind: the handlers it found (a shell's background job starts with SIGINT ignored)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = imagine(cfg, clips=[small_clip])  # the third step finishes, then the run stops and writes
    assert result["stopped_at"] == 3 and result["exit_code"] == code and (tmp_path / "i" / "final.png").is_file()
    assert "Interrupted after 3 of 10 steps" in (tmp_path / "i" / "report.html").read_text()
    assert len((tmp_path / "i" / "log.jsonl").read_text().splitlines()) == 3
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    calls.clear()
    sends = {1: 2}  # asked twice: stops at once, in the first step; the earlier run's log is left as it was
    with pytest.raises(KeyboardInterrupt):
        imagine(cfg, clips=[small_clip])
    assert len((tmp_path / "i" / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_run_stopped_before_its_first_step_leaves_the_folder_as_it_was(trained_tokenizer, small_clip, tmp_path,
                                                                        monkeypatch):
    from vqgan.imagine import run

    (tmp_path / "log.jsonl").write_text("an earlier run\n")
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "step_00001.png").write_bytes(b"an earlier step")

    class Interrupted(Optimiser):
        def __init__(self, *a, **k):
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "Optimiser", Interrupted)
    cfg = ImagineConfig(tokenizer=str(trained_tokenizer), story=parse_story("a house"), out=tmp_path,
                        size=(32, 32), progress=False, optimise=OptimiseConfig(steps=3, cutn=2))
    with pytest.raises(KeyboardInterrupt):
        imagine(cfg, clips=[small_clip])
    assert (tmp_path / "log.jsonl").read_text() == "an earlier run\n"
    assert (tmp_path / "steps" / "step_00001.png").read_bytes() == b"an earlier step"


def test_only_an_earlier_runs_pictures_are_removed(tmp_path):
    """At the first step a run removes the numbered pictures and animations of the run before it, found by its
    log.jsonl; a folder that held no run keeps files of the same names."""
    for folder in ("run", "mine"):
        (tmp_path / folder / "steps").mkdir(parents=True)
        for name in ("steps/step_00001.png", "animation.gif", "notes.txt"):
            (tmp_path / folder / name).write_bytes(b"earlier")
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    for folder in ("run", "mine"):
        RunLog(tmp_path / folder / "log.jsonl").add({"step": 0})
    assert sorted(p.name for p in (tmp_path / "run").rglob("*") if p.is_file()) == ["log.jsonl", "notes.txt"]
    assert len([p for p in (tmp_path / "mine").rglob("*") if p.is_file()]) == 4


def test_the_charts_mark_where_scenes_and_frames_start():
    result = {"steps": 10, "story": [{"start": 0.0}, {"start": 0.5}]}
    rows = [{"frame": 0}] * 4 + [{"frame": 1}] * 3 + [{"frame": 2}] * 3
    assert chart_marks(result, rows) == [(5.0, "scene 2"), (4, "frame 1"), (7, "frame 2")]
    assert chart_marks(result, [{}] * 10) == [(5.0, "scene 2")]  # one image: no frames
    many = [{"frame": k} for k in range(MAX_FRAME_MARKS + 2)]  # too many lines to read the curves: none
    assert chart_marks({"steps": len(many), "story": [{"start": 0.0}]}, many) == []


def _frames(n: int):
    from PIL import Image

    return [Image.new("RGB", (47, 33), (30 * i, 100, 200 - 20 * i)) for i in range(n)]  # odd sides on purpose


def test_mp4_through_imageio_ffmpeg_has_every_frame(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    written = save_animation(_frames(7), tmp_path, fps=10)
    assert [p.name for p in written] == ["animation.gif", "animation.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["animation.gif", "animation.mp4"]  # no temporaries left
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "animation.mp4"))
    assert frames == 7 and seconds == pytest.approx(0.7, abs=0.05)


def test_an_ffmpeg_path_that_is_no_program_keeps_the_gif(tmp_path, monkeypatch, caplog):
    pytest.importorskip("imageio_ffmpeg")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "nonexistent" / "ffmpeg"))
    with caplog.at_level(logging.WARNING, logger="vqgan.imagine"):
        written = save_animation(_frames(3), tmp_path / "out", fps=10)
    assert [p.name for p in written] == ["animation.gif"] and "cannot run" in caplog.text
    assert oct((tmp_path / "out" / "animation.gif").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def test_without_ffmpeg_only_the_gif_and_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` raises ImportError
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with caplog.at_level(logging.INFO, logger="vqgan.imagine"):
        written = save_animation(_frames(3), tmp_path / "out", fps=10)
    assert [p.name for p in written] == ["animation.gif"] and not (tmp_path / "out" / "animation.mp4").exists()
    assert "no ffmpeg found (pip install imageio-ffmpeg" in caplog.text


def test_cli_one_line_errors(tmp_path, monkeypatch, capsys):
    from vqgan.cli import main

    VQModel(tiny_model_config()).save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["imagine", str(tmp_path / "tok"), "--prompt", "a house", "--size", "31", "32", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    assert "multiples" in capsys.readouterr().err
    assert main(["imagine", str(tmp_path / "tok"), "--prompt", "a house", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "CLIP weights for ViT-B-32" in err
