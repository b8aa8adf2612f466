"""What `sample` and `complete` promise under bad input: a one-line error (exit 2) before any work, never
samples that silently ignore an option or decode with the wrong tokenizer."""
import shutil

import pytest
import torch
from conftest import tiny_model_config

from vqgan.checkpoint import save_model
from vqgan.cli import main
from vqgan.convert.taming import convert
from vqgan.priors import GPT, GPTConfig, TokenLayout, pick
from vqgan.tokenizers import VQModel


@pytest.fixture(scope="module")
def built_priors(tmp_path_factory):
    """An unconditional converted taming prior, class priors (ours, and taming's layout) on its tokenizer,
    the same tokenizer converted on its own (the fixtures share the weights), and other tokenizers."""
    from conftest import FIXTURES

    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    root = tmp_path_factory.mktemp("priors")
    convert(FIXTURES / "transformer.ckpt", root / "uncond", FIXTURES / "transformer.yaml")
    convert(FIXTURES / "vqgan.ckpt", root / "same_tok", FIXTURES / "vqgan.yaml")
    other = tiny_model_config()
    other.ch_mult = [1, 2, 2]  # factor 4, as the prior's: an 8x8 grid of 64 codes, other weights
    VQModel(other).save_pretrained(root / "other_tok")
    VQModel(tiny_model_config(n_embed=128)).save_pretrained(root / "bigger_tok")
    for name, layout in (("class", TokenLayout(64, n_classes=2)),
                         ("taming_class", TokenLayout(64, n_classes=2, scheme="taming"))):
        gpt = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
        conditioning = {"kind": "class", **layout.to_dict(), "grid": [8, 8], "class_names": ["cat", "dog"]}
        save_model(gpt, root / name, {**gpt.config_dict(), "conditioning": conditioning})
        shutil.copytree(root / "uncond" / "tokenizer", root / name / "tokenizer")
    return root


@pytest.fixture
def priors(built_priors, tmp_path):
    """A copy per test: tests change these folders."""
    shutil.copytree(built_priors, tmp_path, dirs_exist_ok=True)
    return tmp_path


def sample(priors, prior, *options):
    return main(["sample", str(priors / prior), str(priors / "out"), "--n", "1", "--no-progress", *options])


def test_a_tokenizer_other_than_the_priors_is_refused_unless_forced(priors, capsys):
    assert sample(priors, "uncond", "--tokenizer", str(priors / "other_tok")) == 2
    err = capsys.readouterr().err
    assert "was trained on the tokens of tokenizer" in err and "--force" in err
    assert not (priors / "out").exists()
    assert sample(priors, "uncond", "--tokenizer", str(priors / "same_tok")) == 0  # the same weights elsewhere
    assert sample(priors, "uncond", "--tokenizer", str(priors / "other_tok"), "--force") == 0
    assert sample(priors, "uncond", "--tokenizer", str(priors / "bigger_tok"), "--force") == 2  # codes out of range
    assert "has 128 codes, but" in capsys.readouterr().err


def test_a_changed_tokenizer_at_the_recorded_path_is_refused(priors, capsys):
    """A trained prior without a bundled copy decodes with the tokenizer at the path it records."""
    import yaml

    from vqgan.checkpoint import fingerprint, load_model

    config = yaml.safe_load((priors / "class" / "config.yaml").read_text())
    config["conditioning"].update(tokenizer=str(priors / "same_tok"),
                                  tokenizer_fingerprint=fingerprint(load_model(priors / "same_tok")))
    (priors / "class" / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(priors / "class" / "tokenizer")
    assert sample(priors, "class", "--label", "cat") == 0
    VQModel(tiny_model_config()).save_pretrained(priors / "same_tok")  # retrained in place since
    assert sample(priors, "class", "--label", "cat") == 2
    assert "recorded by it" in capsys.readouterr().err


@pytest.mark.parametrize("prior, options, expected", [
    ("uncond", ["--guidance", "3"], "needs a class-conditional prior"),
    ("class", ["--guidance", "3"], "needs --label"),
    ("taming_class", ["--guidance", "3", "--label", "dog"], "no 'no class' token"),
    ("taming_class", [], "needs --label"),
])
def test_guidance_where_it_would_change_nothing_is_an_error(priors, capsys, prior, options, expected):
    assert sample(priors, prior, *options) == 2
    assert expected in capsys.readouterr().err
    complete = ["complete", str(priors / prior), "builtin:scenes", str(priors / "done"), "--n", "1",
                "--n-images", "1", "--no-progress", *options]
    assert main(complete) == 2
    assert expected in capsys.readouterr().err


def test_guidance_with_a_label_on_a_class_prior_samples(priors):
    assert sample(priors, "class", "--guidance", "3", "--label", "dog") == 0
    assert (priors / "out" / "sample_000.png").is_file()


@pytest.mark.parametrize("options, expected", [
    (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--top-k", "-5"], "--top-k -5: must be at least 0"),
    (["--top-p", "1.5"], "--top-p 1.5: must be between 0 and 1"),
    (["--top-p", "-0.1"], "--top-p -0.1: must be between 0 and 1"),
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--device", "gpu"], "PyTorch calls a GPU 'cuda'"),
])
def test_bad_sample_options_are_one_line_errors(priors, capsys, options, expected):
    assert sample(priors, "uncond", *options) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not (priors / "out").exists()


@pytest.mark.parametrize("options, expected", [
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--n-images", "0"], "--n-images 0: must be at least 1"),
    (["--temperature", "-1"], "must be > 0"),
])
def test_bad_complete_options_are_one_line_errors(priors, capsys, options, expected):
    command = ["complete", str(priors / "uncond"), "builtin:scenes", str(priors / "done"), "--no-progress"]
    assert main(command + options) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["sample", "complete"])
def test_an_output_path_that_is_a_file_is_refused(priors, capsys, command):
    (priors / "taken").write_text("keep me")
    inputs = ["builtin:scenes"] if command == "complete" else []
    assert main([command, str(priors / "uncond"), *inputs, str(priors / "taken"), "--n", "1"]) == 2
    assert "is an existing file" in capsys.readouterr().err and (priors / "taken").read_text() == "keep me"


def test_complete_shows_progress_unless_told_not_to(priors, capsys):
    command = ["complete", str(priors / "uncond"), "builtin:scenes", str(priors / "done"), "--n", "1",
               "--n-images", "1"]
    assert main(command) == 0
    assert "complete" in capsys.readouterr().err and (priors / "done" / "completion_000_000.png").is_file()
    assert main(command + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_pick_refuses_a_temperature_that_is_not_positive():
    logits = torch.randn(2, 10)
    for temperature in (-1.0, 0.0):
        with pytest.raises(ValueError, match="must be > 0"):
            pick(logits, temperature=temperature)
    assert torch.equal(pick(logits, greedy=True), logits.argmax(-1))
