"""Every quantizer kind through the whole pipeline, from the command line: train-tokenizer, encode, decode,
reconstruct, tokenize, train-transformer, sample (at the training size and larger, through the sliding
window), complete. A new kind joins by adding its small settings here (the last test insists)."""
import pytest

from vqgan.cli import main
from vqgan.data.tokens import TokenStore
from vqgan.registry import QUANTIZERS

# tiny settings per kind (the small-cpu preset's keys of other kinds are dropped when the kind changes)
SMALL = {
    "vq": {"n_embed": 32, "embed_dim": 8},
    "gumbel": {"n_embed": 32, "embed_dim": 8},
    "ema": {"n_embed": 32, "embed_dim": 8},
    "fsq": {"levels": [4, 4, 2]},
    "lfq": {"bits": 5},
    "residual": {"depth": 2, "n_embed": 16, "embed_dim": 8},
}

TINY = ["model.resolution=32", "model.ch=32", "model.ch_mult=[1,2]", "model.attn_resolutions=[]",
        "model.z_channels=16", "loss.disc_start=1", "loss.disc_train_start=0", "loss.disc_ndf=8",
        "data.path=builtin:scenes", "data.builtin_count=24", "data.holdout=4", "data.num_workers=0", "train.steps=2",
        "train.batch_size=4", "train.eval_every=2", "train.ckpt_every=2"]


# the architectures (issue 15) at tiny sizes, each with its own preset's quantizer: (preset, overrides, grid side)
ARCHITECTURES = {
    "vit": ("small-cpu-vit", ["model.resolution=32", "model.z_channels=32", "model.encoder.width=32",
                              "model.encoder.depth=1", "model.encoder.heads=2", "model.decoder.width=32",
                              "model.decoder.depth=1", "model.decoder.heads=2", "model.quantizer.n_embed=32",
                              "model.quantizer.embed_dim=32", "model.quantizer.codebook_dim=8",
                              "loss.disc_start=1", "loss.disc_train_start=0", "loss.disc_ndf=8"], 4),
    "vqvae": ("small-cpu-vqvae", ["model.resolution=32", "model.z_channels=8", "model.encoder.hidden_channels=16",
                                  "model.encoder.residual_channels=8", "model.decoder.hidden_channels=16",
                                  "model.decoder.residual_channels=8", "model.quantizer.n_embed=32",
                                  "model.quantizer.embed_dim=8"], 4),
    "dvae": ("small-cpu-dvae", ["model.resolution=32", "model.z_channels=8", "model.encoder.hidden_channels=16",
                                "model.decoder.hidden_channels=16", "model.decoder.init_channels=8",
                                "model.quantizer.n_embed=32", "model.quantizer.embed_dim=8"], 4),
}
DATA = ["data.path=builtin:scenes", "data.builtin_count=24", "data.holdout=4", "data.num_workers=0", "train.steps=2",
        "train.batch_size=4", "train.eval_every=2", "train.ckpt_every=2"]


def kinds_here() -> list[str]:
    return [k for k in SMALL if k in QUANTIZERS]


@pytest.mark.slow
@pytest.mark.parametrize("kind", kinds_here())
def test_a_kind_runs_the_whole_pipeline(kind, tmp_path):
    options = [f"model.quantizer.kind={kind}"] + [f"model.quantizer.{k}={v}".replace(" ", "")
                                                  for k, v in SMALL[kind].items()]
    run_whole_pipeline(tmp_path, "small-cpu", TINY + options, grid=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_an_architecture_runs_the_whole_pipeline(name, tmp_path):
    preset, options, grid = ARCHITECTURES[name]
    run_whole_pipeline(tmp_path, preset, DATA + options, grid)


def run_whole_pipeline(tmp_path, preset: str, options: list[str], grid: int) -> None:
    """train-tokenizer, encode, decode, reconstruct, tokenize, train-transformer, sample (at the training size
    and larger, through the sliding window), complete: each exits 0 and writes what it should."""
    run, quiet = tmp_path / "run", "--no-progress"
    some = ["--count", "24"]  # of the built-in scenes (1024 by default)
    assert main(["train-tokenizer", preset, quiet, *options, f"train.out_dir={run}"]) == 0
    model = run / "model"
    assert main(["encode", str(model), "builtin:scenes", str(tmp_path / "enc"), *some, quiet]) == 0
    store = TokenStore(tmp_path / "enc")
    depth = store.spec.levels[0].depth
    assert store.row_length == grid * grid * depth and len(store) == 24
    assert store.spec.streams == list(store.meta["codes"]["levels"][0]["vocab"])
    assert main(["decode", str(model), str(tmp_path / "enc"), str(tmp_path / "dec"), quiet]) == 0
    assert main(["reconstruct", str(model), "builtin:scenes", str(tmp_path / "rec"), *some, quiet]) == 0
    assert main(["tokenize", str(model), "builtin:scenes", str(tmp_path / "store"), "--count", "24", quiet]) == 0
    prior = tmp_path / "prior"
    assert main(["train-transformer", "-", f"data.tokens={tmp_path / 'store'}", "model.n_layer=1", "model.n_embd=32",
                 "model.n_head=2", "train.steps=2", "train.batch_size=4", "data.holdout=4",
                 f"train.out_dir={prior}", quiet]) == 0
    assert main(["sample", str(prior), str(tmp_path / "s"), "--n", "2", "--label", "0", "--guidance", "2",
                 "--top-k", "5", quiet]) == 0
    assert main(["sample", str(prior), str(tmp_path / "big"), "--n", "1", "--label", "0", "--size", "32x40",
                 quiet]) == 0
    assert len(list((tmp_path / "big").glob("*.png"))) >= 1
    assert main(["complete", str(prior), "builtin:scenes", str(tmp_path / "c"), "--n", "1", "--n-images", "2",
                 "--label", "0", quiet]) == 0


def test_every_registered_kind_is_in_the_pipeline_test():
    missing = [k for k in QUANTIZERS.kinds() if k not in SMALL and not k.startswith("toy-")]
    assert not missing, f"add small settings for {missing} to SMALL"
