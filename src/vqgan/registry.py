"""Named registries: configs name parts by `kind`; code (never YAML) maps a kind to what builds it.

A new member joins with one line in its own file, naming the typed config section it reads:

    @QUANTIZERS.register("fsq", config=FSQConfig)
    class FSQuantizer(Quantizer): ...

and becomes a valid `model.quantizer.kind` everywhere (config validation, `build_quantizer`, the contract
tests); a `model.quantizer` section with `kind: fsq` is read into an `FSQConfig`, whose keys are the valid ones. Each registry names the modules that hold its built-in kinds (`providers`); they are imported on the
first lookup, so a config can be validated, or a model folder loaded, before any model module is imported,
and the low layers (config, checkpoint) never import the model files at module level.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """kind -> builder (a class or a function). `where` names the config key the kind comes from."""

    def __init__(self, name: str, where: str, providers: tuple[str, ...] = ()):
        self.name = name
        self.where = where
        self._providers = providers
        self._loaded = False
        self._entries: dict[str, Callable[..., Any]] = {}
        self._configs: dict[str, type] = {}

    def register(self, kind: str, config: type | None = None) -> Callable[[F], F]:
        """Decorator: `@QUANTIZERS.register("vq", config=VQConfig)`. A kind is registered once; `config` is the
        dataclass of its config section (None: the registry's base section, for kinds without options)."""
        def add(builder: F) -> F:
            if kind in self._entries and self._entries[kind] is not builder:
                raise ValueError(f"{self.name} kind {kind!r} is already registered ({self._entries[kind]!r})")
            self._entries[kind] = builder
            if config is not None:
                self._configs[kind] = config
            return builder
        return add

    def config(self, kind: str, base: type) -> type:
        """The config section class of `kind` (`base` when it registered none); unknown kinds: one-line error."""
        self.get(kind)
        return self._configs.get(kind, base)

    def _load_providers(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a provider may look itself up while it is being imported
            for module in self._providers:
                importlib.import_module(module)

    def kinds(self) -> list[str]:
        self._load_providers()
        return sorted(self._entries)

    def __contains__(self, kind: object) -> bool:
        self._load_providers()
        return kind in self._entries

    def get(self, kind: str) -> Callable[..., Any]:
        """The builder of `kind`; an unknown kind is a one-line error listing the valid ones."""
        self._load_providers()
        if kind not in self._entries:
            raise UserError(f"{self.where} must be one of {', '.join(self.kinds())}; got {kind!r}")
        return self._entries[kind]

    def build(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(kind)(*args, **kwargs)


QUANTIZERS = Registry("quantizer", "model.quantizer.kind", ("vqgan.quantizers",))
ENCODERS = Registry("encoder", "model.encoder.kind", ("vqgan.tokenizers",))
DECODERS = Registry("decoder", "model.decoder.kind", ("vqgan.tokenizers",))
# `model.kind` of train-tokenizer: the tokenizer (VQModel: vqgan; VQVAE2: vqvae2), with its config section
TOKENIZERS = Registry("tokenizer", "model.kind", ("vqgan.tokenizers",))
# a saved model folder's `kind` (config.yaml) -> a function building the model from that config dict
MODELS = Registry("model", "the model config's kind", ("vqgan.tokenizers", "vqgan.priors.gpt"))
# another project's checkpoint file format -> a function path -> (model, discriminator sd | None, LPIPS sd | None)
FOREIGN_CHECKPOINTS = Registry("checkpoint format", "the checkpoint format", ("vqgan.convert.taming",))
