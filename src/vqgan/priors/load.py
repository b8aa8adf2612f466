"""Loading a prior from disk with its tokenizers: a `train-transformer` run (or its model/ folder), a
converted taming transformer, or an original taming .ckpt (converted in memory)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CONFIG_FILE, fingerprint, load_model, read_yaml_mapping
from ..convert.taming import load_taming_transformer
from ..errors import UserError
from .bundle import PARAMETER_NAMES, ArgNames, Prior
from .gpt import GPT
from .layout import TokenLayout


def load_prior(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu",
               force: bool = False, names: ArgNames = PARAMETER_NAMES) -> Prior:
    """A trained prior (a `train-transformer` run or its model/) or a converted taming transformer.

    `tokenizer` replaces the prior's own; it must be the same weights (the fingerprint the prior records),
    else its samples would decode to noise, unless `force`. `names`: how errors name these arguments."""
    use_own = f"leave out {names.tokenizer} to use the prior's own"
    p = Path(path)
    if p.is_file():  # an original .ckpt: converted in memory
        gpt, vq, conditioning, cond_vq = load_taming_transformer(p)
        grid = (vq.config.latent_size, vq.config.latent_size)  # the grid it was trained on, whatever decodes it
        if tokenizer:
            vq = _same_tokenizer(load_model(tokenizer).eval(), code_ids(vq), fingerprint(vq),
                                 f"{names.tokenizer} {tokenizer}", path, use_own, force, names)
        layout = TokenLayout.from_dict({"n_embed": code_ids(vq), **conditioning})
        return Prior(gpt.to(device), layout, vq.to(device), grid, conditioning,
                     cond_vq.to(device) if cond_vq is not None else None)
    model_dir = p / "model" if (p / "model" / CONFIG_FILE).is_file() else p
    gpt = load_model(model_dir, map_location=device)
    if not isinstance(gpt, GPT):
        raise UserError(f"{path} is a tokenizer, not a transformer prior; give a train-transformer run, its model/ "
                        "folder, or a taming Net2NetTransformer (its .ckpt or `vqgan convert` output)")
    conditioning = read_yaml_mapping(model_dir / CONFIG_FILE, "model config").get("conditioning") or {}

    def tokenizer_at(own: str, recorded: str | None, what: str):
        """The copy bundled in the prior's folder, else the one at the path it records (checked: it may have
        been retrained since)."""
        if (model_dir / own).is_dir():
            return load_model(model_dir / own, map_location=device).eval()
        if not recorded:
            raise UserError(f"{path} does not say which {what} it uses; pass {names.tokenizer}")
        if not Path(recorded).exists():
            raise UserError(f"the {what} {recorded} recorded by {path} is missing; pass {names.tokenizer}")
        codes = conditioning.get("n_embed" if own == "tokenizer" else "cond_n_embed")
        return _same_tokenizer(load_model(recorded, map_location=device).eval(), codes,
                               conditioning.get(f"{own}_fingerprint"), f"the {what} {recorded} (recorded by it)", path,
                               f"pass {names.tokenizer} with the one it was trained with", force, names)

    if tokenizer:
        recorded = conditioning.get("tokenizer_fingerprint")
        if recorded is None and (model_dir / "tokenizer").is_dir():  # converted before fingerprints were recorded
            recorded = fingerprint(load_model(model_dir / "tokenizer"))
        vq = _same_tokenizer(load_model(tokenizer, map_location=device).eval(), conditioning.get("n_embed"), recorded,
                             f"{names.tokenizer} {tokenizer}", path, use_own, force, names)
    else:
        vq = tokenizer_at("tokenizer", conditioning.get("tokenizer"), "tokenizer")
    cond_vq = None
    if conditioning.get("cond_n_embed"):
        cond_vq = tokenizer_at("cond_tokenizer", conditioning.get("cond_tokenizer"), "condition tokenizer")
    grid = tuple(conditioning.get("grid") or (vq.config.latent_size, vq.config.latent_size))
    # converted taming transformers written before the layout was recorded share code ids with conditions
    layout = TokenLayout.from_dict({"layout": "taming", "n_embed": code_ids(vq), **conditioning})
    grids = [tuple(g) for g in conditioning.get("grids") or []] or None
    return Prior(gpt.eval(), layout, vq, grid, conditioning, cond_vq, grids)


def recorded_tokenizer(info: dict | None):
    """The tokenizer a token store records ({path, fingerprint}), or None (with a warning) when it is missing or
    its weights changed since the store was made: a prior's sample grids then go undecoded."""
    import logging

    if not info:
        return None
    log = logging.getLogger("vqgan.train")
    try:
        model = load_model(info["path"]).eval()
    except (UserError, OSError) as e:
        log.warning("cannot load tokenizer %s (%s): no decoded samples", info["path"], e)
        return None
    if fingerprint(model) != info["fingerprint"]:
        log.warning("tokenizer %s changed since the token store was made: not used", info["path"])
        return None
    return model


def code_ids(tokenizer) -> int:
    """How many token ids a tokenizer's codes take in a prior: the sum of its streams' vocabularies."""
    return sum(tokenizer.code_spec.streams)


def _same_tokenizer(model, codes: int | None, expected: str | None, source: str, prior: str, fix: str,
                    force: bool, names: ArgNames):
    """`model` when its weights are those the prior was trained on: the fingerprint `expected` (unless
    `force`) and `codes` codes (even with `force`: the prior's codes would not index another codebook).
    What the prior does not record is not checked."""
    if codes and int(codes) != code_ids(model):
        raise UserError(f"{source} has {code_ids(model)} codes, but {prior} was trained on a codebook of "
                        f"{codes}; {fix}")
    if expected and not force and (mine := fingerprint(model)) != expected:
        raise UserError(f"{source} is tokenizer {mine}, but {prior} was trained on the tokens of tokenizer "
                        f"{expected}: its samples would decode to noise; {fix}, or pass {names.force}")
    return model
