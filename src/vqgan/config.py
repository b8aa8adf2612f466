"""Typed configuration: dataclasses, loaded from YAML, overridable with ``section.key=value``.

Config files hold values only; code decides how parts connect. Unknown keys are an error that lists
the valid ones.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from .codes import CodeSpec
from .errors import UserError
from .presets import resolve_config_path
from .registry import DECODERS, ENCODERS, QUANTIZERS, TOKENIZERS, Registry

log = logging.getLogger(__name__)

T = TypeVar("T")


class ByKind:
    """A config section whose class is chosen by its `kind` from a registry: `model.quantizer` with `kind: fsq`
    is read into the class FSQ registered, so each kind has its own typed keys (and its own unknown-key errors).
    The base section names the registry and the default kind."""

    registry: ClassVar[Registry]
    default_kind: ClassVar[str]

    @classmethod
    def section_base(cls) -> type:
        return next(c for c in cls.__mro__ if "registry" in vars(c))

    @classmethod
    def for_kind(cls, kind: str) -> type:
        base = cls.section_base()
        return base.registry.config(kind, base)

    @classmethod
    def build(cls, kind: str | None = None, **options: Any) -> Any:
        """The section of `kind` (the base's default kind when None) with `options`."""
        kind = kind or cls.section_base().default_kind
        return cls.for_kind(kind)(kind=kind, **options)

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """An older layout of the section (as saved in model folders) -> this class's; the default keeps it."""
        return data

    def check_kind(self, where: str) -> None:
        expected = self.for_kind(self.kind)  # type: ignore[attr-defined]
        if not isinstance(self, expected):
            raise UserError(f"{where}: kind {self.kind!r} reads a {expected.__name__} section, "  # type: ignore
                            f"got a {type(self).__name__}")


@dataclass
class QuantizerConfig(ByKind):
    """The quantizer between encoder and decoder. Each kind registers a subclass with its own keys (vq.py:
    `VQConfig`, gumbel.py: `GumbelConfig`, ...); this base holds what every kind has."""

    registry: ClassVar[Registry] = QUANTIZERS
    default_kind: ClassVar[str] = "vq"

    kind: str = "vq"
    embed_dim: int = 256  # width of the latents it quantizes (the encoder's output is projected to it)

    @property
    def code_width(self) -> int:
        """Channels of the latent grid the quantizer reads and returns (the decoder's input is projected from it)."""
        return self.embed_dim

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        """The code spec of one position: the vocabulary of each of its depths."""
        raise NotImplementedError(f"quantizer kind {self.kind!r} does not say its vocabulary")

    def validate(self, where: str = "model.quantizer") -> None:
        self.check_kind(where)
        if self.embed_dim < 1:
            raise UserError(f"{where}.embed_dim must be >= 1, got {self.embed_dim}")

    # model folders saved before the sections were typed hold every kind's keys at these defaults
    _FLAT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "beta": 0.25, "legacy_beta": False, "remap_codes": 0, "unknown_index": "random", "temperature": 1.0,
        "kl_weight": 5e-4, "straight_through": True, "noise_in_eval": False}

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        keys = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in data.items()
                if k in keys or k not in cls._FLAT_DEFAULTS or v != cls._FLAT_DEFAULTS[k]}


def quantizer_config(kind: str = "vq", **options: Any) -> QuantizerConfig:
    """The typed `model.quantizer` section of `kind`: `quantizer_config("vq", n_embed=1024, embed_dim=256)`."""
    return QuantizerConfig.build(kind, **options)


class _GridPart(ByKind):
    """What encoder and decoder sections share: their checks, and the setting that says their grid factor."""

    # the setting that says the grid factor, for error messages (a kind with its own names its key)
    factor_key: ClassVar[str] = "model.ch_mult"

    def validate(self, model: VQGANConfig, where: str) -> None:
        self.check_kind(where)

    def factor_fix(self, factor: int) -> str:
        """How to give this part the grid factor `factor` (the end of a one-line mismatch error)."""
        if factor & (factor - 1):
            return "the conv encoder and decoder have power-of-two factors"
        levels = factor.bit_length()
        return f"give model.ch_mult {levels} levels (factor 2 ** (levels - 1)), e.g. {[1] * levels}"


@dataclass
class EncoderConfig(_GridPart):
    """`model.encoder`: its `kind`, and the keys of that kind. The conv VQGAN's shape (ch, ch_mult, ...) stays in
    the model section, shared by its encoder and decoder (the paper's `ddconfig`), so every flat config and
    checkpoint loads unchanged; kinds with settings of their own register a subclass (tokenizers/vit.py)."""

    registry: ClassVar[Registry] = ENCODERS
    default_kind: ClassVar[str] = "conv"
    kind: str = "conv"

    def downsample_factor(self, model: VQGANConfig) -> int:
        """Image side / latent grid side. The conv encoder halves the grid between its ch_mult levels."""
        return 2 ** (len(model.ch_mult) - 1)


@dataclass
class DecoderConfig(_GridPart):
    """`model.decoder`: its `kind`, and the keys of that kind (see EncoderConfig). Its `upsample_factor` must
    equal the encoder's grid factor."""

    registry: ClassVar[Registry] = DECODERS
    default_kind: ClassVar[str] = "conv"
    kind: str = "conv"

    def upsample_factor(self, model: VQGANConfig) -> int:
        """Image side / latent grid side. The conv decoder doubles the grid between its ch_mult levels."""
        return 2 ** (len(model.ch_mult) - 1)


PartConfig = EncoderConfig  # the name before encoder and decoder sections had classes of their own


@dataclass
class TokenizerConfig(ByKind):
    """`model` of train-tokenizer: the tokenizer's `kind` (vqgan, the default: VQGANConfig; vqvae2:
    tokenizers/vqvae2.py) and that kind's keys. Every kind says `resolution`, `input_kind`, `in_channels`,
    `out_ch`, `downsample_factor`, `latent_size`, `code_spec` and `validate`."""

    registry: ClassVar[Registry] = TOKENIZERS
    default_kind: ClassVar[str] = "vqgan"

    def check_input(self) -> None:
        """The kind of section and what its input holds: rgb images, or segmentation / depth maps."""
        self.check_kind("model")
        kind, cin, cout = self.input_kind, self.in_channels, self.out_ch  # type: ignore[attr-defined]
        if kind not in ("rgb", "segmentation", "depth"):
            raise UserError(f"model.input_kind must be rgb, segmentation or depth, got {kind!r}")
        if kind == "segmentation" and not (cin == cout >= 2):
            raise UserError("model.input_kind=segmentation: set model.in_channels and model.out_ch to the number of "
                            f"labels (got {cin} and {cout})")
        if kind == "depth" and not (cin == cout == 1):
            raise UserError("model.input_kind=depth: set model.in_channels=1 and model.out_ch=1")


@dataclass
class VQGANConfig(TokenizerConfig):
    """Encoder/decoder shape (the paper's `ddconfig`) and the quantizer between them."""

    resolution: int = 256
    # what the input holds: "rgb" images, or condition maps: "segmentation" (in_channels = out_ch = the
    # number of labels, one-hot in, logits out) or "depth" (one channel)
    input_kind: str = "rgb"
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    z_channels: int = 256
    # what the decoder predicts: the "image" itself, or "logit_laplace": per sub-pixel the location (logit space)
    # and log-scale of DALL-E's logit-Laplace distribution (2 * out_ch channels; the image is the sigmoid of the
    # location, mapped back to [-1, 1]; losses/objective.py: loss.logit_laplace_weight needs it)
    decoder_output: str = "image"
    quantizer: QuantizerConfig = field(default_factory=quantizer_config)
    encoder: EncoderConfig = field(default_factory=EncoderConfig.build)
    decoder: DecoderConfig = field(default_factory=DecoderConfig.build)
    kind: str = "vqgan"  # model.kind: which tokenizer (TokenizerConfig)

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor(self)

    @property
    def code_spec(self) -> CodeSpec:
        """The tokens this tokenizer makes: one grid at the encoder's factor, the quantizer's depths."""
        return CodeSpec.single(self.downsample_factor, self.quantizer.vocab_per_depth)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    def validate(self) -> None:
        if not self.ch_mult:
            raise UserError("model.ch_mult must list at least one level, e.g. [1, 2, 2, 4]")
        for c in [self.ch * m for m in self.ch_mult] if "conv" in (self.encoder.kind, self.decoder.kind) else ():
            if c % 32:
                raise UserError(f"model.ch * model.ch_mult gives {c} channels; GroupNorm(32) needs multiples of 32")
        self.quantizer.validate()
        self.encoder.validate(self, "model.encoder")
        self.decoder.validate(self, "model.decoder")
        self.check_input()
        if self.decoder_output not in ("image", "logit_laplace"):
            raise UserError(f"model.decoder_output must be 'image' or 'logit_laplace', got {self.decoder_output!r}")
        if self.decoder_output == "logit_laplace" and self.input_kind != "rgb":
            raise UserError(f"model.decoder_output=logit_laplace models RGB pixels; model.input_kind is "
                            f"{self.input_kind}")
        f, up = self.downsample_factor, self.decoder.upsample_factor(self)
        if up != f:
            raise UserError(f"{self.decoder.factor_key} gives the decoder a factor of {up}, the encoder's grid factor "
                            f"({self.encoder.factor_key}) is {f}; {self.decoder.factor_fix(f)}")
        if self.resolution % f:
            raise UserError(f"model.resolution {self.resolution} is not divisible by the downsampling factor {f} "
                            f"({self.encoder.factor_key}); e.g. model.resolution={max(1, round(self.resolution / f)) * f}")


@dataclass
class LossConfig:
    """L1 (+ MSE, + logit-Laplace) + LPIPS + codebook + adaptive-weighted GAN loss (PatchGAN or StyleGAN
    discriminator)."""

    pixel_weight: float = 1.0  # L1
    l2_weight: float = 0.0  # mean squared error (VQ-VAE's reconstruction term)
    # DALL-E's logit-Laplace negative log-likelihood (Ramesh et al. 2021, sec. 3.1 / A.3); needs
    # model.decoder_output=logit_laplace
    logit_laplace_weight: float = 0.0
    perceptual_weight: float = 1.0  # 0 trains without the perceptual term (state it explicitly)
    codebook_weight: float = 1.0
    vgg_weights: str | None = None  # torchvision vgg16 state dict; default: torch hub cache
    lpips_heads: str | None = None  # lpips v0.1 vgg.pth; default: the `lpips` package's bundled file
    # Benchmarks only: run LPIPS on a randomly initialised VGG when no weights exist (loud warning).
    allow_random_perceptual: bool = False
    disc_start: int = 10_000  # step from which the GAN term reaches the generator
    disc_train_start: int | None = None  # step from which D trains (<= disc_start); None: = disc_start
    disc_factor: float = 1.0
    disc_weight: float = 0.8
    disc_loss: str = "hinge"  # or "vanilla" (softplus)
    # "patch": PatchGAN, a logit per overlapping patch (Esser et al. 2021); "stylegan": StyleGAN2's residual
    # discriminator, one logit per image (ViT-VQGAN, Yu et al. 2021, sec. 3.1). disc_ndf is the width of either's
    # first layer; disc_layers and disc_norm shape the PatchGAN only (the StyleGAN one halves down to 4 px)
    disc_kind: str = "patch"
    disc_layers: int = 3
    disc_ndf: int = 64
    disc_norm: str = "batch"  # or "actnorm"
    adaptive_weight_max: float = 1e4

    def validate(self) -> None:
        for name in ("pixel_weight", "l2_weight", "logit_laplace_weight", "perceptual_weight", "codebook_weight",
                     "disc_factor", "disc_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise UserError(f"loss.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        if self.disc_kind not in ("patch", "stylegan"):
            raise UserError(f"loss.disc_kind must be 'patch' or 'stylegan', got {self.disc_kind!r}")
        if self.disc_norm not in ("batch", "actnorm"):
            raise UserError(f"loss.disc_norm must be 'batch' or 'actnorm', got {self.disc_norm!r}")
        if self.disc_train_start is not None and self.disc_train_start > self.disc_start:
            raise UserError(f"loss.disc_train_start ({self.disc_train_start}) must be <= loss.disc_start "
                            f"({self.disc_start})")

    @property
    def disc_train_step(self) -> int:
        return self.disc_start if self.disc_train_start is None else self.disc_train_start


@dataclass
class DataConfig:
    """Where the images come from and how they are cropped."""

    path: str = ""  # a folder of images (recursive), or "builtin:scenes" for the built-in demo data
    crop: str = "random"  # "random" crop, "center" crop, or "resize" (whole image, aspect not kept)
    flip: bool = True  # random horizontal flips in training
    holdout: int = 64  # the last N files (sorted by path) are held out for evaluation
    # loader processes per training process; None: one per CPU core it may use (shared with the other local
    # ranks), at most 8 (2 on a 2-core machine, as before; a GPU machine's cores feed its shorter steps)
    num_workers: int | None = None
    builtin_count: int = 1024  # images in the built-in data set

    def validate(self) -> None:
        if self.crop not in ("random", "center", "resize"):
            raise UserError(f"data.crop must be 'random', 'center' or 'resize', got {self.crop!r}")
        for name in ("holdout", "num_workers"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.builtin_count < 1:
            raise UserError(f"data.builtin_count must be >= 1, got {self.builtin_count}")


@dataclass
class CodebookCareConfig:
    """Keeps nearest-neighbour VQ from collapsing onto a few codes."""

    # first step: codes := random encoder outputs; for a grid kind (fsq, lfq), a latent that starts inside one cell
    # of the grid is centred onto the grid (quantizers/grid_start.py)
    init_from_data: bool = True
    kmeans_iters: int = 0  # ... then this many k-means (Lloyd) iterations on those outputs (0: random ones alone)
    restart_every: int = 20  # steps between dead-code restarts (0 = never)
    restart_after: int = 100  # a code unused for this many steps is dead
    restart_until: float = 0.9  # fraction of training after which codes are no longer restarted


@dataclass
class TrainConfig:
    out_dir: str = "runs/tokenizer"
    steps: int = 100_000
    batch_size: int = 8  # per process
    base_learning_rate: float = 4.5e-6
    scale_lr: bool = True  # lr = base * batch_size * grad_accum * world_size, as the reference
    grad_accum: int = 1
    warmup_steps: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    # torch.compile the encoder, decoder, discriminator and LPIPS network (the quantizer stays eager): for GPUs;
    # the first steps then take minutes to compile, and checkpoints are unchanged
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    image_every: int = 500
    eval_every: int = 1000
    ckpt_every: int = 1000
    keep_last: int = 3
    init_from: str | None = None  # a checkpoint to fine-tune from
    reset_codebook: bool = False  # with init_from: re-initialise the codebook from data
    # with init_from: load its discriminator too, in the shape it was saved with (loss.disc_kind, disc_layers, disc_ndf,
    # disc_norm are taken from its loss.yaml / train_config.yaml); false: a fresh one from this config's loss
    init_discriminator: bool = True
    # a step whose loss or gradients are not finite is skipped; this many in a row stop the run
    max_nonfinite_steps: int = 20
    # stop after this many minutes of training steps (0: no limit), then finish as after the last step (final
    # evaluation, model/); schedules still run over `steps`; a resumed run gets the budget anew
    max_minutes: float = 0.0
    codebook: CodebookCareConfig = field(default_factory=CodebookCareConfig)

    def validate(self) -> None:
        validate_loop(self, "train", ("steps", "batch_size", "grad_accum", "log_every", "image_every", "eval_every",
                                      "ckpt_every", "keep_last", "max_nonfinite_steps"))
        if self.base_learning_rate <= 0:
            raise UserError(f"train.base_learning_rate must be > 0, got {self.base_learning_rate}")
        if self.warmup_steps < 0:
            raise UserError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("kmeans_iters", "restart_every", "restart_after"):
            if getattr(self.codebook, name) < 0:
                raise UserError(f"train.codebook.{name} must be >= 0, got {getattr(self.codebook, name)}")


def validate_loop(cfg: Any, where: str, at_least_one: tuple[str, ...]) -> None:
    """The checks every training loop's settings share: precision, counts and intervals >= 1, a time budget."""
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"{where}.precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise UserError(f"{where}.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.max_minutes >= 0:
        raise UserError(f"{where}.max_minutes must be >= 0 (0: no time limit), got {cfg.max_minutes}")


@dataclass
class TokenizerTrainConfig:
    """Everything `vqgan train-tokenizer` needs."""

    model: TokenizerConfig = field(default_factory=VQGANConfig)  # VQGANConfig, or the section of model.kind
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.loss.validate()
        self.data.validate()
        self.train.validate()
        kind = self.model.input_kind
        if kind != "rgb" and self.loss.perceptual_weight > 0:
            raise UserError(f"model.input_kind={kind}: LPIPS compares RGB images; set loss.perceptual_weight=0")
        if kind == "segmentation" and self.loss.disc_factor > 0:
            raise UserError("model.input_kind=segmentation trains on cross-entropy alone; set loss.disc_factor=0")
        if kind == "segmentation" and (self.loss.l2_weight > 0 or self.loss.logit_laplace_weight > 0):
            raise UserError("model.input_kind=segmentation trains on cross-entropy alone; set loss.l2_weight=0 and "
                            "loss.logit_laplace_weight=0")
        if self.loss.logit_laplace_weight > 0 and self.model.decoder_output != "logit_laplace":
            raise UserError("loss.logit_laplace_weight > 0 needs the decoder's scale: set "
                            "model.decoder_output=logit_laplace")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of keys, got {value!r}")
        if isinstance(tp, type) and issubclass(tp, ByKind):
            tp = section_class(tp, value, where)
            value = tp.upgrade(value)
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise UserError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def section_class(tp: type, data: dict[str, Any], where: str) -> type:
    """The class of a section chosen by kind, from the `kind` in its data (the base's default when absent)."""
    kind = data.get("kind", tp.section_base().default_kind)
    if not isinstance(kind, str):
        raise UserError(f"{where}.kind must be a string, got {kind!r}")
    return tp.for_kind(kind)  # an unknown kind: the registry's one-line error naming the valid ones


def _key(*parts: str) -> str:
    """A dotted key as users write it (train.steps); the config's root has no name of its own."""
    return ".".join(p for p in parts if p)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are an error listing the valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        of = where or "the config"
        if issubclass(cls, ByKind):
            of = f"{of} (kind {data.get('kind', getattr(cls, 'default_kind', ''))})"
        raise UserError(f"unknown key {_key(where, unknown[0])}; valid keys of {of}: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], _key(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) wherever two nested config dicts differ; only `kind` where a section's
    kinds differ (its other keys follow from it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("kind") != b.get("kind"):
            return [(_key(prefix, "kind"), a.get("kind"), b.get("kind"))]
        return [d for key in sorted(set(a) | set(b), key=str) for d in differences(a.get(key), b.get(key),
                                                                                 _key(prefix, str(key)))]
    return [] if a == b else [(prefix, a, b)]


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type, where: str = "") -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict; values are parsed as YAML (1e-4, [1,2], true).

    `...kind=` overrides go first, so the other keys of a section chosen by kind are checked against the new
    kind; keys the new kind does not have (a preset's settings for the old one) leave the section, and the keys
    it shares stay, with a warning naming them unless the same command line sets them too. Returns a new dict:
    the caller's (perhaps a shared preset's) is left as it was."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. train.steps=500)")
    overrides = sorted(overrides, key=lambda item: not item.split("=", 1)[0].strip().endswith(".kind"))
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    for item in overrides:
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, node_cls = data, cls
        for i, part in enumerate(parts):
            if isinstance(node_cls, type) and issubclass(node_cls, ByKind):
                node_cls = section_class(node_cls, node, _key(where, *parts[:i]))
            types_ = _field_types(node_cls)
            if part not in types_:
                prefix = _key(where, *parts[:i])
                raise UserError(f"unknown key {_key(prefix, part)} in override {item!r}; valid keys of "
                                f"{prefix or 'the config'}: {', '.join(types_)}")
            if i == len(parts) - 1:
                previous = node.get(part)
                try:
                    node[part] = yaml.safe_load(raw) if raw.strip() else None
                except yaml.YAMLError as e:
                    raise UserError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                                    "quote strings, write lists as [1,2]") from None
                if part == "kind" and issubclass(node_cls, ByKind):
                    keep = {f.name for f in dataclasses.fields(section_class(node_cls, node, key))}
                    for name in [k for k in node if k not in keep]:
                        del node[name]
                    section = key.strip()[:-len(".kind")]
                    common = {f.name for f in dataclasses.fields(node_cls.section_base())}  # every kind's
                    kept = [k for k in node if k not in common and f"{section}.{k}" not in overridden]
                    if kept and previous not in (None, node["kind"]):
                        log.warning("%s: the config's %s (set for kind %s) carried over, as kind %s has them too; set "
                                    "them on the command line to change them", item.strip(),
                                    ", ".join(f"{k}={node[k]!r}" for k in kept), previous, node["kind"])
            else:
                node = node.setdefault(part, {})
                node_cls = types_[part]
    return data


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict. `extends: NAME` (a preset, or a YAML path relative to this file) starts from
    that config and lays this file's sections over it (`merge_sections`), so a variant states only what it
    changes."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass a YAML file or a preset name")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of sections (model, loss, data, train)")
    if "extends" not in data:
        return data
    base = data.pop("extends")
    if not isinstance(base, str) or not base:
        raise UserError(f"config file {p}: extends must name a preset or a YAML file, got {base!r}")
    local = p.parent / base
    if local.suffix in (".yaml", ".yml") and not local.is_file():
        raise UserError(f"config file {p}: extends {base}, but there is no {local}; name a file next to it or a preset")
    base_path = local if local.suffix in (".yaml", ".yml") else resolve_config_path(base)
    seen = (*_seen, p.resolve())
    if base_path.resolve() in seen:
        chain = " -> ".join(q.name for q in (*seen, base_path.resolve()))
        raise UserError(f"config file {p}: extends goes round in a circle ({chain}); remove one of the extends")
    return merge_sections(load_yaml(base_path, seen), data)


def merge_sections(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over`'s keys laid over `base`'s, mapping by mapping; lists and values replace. A section that names a
    different `kind` than the base's replaces it whole: the base's keys belong to the other kind."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        under = out.get(key)
        both = isinstance(value, dict) and isinstance(under, dict)
        if both and value.get("kind", under.get("kind")) == under.get("kind"):
            out[key] = merge_sections(under, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(cls: type[T], source: str | Path | dict[str, Any], overrides: list[str] = ()) -> T:
    """Load `cls` from a YAML file or dict, then apply overrides and validate."""
    data = dict(source) if isinstance(source, dict) else load_yaml(source)
    data = apply_overrides(data, list(overrides), cls)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# stage 2: the transformer prior (`vqgan train-transformer`)


@dataclass
class PriorModelConfig:
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PriorDataConfig:
    tokens: str = ""  # a token store directory
    holdout: int = 64  # the last N rows are held out
    # auto: on the store's condition maps when it has them, else on its class labels when it has them;
    # or force one of: spatial, class, none
    conditioning: str = "auto"
    # > 0: train on random windows of this many positions a side of the first level's grid (and the same image
    # region of every other level: VQ-VAE-2's [top | bottom]); sampling the store's size then slides the window
    window: int = 0


@dataclass
class PriorTrainConfig:
    out_dir: str = "runs/prior"
    steps: int = 10_000
    batch_size: int = 32
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # classifier-free guidance: train the "no class" token too
    # start from a trained prior (a train-transformer run or model/, a converted or original taming
    # transformer): its architecture and token layout are kept; model.* settings are then ignored
    init_from: str = ""
    precision: str = "auto"
    compile: bool = False  # torch.compile the training forward (for GPUs; evaluation and sampling stay eager)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    max_nonfinite_steps: int = 20  # a step with a non-finite loss or gradient is skipped; this many in a row stop
    max_minutes: float = 0.0  # as the tokenizer's train.max_minutes: a time budget (0: none)

    def validate(self) -> None:
        validate_loop(self, "train", ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_last",
                                      "max_nonfinite_steps"))
        for name in ("learning_rate", "grad_clip"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.label_dropout < 1:
            raise UserError("train.min_lr_ratio must be in [0, 1] and train.label_dropout in [0, 1)")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("train.warmup_steps and train.weight_decay must be >= 0")


@dataclass
class TransformerTrainConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)

    def validate(self) -> None:
        if not self.data.tokens:
            raise UserError("data.tokens is not set: give a token store made by `vqgan tokenize`")
        self.model.validate()
        self.train.validate()
        if self.data.holdout < 0:
            raise UserError(f"data.holdout must be >= 0, got {self.data.holdout}")
        if self.data.conditioning not in ("auto", "spatial", "class", "none"):
            raise UserError(f"data.conditioning must be auto, spatial, class or none, got {self.data.conditioning!r}")
