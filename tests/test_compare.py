"""`vqgan compare`: a short training run, one of its checkpoints and an untrained tokenizer on the same real photo
crops. The comparison agrees with `vqgan eval` of each model alone, its grid has a row per model under the inputs,
curves come only from runs (a checkpoint's stop at its step), and bad input is a one-line error."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image

from vqgan.cli import main
from vqgan.eval.compare import model_names, training_run
from vqgan.eval.compare_outputs import spaced
from vqgan.eval.plots import histogram_plot
from vqgan.eval.report import labelled_grid


@pytest.fixture(scope="module")
def models_and_photos(tmp_path_factory):
    """(a 3-step run with a checkpoint at step 2, an untrained tokenizer folder, 24 photo crops of 32 px)."""
    from conftest import photo_crops, tiny_model_config, tiny_train_config

    from vqgan.checkpoint import save_model
    from vqgan.tokenizers import VQModel
    from vqgan.train.stage1 import train_tokenizer

    root = tmp_path_factory.mktemp("compare")
    photos = photo_crops(root / "photos", step=64)  # 4 photos x 2 x 3 crops
    torch.manual_seed(0)
    cfg = tiny_train_config(root, data={"path": str(photos), "holdout": 4},
                            train={"steps": 3, "log_every": 1, "eval_every": 2, "ckpt_every": 2})
    train_tokenizer(cfg, progress=False)
    save_model(VQModel(tiny_model_config()), root / "untrained")
    return root / "run", root / "untrained", photos


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_agrees_with_eval_and_draws_curves_only_for_runs(models_and_photos, tmp_path):
    run, untrained, photos = models_and_photos
    checkpoint = run / "checkpoints" / "step_00000002"
    out = tmp_path / "cmp"
    assert main(["compare", str(run), str(checkpoint), str(untrained), "--data", str(photos), "--out", str(out),
                 "--show", "5", "--batch-size", "12", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = ["run", "run-step_00000002", "untrained"]
    assert [r["name"] for r in summary["models"]] == names
    assert summary["data"]["images"] == 24 and summary["protocol"]["resolution"] == 32
    rows = {r["name"]: r for r in _csv(out / "comparison.csv")}
    for name, path in zip(names, (run, checkpoint, untrained)):  # the numbers of `vqgan eval` alone
        assert main(["eval", str(path), str(photos), "--out", str(tmp_path / name), "--no-progress"]) == 0
        alone = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
        row = next(r for r in summary["models"] if r["name"] == name)
        assert row["psnr"] == pytest.approx(alone["psnr"], rel=1e-12) and row["ssim"] == pytest.approx(alone["ssim"])
        assert row["usage"] == alone["codebook"]["usage"] and row["lpips"].startswith("not computed")
        assert float(rows[name]["psnr"]) == pytest.approx(alone["psnr"], abs=1e-5)
        assert (out / "eval" / name / "report.html").is_file()
    best = max(summary["models"], key=lambda r: r["psnr"])["name"]
    assert summary["best"]["psnr"] == [best] and "lpips" not in summary["best"]  # not computed: not ranked

    grid = Image.open(out / "compare" / "grid.png")  # inputs + a row per model, 32 px at scale 4, pad 2
    assert grid.height == 4 * ((1 + len(names)) * (32 + 2) + 2) and grid.width > 4 * (5 * 34 + 2)
    curves = summary["curves"]
    assert set(curves) == {"psnr", "total_loss", "rec_loss", "usage"}
    assert all(set(series) == {"run", "run-step_00000002"} for series in curves.values())  # runs only
    assert curves["total_loss"]["run"][0] == [1, 2, 3] and curves["total_loss"]["run-step_00000002"][0] == [1, 2]
    report = (out / "compare.html").read_text()
    for png in ("grid", "psnr", "total_loss", "rec_loss", "usage", "psnr_histogram"):
        assert (out / "compare" / f"{png}.png").is_file() and f"compare/{png}.png" in report
    assert "Not training runs (no curves): untrained" in report and "<b>" in report


def test_compare_refuses_bad_input_in_one_line(models_and_photos, tmp_path, capsys):
    from conftest import tiny_model_config

    from vqgan.checkpoint import save_model
    from vqgan.tokenizers import VQModel

    run, untrained, photos = models_and_photos
    (tmp_path / "empty").mkdir()
    save_model(VQModel(dataclasses.replace(tiny_model_config(), resolution=64)), tmp_path / "big")
    cases = [([str(run), str(tmp_path / "nothing")], photos, "does not exist"),
             ([str(run), str(untrained)], tmp_path / "empty", "no images"),
             ([str(run), str(tmp_path / "big")], photos, "--resolution"),
             ([str(run), str(untrained), "--names", "a"], photos, "--names"),
             ([str(run), str(untrained), "--names", "a,a"], photos, "--names"),
             ([str(run), str(untrained), "--resolution", "33"], photos, "grid factor"),
             ([str(run), "--max-images", "0"], photos, "--max-images")]
    for args, data, message in cases:
        assert main(["compare", *args, "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_compare_at_one_resolution_for_models_of_two(models_and_photos, tmp_path):
    """--resolution puts models trained at different sizes on the same pixels; --names labels them."""
    from conftest import tiny_model_config

    from vqgan.checkpoint import save_model
    from vqgan.tokenizers import VQModel

    run, _, photos = models_and_photos
    save_model(VQModel(dataclasses.replace(tiny_model_config(), resolution=64)), tmp_path / "big")
    out = tmp_path / "cmp"
    assert main(["compare", str(run), str(tmp_path / "big"), "--data", str(photos), "--out", str(out),
                 "--resolution", "16", "--max-images", "6", "--names", "small,big", "--show", "2",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["models"]] == ["small", "big"]
    assert summary["protocol"]["resolution"] == 16 and summary["data"]["images"] == 6
    assert set(summary["curves"]["psnr"]) == {"small"}


def test_names_spacing_runs_and_pictures(tmp_path):
    assert spaced(list(range(10)), 4) == [0, 3, 6, 9] and spaced([5, 7], 8) == [5, 7] and spaced([1, 2, 3], 1) == [2]
    assert model_names(["a/run/model", "b/run", "c/run/checkpoints/step_00000100", "x.ckpt"], None) == [
        "run", "run-2", "run-step_00000100", "x"]
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "metrics.jsonl").write_text("")
    assert training_run(str(tmp_path / "run" / "checkpoints" / "step_00000100")) == (tmp_path / "run", 100)
    assert training_run(str(tmp_path / "run" / "model")) == (tmp_path / "run", None)
    assert training_run(str(tmp_path / "elsewhere")) == (None, None)
    image = histogram_plot({"a": [20.0, 21.0, float("nan")], "b": [], "c": [25.0]}, "PSNR", "PSNR (dB)")
    assert image.size == (640, 300)
    rows = [torch.zeros(3, 3, 8, 8), torch.ones(2, 3, 8, 8)]
    grid = labelled_grid(["inputs", "a much longer label"], rows, scale=2)
    assert grid.height == 2 * (2 * 10 + 2) and grid.width > 2 * (3 * 10 + 2)


@pytest.mark.slow
def test_the_inputs_go_through_inception_once(models_and_photos, inception_weights, tmp_path, monkeypatch):
    """The inputs are the same for every model: their Inception statistics are computed once and reused. One
    model compared with itself: the second entry's rFID (from the reused statistics) is the first's (from its
    own pass over the inputs)."""
    from vqgan.eval.inception import InceptionFeatures

    _, untrained, photos = models_and_photos
    seen = []
    forward = InceptionFeatures.forward
    monkeypatch.setattr(InceptionFeatures, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    assert main(["compare", str(untrained), str(untrained), "--names", "first,again", "--data", str(photos),
                 "--out", str(tmp_path / "cmp"), "--max-images", "4", "--show", "0", "--inception-weights",
                 str(inception_weights), "--no-progress"]) == 0
    assert sum(seen) == 4 * (1 + 2)  # the inputs once, then each model's reconstructions
    first, again = json.loads((tmp_path / "cmp" / "summary.json").read_text())["models"]
    assert isinstance(first["rfid"], float) and again["rfid"] == first["rfid"]


@pytest.mark.slow
def test_two_processes_give_the_comparison_of_one(models_and_photos, tmp_path):
    """torchrun (gloo, two processes, each a shard of every model's images) against one process: the same table,
    the same per-image rows for every model; only process 0 writes. (Without Inception weights: two 2048-wide
    FIDs per process on one CPU thread would take most of a minute; the reuse of the inputs' statistics is
    checked above, and the sharded statistics' sums in test_eval_reconstruction / test_eval_generation.)"""
    from conftest import run_one_process, run_two_processes

    run, untrained, photos = models_and_photos
    args = ["-m", "vqgan.cli", "compare", run, untrained, "--data", photos, "--max-images", "9", "--batch-size", "2",
            "--show", "2", "--no-progress"]
    for name, launch in (("one", run_one_process), ("two", run_two_processes)):
        stdout = launch(*args, "--out", tmp_path / name)
        assert stdout.count('"report"') == 1, stdout  # one summary printed
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    timed = ("encode_images_per_s", "decode_images_per_s")
    assert one["data"] == two["data"] and {k: v for k, v in one["best"].items() if k not in timed} == {
        k: v for k, v in two["best"].items() if k not in timed}
    for a, b in zip(one["models"], two["models"]):
        for key in a.keys() - set(timed):
            assert b[key] == (pytest.approx(a[key], rel=1e-9) if isinstance(a[key], float) else a[key]), key
        ev_one, ev_two = (tmp_path / d / "eval" / a["name"] for d in ("one", "two"))
        assert _csv(ev_one / "per_image.csv") == _csv(ev_two / "per_image.csv")
        assert json.loads((ev_two / "summary.json").read_text())["metrics"]["speed"]["processes"] == 2


def test_usage_is_ranked_only_between_models_of_the_same_codes():
    from vqgan.eval.compare import best_values

    def row(name, codes, usage):
        return {"name": name, "codes": codes, "usage": usage, "perplexity": usage * 100, "psnr": usage,
                "ssim": 0.5, "ms_ssim": "not computed", "lpips": "not computed", "rfid": "not computed",
                "encode_images_per_s": 1.0, "decode_images_per_s": 1.0}

    mixed = best_values([row("rq", "32 + 32", 0.84), row("fsq", "1000", 0.53)])
    assert "usage" not in mixed and "perplexity" not in mixed and mixed["psnr"] == ["rq"]
    same = best_values([row("a", "1000", 0.84), row("b", "1000", 0.53)])
    assert same["usage"] == ["a"] and same["perplexity"] == ["a"]
