"""Load the original taming-transformers checkpoints (Lightning `.ckpt` + `model.yaml`/`project.yaml`).

Conversion is a pure `state_dict -> state_dict` split with strict key and shape checks; the model keeps
taming's module names, so weights copy as they are. The converter switches on the compatibility quirks
that change numbers (`quantizer.legacy_beta`). Checkpoints are read with `torch.load(weights_only=True)`.

Supported: `taming.models.vqgan.VQModel` (with its `loss.*` weights: the PatchGAN discriminator and
the LPIPS network, which load into the training objective when fine-tuning), `GumbelVQ` (its eval-mode
tokens are the noise-free argmax here; see quantizers/gumbel.py), and `Net2NetTransformer` priors:
unconditional, class-conditional, and conditioned on segmentation / depth maps through a VQModel condition
stage, in raster order (taming's Identity permuter).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import (
    CONFIG_FILE,
    DISC_FILE,
    LOSS_CONFIG_FILE,
    LPIPS_FILE,
    WEIGHTS_FILE,
    check_state_dict,
    fingerprint,
    load_for_finetuning,  # noqa: F401  (re-exported: it lived here; our own folders load without this module)
    load_state_dict_file,
    replace_files,
    save_model,
    save_tensors,
    write_yaml,
)
from ..config import LossConfig, VQGANConfig, quantizer_config
from ..errors import UserError
from ..registry import FOREIGN_CHECKPOINTS
from ..tokenizers import VQModel

VQ_TARGET = "taming.models.vqgan.VQModel"
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"
_MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def _config_candidates(ckpt: Path) -> Iterator[Path]:
    """Where taming's configs sit: `X.yaml` beside `X.ckpt`; `model.yaml`/`project.yaml` next to it or one
    folder up; and in `configs/` there, as in the released archives (`<run>/checkpoints/last.ckpt` with
    `<run>/configs/model.yaml`) and taming's logs (`<run>/configs/<time>-project.yaml`, the newest first)."""
    yield ckpt.with_suffix(".yaml")
    for folder in (ckpt.parent, ckpt.parent.parent):
        for name in ("model.yaml", "project.yaml", "config.yaml"):
            yield folder / name
        yield folder / "configs" / "model.yaml"
        yield from sorted((folder / "configs").glob("*project.yaml"), reverse=True)


def find_config(ckpt: Path) -> Path | None:
    """The taming YAML of a checkpoint (see `_config_candidates`). A YAML of another kind (this project's
    own `config.yaml` of a model converted into that folder) is passed over."""
    for path in _config_candidates(Path(ckpt)):
        if path.is_file() and _maybe_taming_config(path):
            return path
    return None


def _no_config(ckpt: Path) -> str:
    """The error for a checkpoint without its YAML: the fix works for every command, not only `convert`."""
    return (f"no taming config found for {ckpt} (looked beside it, one folder up and in configs/ there): put the "
            "model.yaml or *-project.yaml released with it there, or run `vqgan convert CKPT OUT --config YAML` and "
            "use OUT")


def _maybe_taming_config(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True  # read_taming_config names the file and what is wrong with it
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "target" in data["model"]


def read_taming_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read taming config {path}: {str(e).splitlines()[0]}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "target" not in model:
        raise UserError(f"{path} is not a taming-transformers config (no model.target)")
    return model


def _existing_checkpoint(ckpt: str | Path) -> Path:
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        raise UserError(f"{ckpt} is a folder; give the taming-transformers .ckpt file itself")
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} does not exist")
    return ckpt


def vqgan_config(params: dict[str, Any], where: str = "config", gumbel: bool = False,
                 used: torch.Tensor | None = None) -> VQGANConfig:
    """`used`: the checkpoint's `quantize.used` buffer when it has one (a remapped quantizer)."""
    dd = dict(params["ddconfig"])
    if gumbel and params["embed_dim"] != dd["z_channels"]:
        raise UserError(f"{where}: taming's GumbelVQ only runs with embed_dim == z_channels")
    if dd.get("double_z"):
        raise UserError(f"{where}: ddconfig.double_z is true, which a VQ model never uses")
    remap_codes, unknown = 0, "random"
    if params.get("remap") is not None:
        if gumbel:
            raise UserError(f"{where}: `remap` on a GumbelVQ is not supported")
        remap_codes = len(used) if used is not None else len(_remap_codes(params["remap"], where))
        unknown = str(params.get("unknown_index", "random"))
    return VQGANConfig(resolution=dd["resolution"], in_channels=dd["in_channels"], out_ch=dd["out_ch"], ch=dd["ch"],
                       ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                       attn_resolutions=list(dd["attn_resolutions"]), dropout=float(dd.get("dropout", 0.0)),
                       z_channels=dd["z_channels"],
                       # taming's VectorQuantizer2(legacy=True) weights the codebook term by beta = 0.25
                       quantizer=quantizer_config("vq", n_embed=params["n_embed"], embed_dim=params["embed_dim"], beta=0.25,
                                                 legacy_beta=True, remap_codes=remap_codes, unknown_index=unknown)
                       if not gumbel else
                       # taming's temperature after loading is its initial 1.0 (not stored in the weights)
                       quantizer_config("gumbel", n_embed=params["n_embed"], embed_dim=params["embed_dim"],
                                       kl_weight=float(params.get("kl_weight", 5e-4)), temperature=1.0))


def _remap_codes(path: str, where: str):
    """The code ids of taming's `remap` .npy file (a path as the config gives it: absolute, relative to the
    working directory, or its file name beside the config)."""
    import numpy as np

    base = Path(where.removesuffix(" first_stage_config").removesuffix(" cond_stage_config")).parent
    for candidate in (Path(path), base / path, base / Path(path).name):
        if candidate.is_file():
            try:
                return np.load(candidate, allow_pickle=False).reshape(-1)
            except (OSError, ValueError) as e:
                raise UserError(f"{where}: cannot read the remap file {candidate}: {e}") from None
    raise UserError(f"{where}: the quantizer's remap file {path} is not found; put it beside the config")


def _add_remap_codes(model: VQModel, sd: dict[str, torch.Tensor], params: dict[str, Any], where: str) -> None:
    """taming keeps the remap list as the buffer `quantize.used`; a checkpoint without it gets the file's."""
    if getattr(model.config.quantizer, "remap_codes", 0) and "quantize.used" not in sd:
        sd["quantize.used"] = torch.from_numpy(_remap_codes(params["remap"], where).astype("int64"))


def loss_config(params: dict[str, Any]) -> LossConfig | None:
    lc = params.get("lossconfig") or {}
    if not str(lc.get("target", "")).endswith("VQLPIPSWithDiscriminator"):
        return None
    p = lc.get("params") or {}
    return LossConfig(pixel_weight=float(p.get("pixelloss_weight", 1.0)),
                      perceptual_weight=float(p.get("perceptual_weight", 1.0)),
                      codebook_weight=float(p.get("codebook_weight", 1.0)),
                      disc_start=int(p.get("disc_start", 0)), disc_factor=float(p.get("disc_factor", 1.0)),
                      disc_weight=float(p.get("disc_weight", 1.0)), disc_loss=p.get("disc_loss", "hinge"),
                      disc_layers=int(p.get("disc_num_layers", 3)), disc_ndf=int(p.get("disc_ndf", 64)),
                      disc_norm="actnorm" if p.get("use_actnorm") else "batch")


def split_vqgan_state_dict(sd: dict[str, torch.Tensor], source: str
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """taming VQModel keys -> (autoencoder, discriminator, LPIPS) state dicts."""
    model, disc, lpips, unknown = {}, {}, {}, []
    for key, value in sd.items():
        if key.startswith("loss.discriminator."):
            disc[key[len("loss.discriminator."):]] = value
        elif key.startswith("loss.perceptual_loss."):
            lpips[key[len("loss.perceptual_loss."):]] = value
        elif key.startswith(_MODEL_PREFIXES):
            model[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{source}: keys that a taming VQModel does not have: {unknown[:5]}")
    return model, disc, lpips


def _taming_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = load_state_dict_file(ckpt)
    return {k: v.contiguous() for k, v in sd.items()}  # released files may hold strided views


def load_taming_vqgan(ckpt: str | Path, config: str | Path | None = None
                      ) -> tuple[VQModel, LossConfig | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, loss config, discriminator weights, LPIPS weights) from a taming VQModel checkpoint."""
    ckpt = _existing_checkpoint(ckpt)
    cfg_path = Path(config) if config else find_config(ckpt)
    if cfg_path is None:
        raise UserError(_no_config(ckpt))
    params_all = read_taming_config(cfg_path)
    target = params_all["target"]
    if target not in (VQ_TARGET, GUMBEL_TARGET):
        raise UserError(f"{cfg_path}: model.target {target} is not supported yet (supported: {VQ_TARGET}, "
                        f"{GUMBEL_TARGET})")
    params = params_all.get("params") or {}
    model_sd, disc_sd, lpips_sd = split_vqgan_state_dict(_taming_state_dict(ckpt), str(ckpt))
    model = VQModel(vqgan_config(params, str(cfg_path), gumbel=target == GUMBEL_TARGET,
                                 used=model_sd.get("quantize.used")))
    _add_remap_codes(model, model_sd, params, str(cfg_path))
    check_state_dict(model, model_sd, str(ckpt))
    model.load_state_dict(model_sd)
    return model.eval(), loss_config(params), disc_sd, lpips_sd


def convert(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Write the project's format: model.safetensors + config.yaml (+ the loss weights and loss.yaml; for a
    transformer, its tokenizer in tokenizer/).

    `out_dir` must be new or empty unless `overwrite`; then only the files written here are replaced (each
    with one rename) and nothing else in it is touched. The input checkpoint and config are never replaced."""
    ckpt, out = _existing_checkpoint(ckpt), Path(out_dir)
    cfg_path = Path(config) if config else find_config(ckpt)
    _check_target(out, overwrite, [ckpt] + ([cfg_path] if cfg_path else []))
    if cfg_path is not None and read_taming_config(cfg_path)["target"] == TRANSFORMER_TARGET:
        writes, summary = _transformer_files(ckpt, cfg_path)
    else:
        writes, summary = _vqgan_files(ckpt, cfg_path)
    stale = [name for name in _OUTPUT_NAMES if name not in writes and (out / name).exists()]
    if stale:  # left beside the new weights, they would pass for this model's own
        raise UserError(f"{out} holds {', '.join(stale)}, which this conversion does not write: beside the new "
                        "model they would pass for its own; delete them, or convert into another folder")
    replaced = sorted(name for name in writes if (out / name).exists())
    with replace_files(out) as tmp:
        for name, write in writes.items():
            write(tmp / name)
    return {"out": str(out), **summary, **({"replaced": replaced} if replaced else {})}


# everything `convert` may write in its output folder
_OUTPUT_NAMES = (WEIGHTS_FILE, CONFIG_FILE, LOSS_CONFIG_FILE, DISC_FILE, LPIPS_FILE, "tokenizer", "cond_tokenizer")


def _check_target(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, an output folder whose files a conversion would mix with or replace."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is an existing file, not a folder; give a folder path")
    for name in _OUTPUT_NAMES:  # never, even with --overwrite: the command would destroy its own input
        target = (out / name).resolve()
        for source in inputs:
            if source.resolve() == target or target in source.resolve().parents:
                raise UserError(f"converting into {out} would replace {out / name}, an input of this conversion "
                                "(the checkpoint or its config); convert into another folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        inside = [s for s in inputs if out.resolve() in s.resolve().parents]
        why = f" (among them the input {inside[0]})" if inside else ""
        listed = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UserError(f"{out} already holds {listed}{why}; convert into a new or empty folder, or pass --overwrite "
                        "to replace only the converted model's files there (nothing else is touched)")


def _vqgan_files(ckpt: Path, cfg_path: Path | None) -> tuple[dict[str, Callable[[Path], None]], dict[str, Any]]:
    model, loss_cfg, disc_sd, lpips_sd = load_taming_vqgan(ckpt, cfg_path)
    writes: dict[str, Callable[[Path], None]] = {
        WEIGHTS_FILE: lambda p: save_tensors(model.state_dict(), p),
        CONFIG_FILE: lambda p: write_yaml(model.config_dict(), p)}
    if loss_cfg is not None:
        writes[LOSS_CONFIG_FILE] = lambda p: write_yaml(asdict(loss_cfg), p)
    for name, sd in ((DISC_FILE, disc_sd), (LPIPS_FILE, lpips_sd)):
        if sd:
            writes[name] = lambda p, sd=sd: save_tensors(sd, p, metadata={"source": str(ckpt)})
    return writes, {"kind": "vqgan", "codes": model.quantize.n_embed, "downsample_factor": model.downsample_factor,
                    "discriminator": bool(disc_sd), "lpips": bool(lpips_sd)}


def _transformer_files(ckpt: Path, cfg_path: Path) -> tuple[dict[str, Callable[[Path], None]], dict[str, Any]]:
    gpt, first_stage, conditioning, cond_stage = load_taming_transformer(ckpt, cfg_path)
    # `sample --tokenizer` compares a tokenizer with these, as it does for a trained prior
    side = first_stage.config.latent_size
    recorded = {**conditioning, "grid": [side, side], "tokenizer_fingerprint": fingerprint(first_stage)}
    writes: dict[str, Callable[[Path], None]] = {
        WEIGHTS_FILE: lambda p: save_tensors(gpt.state_dict(), p),
        CONFIG_FILE: lambda p: write_yaml({**gpt.config_dict(), "conditioning": recorded}, p),
        "tokenizer": lambda p: save_model(first_stage, p)}
    if cond_stage is not None:
        recorded["cond_tokenizer_fingerprint"] = fingerprint(cond_stage)
        writes["cond_tokenizer"] = lambda p: save_model(cond_stage, p)
    return writes, {"kind": "gpt", "conditioning": conditioning}


@FOREIGN_CHECKPOINTS.register("taming")
def load_taming_checkpoint(ckpt: str | Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None,
                                                     dict[str, torch.Tensor] | None]:
    """(model, discriminator weights or None, LPIPS weights or None) from a taming `.ckpt`: a VQModel /
    GumbelVQ tokenizer, or a Net2NetTransformer prior (the GPT, without objective weights)."""
    ckpt = _existing_checkpoint(ckpt)
    cfg = find_config(ckpt)
    if cfg is not None and read_taming_config(cfg)["target"] == TRANSFORMER_TARGET:
        return load_taming_transformer(ckpt, cfg)[0], None, None
    model, _, disc, lpips = load_taming_vqgan(ckpt)
    return model, disc or None, lpips or None


TRANSFORMER_TARGET = "taming.models.cond_transformer.Net2NetTransformer"
COND_STAGE_TARGETS = (VQ_TARGET, "taming.models.vqgan.VQSegmentationModel")


def cond_stage_config(params: dict[str, Any], where: str, used: torch.Tensor | None = None) -> VQGANConfig:
    """A taming condition stage (a VQModel on segmentation or depth maps) -> our config with its input kind:
    more than 3 input channels are one-hot labels (taming feeds them so), one channel is depth."""
    cfg = vqgan_config(params, where, used=used)
    channels = cfg.in_channels
    if channels == 3:
        raise UserError(f"{where}: an RGB condition stage (e.g. super-resolution) is not supported yet")
    cfg.input_kind = "depth" if channels == 1 else "segmentation"
    if cfg.input_kind == "segmentation" and cfg.out_ch != channels:
        raise UserError(f"{where}: a segmentation stage needs out_ch == in_channels (got {cfg.out_ch}, {channels})")
    return cfg


def load_taming_transformer(ckpt: str | Path, config: str | Path | None = None):
    """(GPT, first-stage tokenizer, conditioning, condition tokenizer or None) from a taming
    Net2NetTransformer checkpoint.

    Conditioning (a TokenLayout dict with layout "taming"): unconditional (the `sos_token`), class (the class
    id), or spatial (the tokens of a segmentation / depth map from the condition stage `cond_stage_model.*`).
    In taming all of them share the vocabulary with the image codes.
    """
    from ..priors import GPT, GPTConfig

    ckpt = _existing_checkpoint(ckpt)
    cfg_path = Path(config) if config else find_config(ckpt)
    if cfg_path is None:
        raise UserError(_no_config(ckpt))
    model_cfg = read_taming_config(cfg_path)
    if model_cfg["target"] in (VQ_TARGET, GUMBEL_TARGET):
        raise UserError(f"{ckpt} is a tokenizer ({model_cfg['target']}, says {cfg_path}), not a transformer prior")
    if model_cfg["target"] != TRANSFORMER_TARGET:
        raise UserError(f"{cfg_path}: model.target {model_cfg['target']} is not a {TRANSFORMER_TARGET}")
    params = model_cfg.get("params") or {}
    permuter = (params.get("permuter_config") or {}).get("target", "taming.modules.transformer.permuter.Identity")
    if not permuter.endswith("Identity"):
        raise UserError(f"{cfg_path}: permuter {permuter} is not supported yet (only raster order)")
    sd = _taming_state_dict(ckpt)
    cond = params.get("cond_stage_config")
    fs = params["first_stage_config"]
    fs_params = fs.get("params") or {}
    cond_stage = None
    if cond == "__is_unconditional__" or params.get("unconditional"):
        conditioning = {"kind": "unconditional", "sos_token": int(params.get("sos_token", 0))}
    elif isinstance(cond, dict) and str(cond.get("target", "")).endswith("Labelator"):
        conditioning = {"kind": "class", "n_classes": int((cond.get("params") or {}).get("n_classes", 1000))}
    elif isinstance(cond, dict) and cond.get("target") in COND_STAGE_TARGETS:
        cond_stage = VQModel(cond_stage_config(cond.get("params") or {}, f"{cfg_path} cond_stage_config",
                                               used=sd.get("cond_stage_model.quantize.used")))
        side = fs_params["ddconfig"]["resolution"] // cond_stage.downsample_factor  # maps as large as the images
        conditioning = {"kind": "spatial", "cond_kind": cond_stage.config.input_kind,
                        "cond_n_embed": cond_stage.quantize.n_embed, "cond_len": side * side, "cond_grid": [side, side]}
    else:
        raise UserError(f"{cfg_path}: cond_stage_config {cond!r} is not supported (supported: unconditional, class "
                        "labels, and VQModel condition stages for segmentation or depth maps)")
    tp = (params.get("transformer_config") or {}).get("params") or {}
    gpt = GPT(GPTConfig(vocab_size=tp["vocab_size"], block_size=tp["block_size"], n_layer=tp["n_layer"],
                        n_head=tp["n_head"], n_embd=tp["n_embd"], dropout=float(tp.get("resid_pdrop", 0.0)),
                        n_unmasked=int(tp.get("n_unmasked", 0))))
    first_stage = VQModel(vqgan_config(fs_params, f"{cfg_path} first_stage_config",
                                       gumbel=fs["target"] == GUMBEL_TARGET, used=sd.get("first_stage_model.quantize.used")))
    conditioning.update(layout="taming", n_embed=first_stage.quantize.n_embed)
    gpt_sd, fs_sd, cond_sd, unknown = {}, {}, {}, []
    for key, value in sd.items():
        if key.startswith("transformer."):
            name = key[len("transformer."):]
            if name.endswith(".attn.mask"):  # a derived buffer: the causal (prefix) mask
                continue
            gpt_sd[name] = value
        elif key.startswith("first_stage_model."):
            fs_sd[key[len("first_stage_model."):]] = value
        elif key.startswith("cond_stage_model.") and cond_stage is not None:
            cond_sd[key[len("cond_stage_model."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{ckpt}: keys this converter does not handle yet: {unknown[:5]}")
    check_state_dict(gpt, gpt_sd, f"{ckpt} (transformer.*)")
    gpt.load_state_dict(gpt_sd)
    for model, part, name in ((first_stage, fs_sd, "first_stage_model"), (cond_stage, cond_sd, "cond_stage_model")):
        if model is None:
            continue
        # the loss weights and the segmentation model's `colorize` projection (pictures only) are not the model
        part = {k: v for k, v in part.items() if not k.startswith("loss.") and k != "colorize"}
        stage_params = (fs if name == "first_stage_model" else cond).get("params") or {}
        _add_remap_codes(model, part, stage_params, str(cfg_path))
        check_state_dict(model, part, f"{ckpt} ({name}.*)")
        model.load_state_dict(part)
    if cond_stage is not None:
        cond_stage.eval()
    return gpt.eval(), first_stage.eval(), conditioning, cond_stage
