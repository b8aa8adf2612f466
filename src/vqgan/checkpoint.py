"""Files: model weights (safetensors + readable config), training checkpoints, safe loading.

Nothing here unpickles with full pickle: `.pt`/`.pth`/`.ckpt` files go through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers, so a malicious
checkpoint cannot run code. Directories are written to a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind; in a folder a user names, only the files written are
replaced (each with one rename) and nothing else there is removed. Files and folders follow the umask.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import UserError
from .registry import FOREIGN_CHECKPOINTS, MODELS

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
DISC_FILE = "discriminator.safetensors"  # a training objective's discriminator, beside a model's weights
LPIPS_FILE = "lpips.safetensors"  # the LPIPS network a converted checkpoint was trained with
LOSS_CONFIG_FILE = "loss.yaml"  # the loss settings a converted checkpoint was trained with


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain Python values, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); it was probably not written completely")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch files are zip archives, or pickles in the legacy format
        raise UserError(f"checkpoint {path} is not a PyTorch file (neither a zip archive nor a pickle); weights in "
                        "safetensors need the .safetensors suffix")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter; the restricted unpickler decides
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, str(e))) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated: {first[:200]}") from None


def _refusal(path: Path, torch_message: str) -> str:
    """Why a file was refused, naming the global it refers to. PyTorch's own message starts with advice to
    load with `weights_only=False` (which would run the code) and names builtins without their module."""
    allowed = _allowed_globals()
    names = list(dict.fromkeys(g for g in _pickled_globals(path) if g not in allowed))
    if not names:
        found = re.search(r"GLOBAL ([\w.]+)", torch_message)
        names = [found.group(1)] if found else []
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    what = f"refers to {listed}, not tensors or plain values" if names else \
        "holds objects other than tensors and plain values"
    return (f"checkpoint {path} {what}: refused for safety (loading it could run code). Use a checkpoint that "
            "holds only tensors and plain values (a state dict, or a .safetensors file)")


def _allowed_globals() -> set[str]:
    """The globals that `torch.load(weights_only=True)` rebuilds (tensors, storages, dtypes, OrderedDict...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper: without it, anything outside torch is suspect
        allowed = set()
    allowed.update(f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()
                   if hasattr(g, "__qualname__"))
    return allowed


def _pickled_globals(path: Path) -> list[str]:
    """The `module.name` globals a checkpoint's pickle refers to (the pickle in a torch zip file, or the
    pickles of a plain or legacy torch file)."""
    try:
        with open(path, "rb") as fh:
            if not zipfile.is_zipfile(fh):
                fh.seek(0)  # is_zipfile read the end of the file
                return _globals_in(fh)
            with zipfile.ZipFile(fh) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return _globals_in(io.BytesIO(zf.read(member))) if member else []
    except (OSError, zipfile.BadZipFile):
        return []


def _globals_in(stream: BinaryIO) -> list[str]:
    """Read with pickletools, which runs nothing. Pickles one after the other (a legacy torch file holds four
    before its tensor data) until the stream ends or stops being a pickle."""
    found: list[str] = []
    try:
        for _ in range(4):
            memo: dict[int, str | None] = {}
            pushed: list[str | None] = []  # what the ops put on the pickle stack: strings, else None
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(_global_name(*str(arg).split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    found.append(_global_name(pushed[-2], pushed[-1]))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name.endswith("PUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name.endswith("GET"):
                    pushed.append(memo.get(arg))
                elif op.name not in ("PROTO", "FRAME"):
                    pushed.append(arg if isinstance(arg, str) else None)
    except (ValueError, EOFError, UnicodeDecodeError):  # the end of the pickles (or damage): what was found
        return found
    return found


def _global_name(module: str, name: str) -> str:
    # protocol 2 (torch.save's) spells the builtins module the Python 2 way
    return f"{'builtins' if module == '__builtin__' else module}.{name}"


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


def current_umask() -> int:
    """The process umask, read without changing it where /proc tells it (changing it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)`, then rename tmp over `path`: a reader, or a resumed run, never sees half a file. tmp sits
    beside `path` (one file system), named `.STEM-XXXX.SUFFIX` so that writers going by the suffix (np.save, PIL)
    keep it, with the mode open() would give (mkstemp's 0600 would outlive the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _temporary_directory(parent: Path, name: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a model folder follows the umask
    return tmp


def _fsync_files(folder: Path) -> None:
    """Make the data durable before a rename publishes it."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` wholesale once the block finished. Only for folders
    this project owns (a run's checkpoints and `model/`); a folder a user names goes through `replace_files`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_directory(target.parent, target.name)
    try:
        yield tmp
        _fsync_files(tmp)
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


@contextmanager
def replace_files(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory whose files then take their places in `target`, each with one atomic
    rename; anything else in `target` stays as it is. A new `target` appears whole, with one rename."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is an existing file, not a folder; give a folder path")
    if not target.exists():
        with atomic_directory(target) as tmp:
            yield tmp
        return
    tmp = _temporary_directory(target, "vqgan-write")  # inside: the renames stay on one file system
    try:
        yield tmp
        _fsync_files(tmp)
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: f.name == CONFIG_FILE)
        for f in files:  # each config last: a reader never pairs a new config with old weights
            dest = target / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600 whatever the umask


def write_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def save_model(model: torch.nn.Module, directory: str | Path, config: dict[str, Any] | None = None) -> None:
    """`model.safetensors` + `config.yaml` (the model config, with its `kind`; or `config` when given). In an
    existing folder only these two files are replaced; nothing else there is touched."""
    with replace_files(directory) as tmp:
        save_tensors(model.state_dict(), tmp / WEIGHTS_FILE)
        write_yaml(config if config is not None else model.config_dict(), tmp / CONFIG_FILE)


def read_yaml_mapping(path: Path, what: str = "config") -> dict[str, Any]:
    """A YAML file that must hold a mapping, with one-line errors naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a {type(data).__name__}, not a mapping of settings; it is not a "
                        "model's config (rewrite it with `save_pretrained` or `vqgan convert`)")
    return data


def _read_model_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{directory} has no {CONFIG_FILE}; expected a directory written by save_pretrained, "
                        "a training checkpoint or `vqgan convert`")
    data = read_yaml_mapping(cfg_path, "model config")
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
    original taming-transformers `.ckpt` (its YAML config found beside it). The model is built by the `kind` in
    its config.yaml, through the registry of model kinds."""
    path = resolve_model_path(path)
    if not path.is_dir():  # an original taming-transformers checkpoint
        return FOREIGN_CHECKPOINTS.build("taming", path)[0].to(map_location)
    data = _read_model_config(path)
    kind = data.get("kind", "vqgan")
    if kind not in MODELS:
        raise UserError(f"{path} holds a model of kind {kind!r}, which this version cannot load (it loads "
                        f"{', '.join(MODELS.kinds())})")
    model = MODELS.build(kind, data)
    sd = load_state_dict_file(path / WEIGHTS_FILE)
    check_state_dict(model, sd, str(path / WEIGHTS_FILE))
    model.load_state_dict(sd)
    return model.to(map_location).eval()


def resolve_model_path(path: str | Path) -> Path:
    """A model folder (a run directory resolves to its final model, else its latest checkpoint) or a taming
    checkpoint file; anything else is a one-line error."""
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file():
        if (path / "model" / WEIGHTS_FILE).is_file():
            path = path / "model"
        else:
            latest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
            if latest is not None:
                path = latest
    if not path.is_dir():
        if not path.exists():
            raise UserError(f"model path {path} does not exist")
        if path.suffix not in (".ckpt", ".pt", ".pth"):
            raise UserError(f"{path} is neither a model directory (with {WEIGHTS_FILE} and {CONFIG_FILE}) nor a "
                            "taming-transformers .ckpt")
    return path


def _require_tokenizer(model: torch.nn.Module, path: Path) -> None:
    if not hasattr(model, "quantize"):  # a prior: tokenizers compose an encoder, a quantizer and a decoder
        raise UserError(f"{path} is a transformer prior, not a tokenizer; a tokenizer starts from a tokenizer (a "
                        "taming VQModel .ckpt, a converted VQGAN, or a tokenizer's run or checkpoint)")


def load_for_finetuning(path: str | Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None,
                                                   dict[str, torch.Tensor] | None]:
    """(model, discriminator weights or None, LPIPS weights or None) from a taming `.ckpt`, a converted
    directory, a training checkpoint or a run directory. Our own folders load without the converter."""
    p = Path(path)
    if p.is_file():
        model, disc, lpips = FOREIGN_CHECKPOINTS.build("taming", resolve_model_path(p))
        _require_tokenizer(model, p)
        return model, disc or None, lpips or None
    model = load_model(p)
    _require_tokenizer(model, p)
    folder = p if (p / WEIGHTS_FILE).is_file() else None
    if folder is None:  # a run directory: the weights came from its final model or latest checkpoint
        folder = latest_checkpoint(p / "checkpoints")
    disc = load_state_dict_file(folder / DISC_FILE) if folder and (folder / DISC_FILE).is_file() else None
    lpips = load_state_dict_file(folder / LPIPS_FILE) if folder and (folder / LPIPS_FILE).is_file() else None
    return model, disc, lpips


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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (weights files named in outputs), read in 4 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: token files record which tokenizer made them."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
