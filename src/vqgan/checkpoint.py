"""Files: model weights (safetensors + readable config), training checkpoints, safe loading.

Nothing here unpickles with full pickle: `.pt`/`.pth`/`.ckpt` files go through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers, so a malicious
checkpoint cannot run code. Directories are written to a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
DISC_FILE = "discriminator.safetensors"  # a training objective's discriminator, beside a model's weights


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain Python values, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); it was probably not written completely")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter; the restricted unpickler decides
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain values, refused for "
                        f"safety (it could run code when unpickled): {first[:200]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated: {first[:200]}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} mapping from .safetensors or a torch file (optionally under `state_dict`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist")
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"weights file {path} is corrupt or truncated: {str(e)[:200]}") from None
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only once the block finished."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # make the data durable before the rename publishes it
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)


def write_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def save_model(model: torch.nn.Module, directory: str | Path, config: dict[str, Any] | None = None) -> None:
    """`model.safetensors` + `config.yaml` (the model config, with its `kind`; or `config` when given)."""
    with atomic_directory(directory) as tmp:
        save_tensors(model.state_dict(), tmp / WEIGHTS_FILE)
        write_yaml(config if config is not None else model.config_dict(), tmp / CONFIG_FILE)


def _read_model_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{directory} has no {CONFIG_FILE}; expected a directory written by save_pretrained, "
                        "a training checkpoint or `vqgan convert`")
    data = yaml.safe_load(cfg_path.read_text()) or {}
    # a training checkpoint stores the whole training config; the model is its `model` section
    if "model" in data and isinstance(data["model"], dict):
        data = {"kind": data.get("kind", "vqgan"), **data["model"]}
    return data


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Strict key and shape check that names the first offending keys (only the model's keys that start with
    `prefix`, when given)."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        raise UserError(f"{source} does not match the model: {'; '.join(parts)}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise UserError(f"{source} has wrong shapes (checkpoint vs model): {', '.join(bad[:3])}")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model from a directory (save_pretrained, `vqgan convert`, a training checkpoint or run) or an
    original taming-transformers `.ckpt` (its YAML config found beside it)."""
    from .autoencoder import VQModel

    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file():
        # a training run directory: its final model, else its latest checkpoint
        if (path / "model" / WEIGHTS_FILE).is_file():
            path = path / "model"
        else:
            latest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
            if latest is not None:
                path = latest
    if not path.is_dir():
        if not path.exists():
            raise UserError(f"model path {path} does not exist")
        if path.suffix in (".ckpt", ".pt", ".pth"):  # an original taming-transformers checkpoint
            from .convert.taming import (
                TRANSFORMER_TARGET,
                find_config,
                load_taming_transformer,
                load_taming_vqgan,
                read_taming_config,
            )

            cfg = find_config(path)
            if cfg is not None and read_taming_config(cfg)["target"] == TRANSFORMER_TARGET:
                return load_taming_transformer(path, cfg)[0].to(map_location)
            return load_taming_vqgan(path)[0].to(map_location)
        raise UserError(f"{path} is neither a model directory (with {WEIGHTS_FILE} and {CONFIG_FILE}) nor a "
                        "taming-transformers .ckpt")
    data = _read_model_config(path)
    kind = data.get("kind", "vqgan")
    if kind == "gpt":
        from .transformer import GPT

        model = GPT.from_config_dict(data)
    elif kind == "vqgan":
        model = VQModel.from_config_dict(data)
    else:
        raise UserError(f"{path} holds a model of kind {kind!r}, which this version cannot load")
    sd = load_state_dict_file(path / WEIGHTS_FILE)
    check_state_dict(model, sd, str(path / WEIGHTS_FILE))
    model.load_state_dict(sd)
    return model.to(map_location).eval()


# --------------------------------------------------------------------------------------------
# training checkpoints: <run>/checkpoints/step_00001000/


def checkpoint_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: token files record which tokenizer made them."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
