import os
from pathlib import Path

# No test may download anything: an accidental hub access fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parent.parent / ".cache" / "torch-tests"))
os.environ.setdefault("VQGAN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "vqgan-tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

from vqgan.config import TokenizerTrainConfig, VQGANConfig, load_config, quantizer_config  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "taming"


def tiny_model_config(**quantizer) -> VQGANConfig:
    return VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=32,
                       quantizer=quantizer_config(**{"n_embed": 64, "embed_dim": 16, **quantizer}))


def tiny_train_config(tmp_path, **sections) -> TokenizerTrainConfig:
    data = {
        "model": {"resolution": 32, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16],
                  "z_channels": 32, "quantizer": {"n_embed": 64, "embed_dim": 16}},
        "loss": {"perceptual_weight": 0.0, "disc_start": 3, "disc_train_start": 2, "disc_ndf": 8},
        "data": {"path": "builtin:scenes", "builtin_count": 48, "holdout": 8, "num_workers": 0},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 6, "batch_size": 4, "base_learning_rate": 2.5e-5,
                  "log_every": 2, "eval_every": 100, "ckpt_every": 3, "keep_last": 5,
                  "codebook": {"restart_every": 2, "restart_after": 2}},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return load_config(TokenizerTrainConfig, data)


def assert_setting_error(preset: str, override: str) -> None:
    """Loading the tokenizer preset `preset` with `override` (key=value) is a one-line error naming that key."""
    from vqgan.errors import UserError
    from vqgan.presets import resolve_config_path

    key = override.split("=", 1)[0]
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        load_config(TokenizerTrainConfig, resolve_config_path(preset), [override])
    assert "\n" not in str(err.value)


def photo_crops(folder: Path, step: int = 16) -> Path:
    """32 px crops of four of scikit-image's photographs (96 px, crops every `step` px across, 32 down): real
    images for the tiny training tests, no download."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((96, 96), Image.LANCZOS)
        for dx in range(0, 65, step):
            for dy in range(0, 65, 32):
                img.crop((dx, dy, dx + 32, dy + 32)).save(folder / f"{name}_{dx}_{dy}.png")
    return folder


def train_on_photos(tmp_path: Path, steps: int, lr: float, train: dict | None = None, **sections):
    """A tiny model (`tiny_train_config` with `sections`, and `train` keys) trained `steps` steps at learning rate
    `lr` on `photo_crops`: its config, held-out PSNR before and after, and its saved model, loaded back."""
    from vqgan.checkpoint import load_model
    from vqgan.train.stage1 import TokenizerTrainer

    photos = photo_crops(tmp_path / "photos")
    cfg = tiny_train_config(tmp_path, data={"path": str(photos), "holdout": 4, "crop": "center", "flip": False},
                            train={"steps": steps, "batch_size": 8, "base_learning_rate": lr, "scale_lr": False,
                                   "eval_every": 1000, "ckpt_every": 1000, **(train or {})}, **sections)
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()["psnr"]
    return cfg, before, after, load_model(tmp_path / "run")


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory) -> Path:
    """The demo's image tokenizer recipe (preset `demo`: 64 px, f = 8, FSQ with 1000 codes) trained 60 of the
    demo's 400 steps on the built-in scenes (~30 s at one thread); its saved model folder."""
    from vqgan.presets import resolve_config_path
    from vqgan.train.stage1 import TokenizerTrainer

    root = tmp_path_factory.mktemp("demo-tokenizer")
    cfg = load_config(TokenizerTrainConfig, resolve_config_path("demo"), [
        f"train.out_dir={root}", "train.steps=60", "data.builtin_count=512", "data.holdout=8", "data.num_workers=0",
        "train.eval_every=1000", "train.ckpt_every=1000", "train.log_every=1000"])
    TokenizerTrainer(cfg, progress=False).fit()
    return root / "model"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


def run_two_processes(*args: str | Path) -> str:
    """Run a script (or `-m module ...`) under `torchrun --standalone --nproc_per_node=2` (gloo on CPU); its stdout."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = ["-m"] if args[0] == "-m" else []
    # "--": the script's options are not torchrun's (argparse would read `--n` as an abbreviation of `--nnodes`)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *module, "--", *map(str, args[len(module):])], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"stdout: {proc.stdout[-1000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc.stdout


def run_one_process(*args: str | Path) -> str:
    """The same as `run_two_processes` in one plain process (no torchrun): its stdout."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"stdout: {proc.stdout[-1000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FID Inception network with random weights, saved under the real file name: the real key
    layout (the real weights cannot be downloaded here; the metrics it gives mean nothing, only their plumbing).
    He-initialised so that features differ from image to image: with torch-fidelity's own init they vanish
    (~1e-8) and every metric is degenerate (FID 0, IS 1), which would hide mixed-up or reordered features."""
    pytest.importorskip("torch_fidelity")
    from vqgan.eval.inception import FID_WEIGHTS_FILES, build_network

    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_FILES[0]
    torch.manual_seed(0)
    net = build_network()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.Linear):  # the logits: spread enough for an Inception Score above 1
            torch.nn.init.normal_(m.weight, std=0.3)
    torch.save(net.state_dict(), path)
    return path


def grid_model(quantizer: dict):
    """A tiny conv VQGAN (tiny_model_config) with a grid quantizer section (fsq, lfq), seeded."""
    import dataclasses

    from vqgan.tokenizers.model import VQModel

    torch.manual_seed(0)
    return VQModel(dataclasses.replace(tiny_model_config(), quantizer=quantizer_config(**quantizer)))


def start_inside_one_cell(layer) -> None:
    """The VQ-VAE's start (quantizers/grid_start.py) in the 1x1 conv `layer` before a quantizer: a spread far under a
    grid step, around an offset."""
    with torch.no_grad():
        layer.weight.mul_(1e-3)
        layer.bias.fill_(0.3)


def grid_start_on(x: torch.Tensor) -> dict:
    """The quant_conv of a stuck FSQ model (grid_model) centred from images `x` (the two-process check)."""
    from vqgan.config import CodebookCareConfig

    model = grid_model({"kind": "fsq", "levels": [8, 5, 5, 5]})
    start_inside_one_cell(model.quant_conv)
    model.quantize.start_upkeep(CodebookCareConfig(), total_steps=1)
    assert "inside one cell" in model.initialize_codebook(lambda: iter([x]))
    return model.quant_conv.state_dict()
