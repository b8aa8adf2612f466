"""CLIP models through open_clip, from local weight files only: nothing is downloaded.

Where weights are looked for, in order:
1. `--clip-weights PATH`: an open_clip state dict (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`,
   a training `.pt` with `state_dict`), OpenAI's TorchScript file from its `clip` package (`ViT-B-32.pt`), or a
   plain state dict in OpenAI's layout.
2. The Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), where
   open_clip keeps a pretrained tag's files: e.g. `ViT-B-32` / `openai` is the repo
   `timm/vit_base_patch32_clip_224.openai`, file `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`.
3. `~/.cache/clip`, where OpenAI's `clip` package (and open_clip's URL download) keeps the released files under
   their standard names (`ViT-B-32.pt`, `RN50.pt`, `ViT-L-14-336px.pt`).
OpenAI's layout is open_clip's (open_clip's CLIP keeps OpenAI's module names) plus three hyperparameter entries
and float16 weights; `from_openai_layout` converts it. A TorchScript archive is read with torch.jit.load, which
restores tensors and TorchScript code but runs no pickled Python; only its state dict is kept.
Missing weights are a one-line error naming the file and where to put it; a file whose keys or shapes do not
fit the model is refused the same way. The pretrained tag (`--clip-pretrained`) says which weight set to look
for in the caches (default `openai`) and sets the activation open_clip pairs with it (QuickGELU for OpenAI's and
some LAION sets). Without a tag an explicit file gets QuickGELU when it is OpenAI's own file, the tag of the
Hugging Face repo it is cached in, else open_clip's default for the model, with a warning: the two activations
load the same tensors and only the right one gives the weights' embeddings. What can be checked of a file's
identity offline is recorded (clip_checks.py). The BPE vocabulary ships with open_clip.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import check_state_dict, file_sha256, load_state_dict_file
from ..errors import UserError
from .clip_checks import identity, tag_of_file

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, safetensors first
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # hyperparameters in OpenAI's files
DEFAULT_TAG = "openai"  # the weight set looked for in the caches when no --clip-pretrained is given

log = logging.getLogger("vqgan.imagine")


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP of the ensemble: open_clip's model name, its pretrained tag (None: not given), and an explicit
    weights file (None: the caches, for the tag or `DEFAULT_TAG`)."""

    model: str = "ViT-B-32"
    pretrained: str | None = None
    weights: Path | None = None

    @property
    def tag(self) -> str | None:
        """The tag the weights are looked up or read as: the given one; without a file, the default."""
        return self.pretrained or (DEFAULT_TAG if self.weights is None else None)


def _open_clip():
    os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip imports huggingface_hub: never reach the network
    try:
        import open_clip
    except ImportError:
        raise UserError("vqgan imagine needs open_clip: pip install 'vqgan[clip]' (open-clip-torch)") from None
    return open_clip


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (read now, so tests can point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs on the root logger as it builds a model ("No pretrained weights loaded ... initialized
    randomly", before our file is loaded into it): those lines say nothing true about this run."""
    def not_open_clip(record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname

    root = logging.getLogger()
    root.addFilter(not_open_clip)
    try:
        yield
    finally:
        root.removeFilter(not_open_clip)


def _tag_config(spec: ClipSpec) -> dict:
    """open_clip's config of the tag's weight set ({} for an explicit file without a tag)."""
    open_clip = _open_clip()
    if spec.model not in open_clip.list_models():
        raise UserError(f"--clip-model {spec.model!r} is not an open_clip model; e.g. ViT-B-32, ViT-B-16, "
                        "ViT-L-14 (open_clip.list_models() lists them)")
    if spec.tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(spec.model, spec.tag) or {}
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.model)[:6])
        raise UserError(f"--clip-pretrained {spec.tag!r} is not a weight set of {spec.model}; its tags: {tags}")
    return cfg


def _tag_of_file(spec: ClipSpec, path: Path) -> str | None:
    """The given tag, else the one the file's place or name says (clip_checks.tag_of_file)."""
    if spec.tag is not None:
        return spec.tag
    open_clip = _open_clip()
    tags = {t: open_clip.get_pretrained_cfg(spec.model, t) or {}
            for t in open_clip.list_pretrained_tags_by_model(spec.model)}
    return tag_of_file(path, tags)


def where_to_put(spec: ClipSpec, cfg: dict) -> str:
    """One sentence naming the files a tag can come from and where each goes."""
    places = []
    repo = cfg.get("hf_hub", "").strip("/")
    if repo:
        if repo.count("/") > 1:  # 'org/name/file'
            repo, name = repo.rsplit("/", 1)
            files = name
        else:
            files = f"{_HF_FILES[0]} (or {_HF_FILES[1]})"
        places.append(f"{files} from https://huggingface.co/{repo} into the Hugging Face cache ({hf_cache_dir()}; "
                      f"`huggingface-cli download {repo}` on a machine with network does it)")
    url = cfg.get("url", "")
    if url:  # for the openai tag: the file OpenAI's `clip` package downloads
        places.append(f"{os.path.basename(url)} ({url}) into {Path('~/.cache/clip').expanduser()}")
    if not places:
        return "pass the path of an existing weights file"
    return "put " + ", or ".join(places) + ", or pass --clip-weights PATH"


def find_weights(spec: ClipSpec) -> Path:
    """The weights file for `spec`: the explicit one, else the caches; a one-line error when there is none."""
    cfg = _tag_config(spec)
    if spec.weights is not None:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise UserError(f"--clip-weights {path} does not exist; {where_to_put(spec, cfg)}")
        return path
    candidates: list[Path] = []
    repo = cfg.get("hf_hub", "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        files = _HF_FILES
        if repo.count("/") > 1:
            repo, name = repo.rsplit("/", 1)
            files = (name,)
        for name in files:
            found = try_to_load_from_cache(repo, name, cache_dir=str(hf_cache_dir()))
            if isinstance(found, str):
                candidates.append(Path(found))
    if cfg.get("url"):
        candidates.append(Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"]))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"CLIP weights for {spec.model} ({spec.tag}) not found (nothing is downloaded): "
                    f"{where_to_put(spec, cfg)}")


def _is_torchscript(path: Path) -> bool:
    """OpenAI's `clip` files are TorchScript archives (code + constants), not plain state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def from_openai_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP state dict -> open_clip's: the same names less the hyperparameter entries, in float32
    (OpenAI's files hold the conv, linear and attention weights and both projections in float16)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A CLIP state dict in open_clip's key layout from any of the accepted files, and whether it came from an
    OpenAI file (its TorchScript archive, or a state dict carrying OpenAI's hyperparameter entries)."""
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"CLIP weights {path}: not a readable TorchScript archive ({first[:160]})") from None
        return from_openai_layout(dict(sd)), True
    sd = load_state_dict_file(path)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k in sd for k in _OPENAI_EXTRA_KEYS):
        return from_openai_layout(sd), True
    return sd, False


class ClipModel:
    """A frozen CLIP: images in [0, 1] -> unit embeddings, texts -> unit embeddings. `source` records which
    weights (file name and sha256) were used, for the outputs."""

    def __init__(self, model: torch.nn.Module, tokenizer, spec: ClipSpec, weights: Path, sha256: str,
                 pretrained: str | None = None, checked: str = "not checked"):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        size = model.visual.image_size
        self.input_size = int(size if isinstance(size, int) else size[0])
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        device = next(model.parameters()).device
        self.mean = torch.tensor(preprocess.get("mean", _OPENAI_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.get("std", _OPENAI_STD), device=device).view(1, 3, 1, 1)
        quick = any(type(m).__name__ == "QuickGELU" for m in model.modules())
        self.source = {"model": spec.model, "pretrained": pretrained or "not given",
                       "activation": "QuickGELU" if quick else "GELU", "file": weights.name, "path": str(weights),
                       "sha256": sha256, "checked": checked}

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] at `input_size` -> (N, D) unit vectors (differentiable)."""
        return F.normalize(self.model.encode_image((images - self.mean) / self.std).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)


def load_clip(spec: ClipSpec, device: torch.device | str = "cpu") -> ClipModel:
    """Build `spec.model` with open_clip (random init, no download) and load its weights file, strictly."""
    open_clip = _open_clip()
    path = find_weights(spec)  # checks the model name and a given tag first
    sd, openai_file = read_weights(path)
    if openai_file and spec.tag not in (None, "openai"):
        log.warning("CLIP weights %s are in OpenAI's layout: read as OpenAI's weights (QuickGELU), not as %s",
                    path, spec.tag)
    tag = "openai" if openai_file else _tag_of_file(spec, path)  # only OpenAI's release has OpenAI's layout
    cfg = (open_clip.get_pretrained_cfg(spec.model, tag) or {}) if tag else {}
    if tag is None:
        log.warning("CLIP weights %s: no --clip-pretrained tag, so open_clip's default activation for %s; if the "
                    "file holds OpenAI's weights (or another QuickGELU set) pass --clip-pretrained openai (or its "
                    "tag), or its embeddings will be off", path, spec.model)
    with _quiet_open_clip():
        model = open_clip.create_model(spec.model, pretrained=None, load_weights=False, pretrained_image=False,
                                       pretrained_text=False,
                                       force_quick_gelu=openai_file or bool(cfg.get("quick_gelu")))
    own = model.state_dict()
    if "logit_scale" in sd and "logit_scale" in own and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    check_state_dict(model, sd, f"CLIP weights {path} (for --clip-model {spec.model}; weights of another model "
                                f"need that model's name)")
    model.load_state_dict(sd)
    model = model.to(device).eval().requires_grad_(False)
    try:
        with _quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as e:  # a model with a Hugging Face text tower needs its tokenizer files cached
        raise UserError(f"the tokenizer of {spec.model} is not available offline: {str(e).splitlines()[0][:160]}")
    sha256 = file_sha256(path)
    return ClipModel(model, tokenizer, spec, path, sha256, tag, identity(path, sha256, cfg, f"{spec.model} / {tag}"))


def open_clip_name(name: str) -> str:
    """OpenAI's `clip` package's model names (`ViT-B/32`, `ViT-L/14@336px`) -> open_clip's (`ViT-B-32`,
    `ViT-L-14-336`); open_clip's names pass unchanged."""
    return name.replace("/", "-").replace("@336px", "-336")


def clip_specs(models: list[str], weights: list[str], pretrained: list[str] | str | None) -> list[ClipSpec]:
    """The CLI's repeatable `--clip-model`, `--clip-weights` and `--clip-pretrained` -> the ensemble. The i-th
    file and tag go with the i-th model; one model name with several files uses that name for each; one tag
    goes with every model."""
    models = [open_clip_name(m) for m in models] or ["ViT-B-32"]
    if weights and len(models) == 1 and len(weights) > 1:
        models = models * len(weights)
    if weights and len(weights) != len(models):
        raise UserError(f"{len(models)} --clip-model values and {len(weights)} --clip-weights files: give one file "
                        "per model (in the same order), or none to use the caches")
    tags = [pretrained] if isinstance(pretrained, str) else list(pretrained or [])
    if len(tags) == 1:
        tags = tags * len(models)
    if tags and len(tags) != len(models):
        raise UserError(f"{len(models)} --clip-model values and {len(tags)} --clip-pretrained tags: give one tag for "
                        "all, or one per model (in the same order)")
    files = [Path(w) for w in weights] or [None] * len(models)
    return [ClipSpec(m, t, f) for m, t, f in zip(models, tags or [None] * len(models), files)]
