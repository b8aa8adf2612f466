"""The stage-1 run page: what its charts show for losses below zero, runs without a discriminator, and
tokenizers with several code streams."""
import json

import numpy as np
import torch
import yaml
from PIL import Image

from vqgan.eval.report import tokenizer_report


def _run(tmp_path, loss: dict, rows: list[dict]):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": loss}))
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _result(stream_counts: list[torch.Tensor]) -> dict:
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    counts = torch.cat(stream_counts)
    return {"examples": (x, x), "counts": counts, "stream_counts": stream_counts,
            "stream_labels": ["level f8", "level f4"] if len(stream_counts) > 1 else [""],
            "codes_used": int((counts > 0).sum()), "n_embed": len(counts), "n_images": 4, "psnr": 20.0,
            "l1": 0.1, "usage": 0.5, "perplexity": 3.0, "step": 20, "epoch_usage": 0.5}


def test_negative_losses_are_drawn_and_a_run_without_a_discriminator_says_so(tmp_path):
    """An entropy bonus makes the codebook term (and the total) negative, a likelihood makes the reconstruction
    term negative: a log scale would drop those curves, so they go on a symmetric log scale."""
    rows = [{"kind": "train", "step": s, "total": -4.0 + s / 100, "rec": -0.2, "logit_laplace": -0.2, "l1": 0.3,
             "codebook": -3.5, "adaptive_weight": 0.0} for s in (10, 20)]
    run = _run(tmp_path, {"pixel_weight": 0.0, "disc_factor": 0.0}, rows)
    tokenizer_report(run, _result([torch.tensor([5, 0, 3, 1])]))
    page = (run / "report.html").read_text()
    assert "No discriminator in this run" in page and not (run / "report" / "gan.png").exists()
    losses = np.asarray(Image.open(run / "report" / "losses.png").convert("RGB")).astype(int)
    # below the axis's zero line there are coloured curve pixels (the negative losses), not only the white plot
    coloured = (np.abs(losses[..., 0] - losses[..., 1]) > 60) | (np.abs(losses[..., 1] - losses[..., 2]) > 60)
    rows_with_colour = np.nonzero(coloured[:, :480].any(1))[0]
    assert rows_with_colour.max() > losses.shape[0] * 0.6  # curves in the lower part of the chart
    assert "rec: the weighted reconstruction terms" in page


def test_each_code_stream_gets_its_own_histogram_and_count(tmp_path):
    rows = [{"kind": "train", "step": 10, "total": 0.5, "l1": 0.3, "codebook": 0.1, "disc": 0.7,
             "adaptive_weight": 0.1}]
    run = _run(tmp_path, {"disc_factor": 1.0}, rows)
    tokenizer_report(run, _result([torch.tensor([5, 0, 3, 1]), torch.tensor([0, 0, 2, 0, 1, 0])]))
    page = (run / "report.html").read_text()
    assert "3/4 + 2/6" in page
    assert (run / "report" / "codebook_histogram.png").is_file() and (run / "report" / "codebook_histogram_2.png").is_file()
    assert "report/codebook_histogram_2.png" in page and "report/gan.png" in page
