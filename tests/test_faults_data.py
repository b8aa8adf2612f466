"""Data commands under bad data and bad input (issue 12): nothing lost, nothing silent.

- a row of a token store (or of `encode`'s tokens) is always its own image's tokens, with its own label and
  condition map; an unreadable image or map makes its row unusable and is counted, never replaced;
- per-image outputs never overwrite each other when files share a name in different sub-folders;
- stores record absolute tokenizer paths (a prior trained elsewhere still finds its tokenizer), and a resumed
  `tokenize` compares tokenizers by fingerprint, not by how their paths are spelled;
- symlinked sub-folders are followed, loops are not, and what is left out is logged;
- bad options and files end in one line `vqgan CMD: error: ...`, exit code 2, before any work.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from PIL import Image

from vqgan.checkpoint import fingerprint, load_model, save_model
from vqgan.cli import main
from vqgan.config import VQGANConfig, quantizer_config
from vqgan.data.images import ImageDataset, ImageSource, scan_images
from vqgan.data.maps import load_label_map
from vqgan.data.scenes import SEGMENT_CLASSES
from vqgan.data.tokens import UNUSABLE, TokenStore, tokenize_folder
from vqgan.errors import UserError
from vqgan.eval.report import to_uint8
from vqgan.priors import GPT, GPTConfig
from vqgan.tokenizers import VQModel

N_LABELS = len(SEGMENT_CLASSES)


def write_png(path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":  # a label map: class ids as grey values
        Image.fromarray(rng.integers(0, N_LABELS, (40, 36), dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)


def truncate(path) -> None:
    """Keep the first half of the file: the header reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def own_tokens(model: VQModel, path) -> torch.Tensor:
    x = ImageDataset.from_paths([path], resolution=32, crop="center", train=False)[0]["image"][None]
    return model.encode(x)[0].reshape(-1)  # a store row


def own_map_tokens(model: VQModel, path) -> torch.Tensor:
    ds = ImageDataset([ImageSource(str(path), lambda: load_label_map(path))], resolution=32, crop="center",
                      train=False, kind="segmentation", n_labels=N_LABELS)
    return model.encode(ds[0]["image"][None])[0].reshape(-1)  # a store row


@pytest.fixture
def tok(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "tok")
    return model.eval(), tmp_path / "tok"


def seg_tokenizer(path) -> VQModel:
    model = VQModel(VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                                z_channels=32, quantizer=quantizer_config(n_embed=32, embed_dim=16),
                                input_kind="segmentation", in_channels=N_LABELS, out_ch=N_LABELS))
    model.save_pretrained(path)
    return model.eval()


# -- every row is its own image ---------------------------------------------------------------------------


def test_tokenize_marks_a_truncated_image_unusable_instead_of_pairing_its_label_with_the_next(tmp_path, tok):
    model, tok_dir = tok
    for cls in ("cats", "dogs"):
        for i in range(3):
            write_png(tmp_path / "imgs" / cls / f"{i}.png", seed=10 * len(cls) + i)
    truncate(tmp_path / "imgs" / "cats" / "2.png")  # the next image is dogs/0.png: another class
    result = tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "store"), batch_size=4,
                             labels="folders", progress=False)
    store = TokenStore(tmp_path / "store")
    bad = store.meta["files"].index(str(tmp_path / "imgs" / "cats" / "2.png"))
    assert store.labels[bad] == UNUSABLE
    assert result["skipped"] == 1 and result["unusable_rows"] == 1 and result["usable_rows"] == result["count"] - 1
    for row, file in enumerate(store.meta["files"]):
        if row != bad:
            assert torch.equal(store[row]["tokens"], own_tokens(model, file)), file
            assert store.class_names[store.labels[row]] in file


def test_tokenize_with_maps_never_pairs_a_map_with_another_images_tokens(tmp_path, tok):
    model, tok_dir = tok
    seg = seg_tokenizer(tmp_path / "seg")
    for i in range(5):
        write_png(tmp_path / "imgs" / f"{i}.png", seed=i)
        write_png(tmp_path / "maps" / f"{i}.png", seed=100 + i, mode="L")
    truncate(tmp_path / "imgs" / "1.png")
    truncate(tmp_path / "maps" / "3.png")
    result = tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "store"), batch_size=2,
                             cond_maps=str(tmp_path / "maps"), cond_tokenizer=str(tmp_path / "seg"), progress=False)
    store = TokenStore(tmp_path / "store")
    assert [int(v) for v in store.labels] == [-1, UNUSABLE, -1, UNUSABLE, -1] and result["skipped"] == 2
    for row in (0, 2, 4):
        assert torch.equal(store[row]["tokens"], own_tokens(model, tmp_path / "imgs" / f"{row}.png"))
        assert torch.equal(store[row]["cond"], own_map_tokens(seg, tmp_path / "maps" / f"{row}.png"))


def test_encode_gives_an_unreadable_image_no_row_and_names_each_rows_own_file(tmp_path, tok):
    model, tok_dir = tok
    for name in ("a", "b", "c"):
        write_png(tmp_path / "imgs" / f"{name}.png", seed=ord(name))
    truncate(tmp_path / "imgs" / "b.png")
    assert main(["encode", str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "tokens"), "--batch-size", "2",
                 "--no-progress"]) == 0
    store = TokenStore(tmp_path / "tokens")  # encode writes the one token format
    tokens, meta = np.asarray(store.tokens), store.meta
    assert meta["files"] == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "c.png")]
    assert meta["unreadable_files_skipped"] == 1 and tokens.shape[0] == 2
    for row, file in enumerate(meta["files"]):
        assert torch.equal(torch.from_numpy(tokens[row].astype(np.int64)), own_tokens(model, file))


# -- per-image outputs never overwrite each other -------------------------------------------------------------


def test_reconstruct_mirrors_sub_folders_so_same_named_images_stay_apart(tmp_path, tok):
    model, tok_dir = tok
    sources = ["a/x.png", "b/x.png", "a/y.png", "a/y.jpg"]
    for i, rel in enumerate(sources):
        write_png(tmp_path / "imgs" / rel, seed=i)
    assert main(["reconstruct", str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "rec"), "--no-progress"]) == 0
    with open(tmp_path / "rec" / "psnr.csv", newline="") as f:
        rows = {os.path.relpath(r["file"], tmp_path / "imgs"): r["reconstruction"] for r in csv.DictReader(f)}
    rec = tmp_path / "rec"
    assert rows == {"a/x.png": str(rec / "a" / "x_rec.png"), "b/x.png": str(rec / "b" / "x_rec.png"),
                    "a/y.png": str(rec / "a" / "y_png_rec.png"), "a/y.jpg": str(rec / "a" / "y_jpg_rec.png")}
    for source, output in rows.items():  # each file holds its own image's reconstruction
        x = ImageDataset.from_paths([tmp_path / "imgs" / source], resolution=32, train=False)[0]["image"][None]
        expected = to_uint8(model.decode(model.encode(x)))[0].astype(np.int16)
        assert np.abs(np.asarray(Image.open(output), dtype=np.int16) - expected).mean() < 1.0, source


def test_reconstruct_into_a_folder_inside_its_input_never_reads_its_own_outputs(tmp_path, tok):
    _, tok_dir = tok
    for i in range(2):
        write_png(tmp_path / "imgs" / f"x{i}.png", seed=i)
    for _ in range(2):  # the second run must not take the first run's x0_rec.png as an input
        assert main(["reconstruct", str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "imgs" / "rec"),
                     "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "imgs" / "rec").rglob("*.png")) == ["x0_rec.png", "x1_rec.png"]


def test_decode_writes_one_file_per_row_for_same_named_sources(tmp_path, tok):
    _, tok_dir = tok
    for i, rel in enumerate(["a/x.png", "b/x.png"]):
        write_png(tmp_path / "imgs" / rel, seed=i)
    main(["encode", str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "tokens"), "--no-progress"])
    assert main(["decode", str(tok_dir), str(tmp_path / "tokens"), str(tmp_path / "dec"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").glob("*.png")) == ["000000_x.png", "000001_x.png"]


# -- paths that hold from any working directory --------------------------------------------------------------


def test_stores_record_absolute_tokenizer_paths_that_load_from_any_folder(tmp_path, tok, monkeypatch):
    model, _ = tok
    (tmp_path / "elsewhere").mkdir()
    for i in range(3):
        write_png(tmp_path / "imgs" / f"{i}.png", seed=i)
    monkeypatch.chdir(tmp_path)
    tokenize_folder("tok/", "imgs", "store", progress=False)
    main(["encode", "tok", "imgs", "tokens", "--no-progress"])
    store = json.loads((tmp_path / "store" / "meta.json").read_text())
    tokens = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert store["tokenizer"]["path"] == tokens["tokenizer"]["path"] == str(tmp_path / "tok")
    assert store["files"][0] == tokens["files"][0] == str(tmp_path / "imgs" / "0.png")
    monkeypatch.chdir(tmp_path / "elsewhere")  # where a prior is trained: it loads the recorded tokenizer
    assert fingerprint(load_model(store["tokenizer"]["path"])) == store["tokenizer"]["fingerprint"] == \
        fingerprint(model)


def test_the_condition_tokenizer_path_is_absolute(tmp_path, tok, monkeypatch):
    seg_tokenizer(tmp_path / "seg")
    monkeypatch.chdir(tmp_path)
    tokenize_folder("tok", "builtin:scenes", "store", builtin_count=2, cond_maps="builtin:scenes-seg",
                    cond_tokenizer="./seg", progress=False)
    cond = TokenStore(tmp_path / "store").condition
    assert cond["tokenizer"]["path"] == str(tmp_path / "seg") and cond["maps"] == "builtin:scenes-seg"


def as_if_killed(store, done: int) -> None:
    """The state a `tokenize` killed after `done` rows leaves behind."""
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "done": done, "complete": False}))


@pytest.mark.parametrize("spelling", ["trailing slash", "relative"])
def test_resuming_with_the_same_tokenizer_spelled_differently_finishes_the_store(tmp_path, tok, monkeypatch,
                                                                                    spelling):
    _, tok_dir = tok
    for i in range(6):
        write_png(tmp_path / "imgs" / f"{i}.png", seed=i)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "a"), batch_size=2, progress=False)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    as_if_killed(tmp_path / "b", done=2)
    monkeypatch.chdir(tmp_path)
    again = str(tok_dir) + "/" if spelling == "trailing slash" else "tok"
    tokenize_folder(again, "imgs", "b", batch_size=2, progress=False)
    assert np.array_equal(TokenStore(tmp_path / "a").tokens, TokenStore(tmp_path / "b").tokens)


def test_resume_starts_over_when_the_token_file_is_gone_and_refuses_other_labels(tmp_path, tok):
    _, tok_dir = tok
    for i in range(6):
        write_png(tmp_path / "imgs" / ("cats" if i < 3 else "dogs") / f"{i}.png", seed=i)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "a"), batch_size=2, progress=False)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    as_if_killed(tmp_path / "b", done=2)
    with pytest.raises(UserError, match="made differently"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), labels="folders", progress=False)
    (tmp_path / "b" / "tokens.bin").unlink()
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    assert np.array_equal(TokenStore(tmp_path / "a").tokens, TokenStore(tmp_path / "b").tokens)


# -- symlinked folders --------------------------------------------------------------------------------------


def test_symlinked_sub_folders_are_followed_loops_are_not_and_both_are_logged(tmp_path, caplog):
    imgs = tmp_path / "imgs"
    write_png(imgs / "own" / "a.png", seed=0)
    for i in range(3):
        write_png(tmp_path / "outside" / f"{i}.png", seed=i + 1)
    (imgs / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (imgs / "own" / "loop").symlink_to(imgs, target_is_directory=True)  # a link to an ancestor
    (imgs / "again").symlink_to(imgs / "own", target_is_directory=True)  # the same folder twice
    (imgs / "gone.png").symlink_to(tmp_path / "missing.png")
    good, bad = scan_images(imgs)
    assert [str(p.relative_to(imgs)) for p in good] == ["linked/0.png", "linked/1.png", "linked/2.png", "own/a.png"]
    assert bad == [imgs / "gone.png"]
    assert "a loop" in caplog.text and "already scanned" in caplog.text and "broken link" in caplog.text


# -- bad input: one line, exit code 2, before any work ---------------------------------------------------------


@pytest.fixture
def inputs(tmp_path, tok):
    write_png(tmp_path / "imgs" / "cats" / "0.png", seed=0)
    gpt = GPT(GPTConfig(vocab_size=66, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_model(gpt, tmp_path / "prior" / "model")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "one.csv").write_text("file\ncats/0.png\n")
    return tmp_path


RUNS = ("encode", "reconstruct", "tokenize")  # TOKENIZER IMAGES OUT
BAD_INPUT = [
    *[(cmd, ["{tok}", "{imgs}", "{out}", "--batch-size", "0"], "--batch-size 0") for cmd in RUNS],
    ("decode", ["{tok}", "{tokens}", "{out}", "--batch-size", "0"], "--batch-size 0"),
    *[(cmd, ["{tok}", "{imgs}", "{out}", "--device", "gpu"], "PyTorch calls a GPU 'cuda'") for cmd in RUNS],
    ("decode", ["{tok}", "{tokens}", "{out}", "--device", "gpu"], "PyTorch calls a GPU 'cuda'"),
    *[(cmd, ["{tok}", "{imgs}", "{file}"], "is an existing file") for cmd in RUNS],
    ("decode", ["{tok}", "{tokens}", "{file}"], "is an existing file"),
    ("encode", ["{tok}", "{imgs}", "{file}/out"], "is a file"),
    *[(cmd, ["{prior}", "{imgs}", "{out}"], "is a transformer prior") for cmd in RUNS],
    ("decode", ["{prior}", "{tokens}", "{out}"], "is a transformer prior"),
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--cond-maps", "{imgs}", "--cond-tokenizer", "{prior}"],
     "--cond-tokenizer"),
    *[(cmd, ["{tok}", "{imgs}", "{out}", "--resolution", r], f"--resolution {r}")
      for cmd in ("encode", "reconstruct") for r in ("0", "-16")],
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--crops", "0"], "--crops 0"),
    *[(cmd, ["{tok}", "{imgs}", "{out}", "--count", "0"], "--count 0") for cmd in RUNS],
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--labels", "folder"], "neither 'folders'"),
    ("tokenize", ["{tok}", "{imgs}/cats/0.png", "{out}", "--labels", "folders"], "inside a class sub-folder"),
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--labels", "{dir}/missing.csv"], "neither 'folders'"),
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--labels", "{dir}/bad.json"], "is not valid JSON"),
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--labels", "{dir}/list.json"], "expected a JSON object"),
    ("tokenize", ["{tok}", "{imgs}", "{out}", "--labels", "{dir}/one.csv"], "line 2: expected two columns"),
]


@pytest.mark.parametrize("command, args, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2_before_any_work(inputs, capsys, command, args, message):
    paths = {"tok": inputs / "tok", "imgs": inputs / "imgs", "out": inputs / "out", "tokens": inputs / "tokens",
             "file": inputs / "file", "prior": inputs / "prior", "dir": inputs}
    argv = [command, *(a.format(**paths) for a in args), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vqgan {command}: error: ") and message in err[0], err
    assert not (inputs / "out").exists()


def test_labels_keyed_by_a_shared_file_name_or_naming_no_image_are_refused(tmp_path, tok):
    _, tok_dir = tok
    for cls in ("a", "b"):
        write_png(tmp_path / "imgs" / cls / "x.png", seed=len(cls))
    (tmp_path / "by_name.csv").write_text("x.png,cat\n")
    with pytest.raises(UserError, match="2 images have that name"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "s"), labels=str(tmp_path / "by_name.csv"),
                        progress=False)
    (tmp_path / "none.json").write_text('{"y.png": "cat"}')
    with pytest.raises(UserError, match="names none of the images"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "s"), labels=str(tmp_path / "none.json"),
                        progress=False)


def test_the_command_line_prints_one_line_without_a_traceback(tmp_path, tok):
    _, tok_dir = tok
    write_png(tmp_path / "imgs" / "0.png", seed=0)
    proc = subprocess.run([sys.executable, "-m", "vqgan.cli", "tokenize", str(tok_dir), str(tmp_path / "imgs"),
                           str(tmp_path / "store"), "--crops", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "vqgan tokenize: error: --crops 0: must be at least 1"
    assert not (tmp_path / "store").exists()
