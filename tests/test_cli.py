import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_model_config
from PIL import Image

from vqgan.cli import main
from vqgan.data.tokens import TokenStore
from vqgan.tokenizers import VQModel


@pytest.fixture
def tokenizer(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    (d / "broken.jpg").write_bytes(b"xx")
    return d


def test_encode_decode_reconstruct(tmp_path, tokenizer, images, capsys):
    assert main(["encode", str(tokenizer), str(images), str(tmp_path / "tokens"), "--no-progress"]) == 0
    store = TokenStore(tmp_path / "tokens")  # encode writes the one token format
    tokens, meta = np.asarray(store.tokens), store.meta
    assert tokens.shape == (5, 16 * 16) and tokens.dtype == np.uint16  # rows in the code spec's order
    assert meta["grids"] == [[16, 16]] and meta["codes"] == {"levels": [{"factor": 2, "vocab": [64]}]}
    assert len(meta["files"]) == 5
    assert main(["decode", str(tokenizer), str(tmp_path / "tokens"), str(tmp_path / "dec"), "--no-progress"]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 5
    assert main(["reconstruct", str(tokenizer), str(images), str(tmp_path / "rec"), "--no-progress"]) == 0
    lines = (tmp_path / "rec" / "psnr.csv").read_text().splitlines()
    assert lines[0] == "file,reconstruction,psnr" and len(lines) == 6


def test_decode_rejects_wrong_tokenizer_range_and_shape(tmp_path, tokenizer, images, capsys):
    main(["encode", str(tokenizer), str(images), str(tmp_path / "tokens"), "--no-progress"])
    other = VQModel(tiny_model_config())
    other.save_pretrained(tmp_path / "other")
    assert main(["decode", str(tmp_path / "other"), str(tmp_path / "tokens"), str(tmp_path / "d")]) == 2
    assert "was made by tokenizer" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "tokens.npy", np.full((1, 4, 4), 999, np.int32))
    assert main(["decode", str(tokenizer), str(bad), str(tmp_path / "d")]) == 2
    assert "indices must lie in [0, 64), got range [999, 999], outside the vocabulary of" in capsys.readouterr().err
    np.save(bad / "tokens.npy", np.zeros((4, 4), np.int32))
    assert main(["decode", str(tokenizer), str(bad), str(tmp_path / "d")]) == 2
    assert "expected (N, h, w)" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["train-tokenizer", "small-cpu", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "valid keys of train" in err and "config." not in err
    assert main(["train-tokenizer", "small-cpu", f"data.path={tmp_path / 'none'}",
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["encode", str(tmp_path / "missing"), str(tmp_path), str(tmp_path / "o")]) == 2


def test_train_tokenizer_command_writes_model_and_report(tmp_path):
    cmd = [sys.executable, "-m", "vqgan.cli", "train-tokenizer", "small-cpu", "--no-progress",
           "model.resolution=32", "model.ch=32", "model.ch_mult=[1,2]", "model.attn_resolutions=[]",
           "model.quantizer.kind=vq", "model.quantizer.n_embed=32", "model.quantizer.embed_dim=8",
           "loss.disc_start=1",
           "loss.disc_train_start=0", "loss.disc_ndf=8", "data.path=builtin:scenes", "data.builtin_count=24",
           "data.holdout=4", "data.num_workers=0", "train.steps=2", "train.batch_size=4",
           f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report:" in proc.stdout
    run = tmp_path / "run"
    for f in ("report.html", "report/reconstructions.png", "report/losses.png", "model/model.safetensors",
              "logs/metrics.jsonl", "logs/train.log", "config.yaml"):
        assert (run / f).is_file(), f
    report = (run / "report.html").read_text()
    assert "Perceptual network: none" in report
    assert "Model: vqgan at 32 px: encoder conv, decoder conv, quantizer vq (embed_dim 8, n_embed 32" in report
    assert "tokens per image: 16x16 x 1" in report



def test_a_torchrun_worker_leaves_with_its_code_and_flushed_output(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) the command exits by `leave_worker`: same exit code, nothing lost."""
    import os

    cmd = [sys.executable, "-m", "vqgan.cli", "decode", str(tmp_path / "nope"), str(tmp_path / "t"), str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe is by default
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "vqgan decode: error:" in proc.stderr
    script = "import sys; from vqgan.train.common import leave_worker; print('all written', end=''); leave_worker(3)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout) == (3, "all written")

@pytest.mark.slow
def test_quick_demo_runs_both_stages_and_writes_the_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"]) == 0
    report = (tmp_path / "demo" / "report.html").read_text()
    for picture in ("class_samples", "completions", "seg_to_image", "large_mountains", "large_from_seg"):
        assert (tmp_path / "demo" / "samples" / f"{picture}.png").is_file() and picture in report
    # a second run finds every stage done and only redraws the pictures
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"]) == 0


def test_one_token_format_for_encode_tokenize_decode_and_training(tmp_path, tokenizer, images):
    """`encode` and `tokenize` write the same store; `decode` reads both (and old tokens.npy folders), leaving
    out rows whose image could not be read; a prior trains on what `encode` wrote."""
    from vqgan.config import load_config
    from vqgan.data.tokens import tokenize_folder
    from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

    assert main(["encode", str(tokenizer), str(images), str(tmp_path / "enc"), "--no-progress"]) == 0
    tokenize_folder(str(tokenizer), str(images), str(tmp_path / "store"), progress=False)
    encoded, tokenized = TokenStore(tmp_path / "enc"), TokenStore(tmp_path / "store")
    assert encoded.meta["format"] == tokenized.meta["format"] == "vqgan-token-store/2"
    usable = tokenized.labels != -2
    assert np.array_equal(np.asarray(encoded.tokens), np.asarray(tokenized.tokens)[usable])
    for name, rows in (("enc", 5), ("store", 5)):
        assert main(["decode", str(tokenizer), str(tmp_path / name), str(tmp_path / f"dec_{name}"),
                     "--no-progress"]) == 0
        assert len(list((tmp_path / f"dec_{name}").glob("*.png"))) == rows
    legacy = tmp_path / "legacy"  # a folder written by an earlier version
    legacy.mkdir()
    np.save(legacy / "tokens.npy", np.asarray(encoded.tokens).reshape(5, 16, 16))
    assert main(["decode", str(tokenizer), str(legacy), str(tmp_path / "dec_legacy"), "--no-progress"]) == 0
    assert len(list((tmp_path / "dec_legacy").glob("*.png"))) == 5
    # a store of format 1 (one (h, w) grid per row, the codebook size in its tokenizer record) reads as before
    import json
    import shutil
    shutil.copytree(tmp_path / "enc", tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / "meta.json").read_text())
    for key in ("codes", "grids", "row_length"):
        del meta[key]
    meta.update(format="vqgan-token-store/1", grid=[16, 16])
    meta["tokenizer"]["n_embed"] = 64
    (tmp_path / "v1" / "meta.json").write_text(json.dumps(meta))
    old = TokenStore(tmp_path / "v1")
    assert old.spec == encoded.spec and old.grids == encoded.grids
    assert np.array_equal(np.asarray(old.tokens), np.asarray(encoded.tokens))
    assert main(["decode", str(tokenizer), str(tmp_path / "v1"), str(tmp_path / "dec_v1"), "--no-progress"]) == 0
    cfg = load_config(TransformerTrainConfig, {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "data": {"tokens": str(tmp_path / "enc"), "holdout": 1},
        "train": {"out_dir": str(tmp_path / "prior"), "steps": 2, "batch_size": 2}})
    assert PriorTrainer(cfg, progress=False).fit()["step"] == 2
