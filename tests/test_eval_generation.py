"""Generation metrics: FID, KID, IS and precision/recall against closed forms and torch-fidelity's own code; the
Inception weights file (found, checked, refused); `vqgan eval-samples` and `vqgan fid-stats` end to end with a
random-weights stand-in for the FID weights (no real weights can be downloaded here)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vqgan.cli import main
from vqgan.errors import UserError
from vqgan.eval.fid import FeatureStats, frechet_distance, load_stats, save_stats
from vqgan.eval.generation import inception_score, kid, precision_recall
from vqgan.eval.inception import FID_WEIGHTS_FILES, find_inception_weights, load_inception

pytest.importorskip("torch_fidelity")


def gaussian(n, dim, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + shift


# -- FID ---------------------------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = FeatureStats(32).update(gaussian(400, 32, 0)).mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_of_gaussians_matches_the_closed_form_and_reference_implementations():
    from scipy import linalg
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)
    a, b = rng.normal(size=(16, 16)), rng.normal(size=(16, 16))
    sigma1, sigma2 = a @ a.T, b @ b.T + np.eye(16)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    pytorch_fid = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * linalg.sqrtm(sigma1 @ sigma2).real)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert ours == pytest.approx(pytorch_fid, rel=1e-8)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-8)


def test_feature_stats_merged_from_parts_equal_the_whole_set():
    x = gaussian(301, 8, 1, scale=2.0, shift=5.0)
    whole = FeatureStats(8).update(x)
    parts = FeatureStats(8)
    for part in x.split(100):
        parts.merge(FeatureStats(8).update(part))
    assert parts.count == whole.count == 301
    for a, b, ref in zip(parts.mean_cov(), whole.mean_cov(), (x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-12)


def test_stats_npz_round_trip_and_refusals(tmp_path):
    mu, sigma = FeatureStats(4).update(gaussian(10, 4, 2)).mean_cov()
    path = save_stats(tmp_path / "ref.npz", mu, sigma)
    back = load_stats(path)
    np.testing.assert_array_equal(back[0], mu)
    np.testing.assert_array_equal(back[1], sigma)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    np.testing.assert_array_equal(load_stats(tmp_path / "adm.npz")[0], mu)  # the ADM evaluator's reference batches
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(UserError, match="no 'mu' and 'sigma'.*holds mean"):
        load_stats(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"x": 1}], dtype=object), sigma=sigma)
    with pytest.raises(UserError, match="not a readable .npz"):
        load_stats(tmp_path / "pickled.npz")
    with pytest.raises(UserError, match="does not exist"):
        load_stats(tmp_path / "none.npz")


# -- KID, IS, precision/recall -------------------------------------------------------------------------------------

def test_kid_matches_a_direct_computation_and_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = gaussian(40, 6, 3), gaussian(30, 6, 4, shift=0.3)

    def k(a, b):
        return (float(a @ b) / 6 + 1) ** 3

    m = 30  # one subset holding all of y and 30 of x: check the estimator itself
    xs = x[np.random.RandomState(2020).choice(40, m, replace=False)]
    direct = (sum(k(xs[i], xs[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(xs[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert kid(x, y, subsets=1, subset_size=m)["kid_mean"] == pytest.approx(direct, rel=1e-9)
    ours = kid(x, y, subsets=20, subset_size=25)
    theirs = kid_features_to_metric(x, y, kid_subsets=20, kid_subset_size=25, verbose=False)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    assert kid(x, y, subsets=2)["kid_subset_size"] == 30  # shrinks to the smaller set


def test_inception_score_of_uniform_and_of_distinct_confident_predictions():
    from torch_fidelity.metric_isc import isc_features_to_metric

    assert inception_score(torch.zeros(50, 1008))["is_mean"] == pytest.approx(1.0, abs=1e-12)
    confident = torch.eye(10) * 100.0  # 10 images, 10 distinct classes, all certain
    assert inception_score(confident, splits=1)["is_mean"] == pytest.approx(10.0, rel=1e-6)
    logits = gaussian(60, 20, 5, scale=3.0)
    theirs = isc_features_to_metric(logits, splits=3)
    ours = inception_score(logits, splits=3)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-7, abs=1e-12)


def test_precision_recall_on_toy_sets_with_a_known_answer():
    from torch_fidelity.metric_prc import prc_features_to_metric

    mode_a, mode_b = gaussian(10, 2, 6), gaussian(10, 2, 7, shift=1000.0)
    real = torch.cat([mode_a, mode_b])
    only_a = mode_a.clone()  # every sample on a real image of mode A; mode B missed
    assert precision_recall(only_a, real) == {"precision": 1.0, "recall": 0.5, "pr_k": 3}
    assert precision_recall(real, only_a) == {"precision": 0.5, "recall": 1.0, "pr_k": 3}
    gen, ref = gaussian(40, 5, 8), gaussian(50, 5, 9, shift=0.5)
    theirs = prc_features_to_metric(gen, ref, prc_neighborhood=3, verbose=False)
    ours = precision_recall(gen, ref)
    assert ours["precision"] == pytest.approx(theirs["precision"]) and ours["recall"] == pytest.approx(theirs["recall"])


# -- the Inception weights file ---------------------------------------------------------------------------------------

@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    for var in ("TORCH_HOME", "VQGAN_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / "empty" / var))
    return tmp_path


def test_inception_loads_the_real_key_layout_and_matches_torch_fidelity(inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = load_inception(str(inception_weights))
    assert net.weights_path == inception_weights and len(net.weights_sha256) == 64
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    out = net(images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["pool"].dtype == torch.float64
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(inception_weights))
    pool, logits = theirs(images)
    # float32 networks; ours runs channels-last on the CPU (oneDNN sums in another order): equal to ~1e-5 relative
    torch.testing.assert_close(out["pool"], pool.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], logits.double(), rtol=1e-4, atol=1e-5)


def test_weights_are_found_in_the_torch_hub_cache_and_pytorch_fid_layout_loads(inception_weights, no_caches,
                                                                              monkeypatch):
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    sd = {k: v for k, v in torch.load(inception_weights).items()
          if not k.endswith("num_batches_tracked")}  # as in older files
    torch.save(sd, hub / FID_WEIGHTS_FILES[1])
    monkeypatch.setenv("TORCH_HOME", str(no_caches / "torch"))
    assert find_inception_weights() == hub / FID_WEIGHTS_FILES[1]
    assert load_inception().weights_path.name == FID_WEIGHTS_FILES[1]


def test_missing_or_wrong_weights_are_one_line_errors(no_caches):
    with pytest.raises(UserError) as err:
        load_inception()
    assert FID_WEIGHTS_FILES[0] in str(err.value) and "--inception-weights" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        load_inception(str(no_caches / "nowhere.pth"))
    wrong = no_caches / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="does not match the model: missing keys") as err:
        load_inception(str(wrong))
    assert FID_WEIGHTS_FILES[1] in str(err.value) and "\n" not in str(err.value)


def test_without_torch_fidelity_the_error_says_what_to_install(monkeypatch):
    import sys

    from vqgan.eval import inception

    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    inception._network_class.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install vqgan\[eval\]"):
            load_inception()
    finally:
        inception._network_class.cache_clear()


# -- the commands ------------------------------------------------------------------------------------------------

def image_folder(path, n, seed, size=32):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        noise = rng.integers(-40, 40, (size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path / f"{i:02d}.png")
    return path


@pytest.mark.slow
def test_eval_samples_and_fid_stats_end_to_end(tmp_path, inception_weights, capsys):
    ref, gen = image_folder(tmp_path / "ref", 5, 0), image_folder(tmp_path / "gen", 5, 1)
    (gen / "broken.png").write_bytes(b"not a png")
    common = ["--inception-weights", str(inception_weights), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(["eval-samples", str(ref), "--images", str(gen), "--kid-subset-size", "4", "--is-splits", "2",
                 "--out", str(tmp_path / "m.json"), "--save-stats", str(tmp_path / "ref.npz"), *common]) == 0
    summary = json.loads((tmp_path / "m.json").read_text())
    metrics = summary["metrics"]
    assert metrics["fid"] > 0 and {"kid_mean", "is_mean", "precision", "recall"} <= set(metrics)
    assert summary["samples"]["count"] == 5 and summary["samples"]["skipped"] == 1
    assert summary["inception_weights"]["file"] == FID_WEIGHTS_FILES[0] and "50000" in summary["note"]
    assert main(["fid-stats", str(ref), str(tmp_path / "ref2.npz"), *common]) == 0
    for a, b in zip(load_stats(tmp_path / "ref.npz"), load_stats(tmp_path / "ref2.npz")):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert main(["eval-samples", str(tmp_path / "ref.npz"), "--images", str(ref), "--is-splits", "2", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    # a set against its own statistics: 0 up to the rounding in the square roots of a rank-4 covariance's
    # near-zero eigenvalues (2048 of them), ~1e-4 where these features' FIDs between distinct sets are ~100
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["kid"].startswith("not computed") and metrics["precision_recall"].startswith("not computed")


def test_eval_samples_bad_input_is_one_line_before_any_work(tmp_path, inception_weights, capsys):
    ref = image_folder(tmp_path / "ref", 2, 0)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    for argv, needle in ((["eval-samples", str(tmp_path / "small.npz"), "--images", str(ref)], "2048"),
                         (["eval-samples", str(ref), "--images", str(tmp_path / "none")], "no such folder"),
                         (["eval-samples", str(tmp_path / "small.npz"), "--images", str(ref), "--save-stats",
                           str(tmp_path / "x.npz")], "already a .npz"),
                         (["fid-stats", str(ref), str(tmp_path / "x.json")], "must end in .npz"),
                         (["eval-samples", str(ref), "--images", str(ref), "--inception-weights",
                           str(tmp_path / "none.pth")], "no such file")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def class_prior(folder):
    """An untrained prior over 2 classes ("cat", "dog") on an untrained tokenizer of 32 px images (8x8 tokens)."""
    from conftest import tiny_model_config

    from vqgan.checkpoint import save_model
    from vqgan.priors import GPT, GPTConfig, TokenLayout
    from vqgan.tokenizers import VQModel

    cfg = tiny_model_config()
    cfg.ch_mult = [1, 2, 2]  # factor 4: 8x8 tokens at 32 px
    layout = TokenLayout(64, n_classes=2)
    gpt = GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    conditioning = {"kind": "class", **layout.to_dict(), "grid": [8, 8], "class_names": ["cat", "dog"]}
    save_model(gpt, folder, {**gpt.config_dict(), "conditioning": conditioning})
    VQModel(cfg).save_pretrained(folder / "tokenizer")
    return folder


@pytest.mark.slow
def test_eval_samples_draws_balanced_classes_from_a_prior(tmp_path, inception_weights):
    class_prior(tmp_path / "prior")
    ref = image_folder(tmp_path / "ref", 5, 0)
    assert main(["eval-samples", str(ref), "--prior", str(tmp_path / "prior"), "--n", "5", "--guidance", "1.5",
                 "--sample-batch-size", "2", "--save-samples", str(tmp_path / "drawn"), "--is-splits", "1",
                 "--kid-subset-size", "4", "--out", str(tmp_path / "m.json"), "--inception-weights",
                 str(inception_weights), "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["samples"]["count"] == 5 and summary["samples"]["guidance_scale"] == 1.5
    assert summary["samples"]["classes"] == {"balanced_over": 2, "names": ["cat", "dog"], "per_class": [3, 2]}
    names = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert [n.split("_class")[1] for n in names] == ["0.png"] * 3 + ["1.png"] * 2
    shutil.rmtree(tmp_path / "drawn")


@pytest.mark.slow
def test_two_processes_give_the_numbers_and_samples_of_one(tmp_path, inception_weights):
    """torchrun (gloo, two processes): the reference folder's features in shards (an odd count, one file that
    cannot be decoded) and the prior's sample batches split between the processes give the same samples (the
    PNGs, byte for byte) and the same metrics as one process; only process 0 reports."""
    from conftest import run_one_process, run_two_processes

    class_prior(tmp_path / "prior")
    ref = image_folder(tmp_path / "ref", 7, 0)
    (ref / "broken.png").write_bytes(b"not a png")
    args = ["-m", "vqgan.cli", "eval-samples", ref, "--prior", tmp_path / "prior", "--n", "5",
            "--sample-batch-size", "2", "--batch-size", "3", "--is-splits", "2", "--kid-subset-size", "4",
            "--inception-weights", inception_weights, "--num-workers", "0", "--no-progress", "--device", "cpu"]
    out = {}
    for name, run in (("one", run_one_process), ("two", run_two_processes)):
        stdout = run(*args, "--save-samples", tmp_path / name, "--out", tmp_path / f"{name}.json")
        assert stdout.count('"metrics"') == 1, stdout  # one summary printed
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    one, two = out["one"], out["two"]
    assert one["reference"] == two["reference"] == {"folder": str(ref), "count": 7, "skipped": 1}
    assert {k: v for k, v in one["samples"].items() if k != "saved_to"} == {
        k: v for k, v in two["samples"].items() if k != "saved_to"}
    drawn = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert drawn == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(drawn) == 5
    for name in drawn:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one["metrics"].keys() == two["metrics"].keys()
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
