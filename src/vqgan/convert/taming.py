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

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from ..autoencoder import VQModel
from ..checkpoint import (
    CONFIG_FILE,
    DISC_FILE,
    WEIGHTS_FILE,
    atomic_directory,
    check_state_dict,
    load_state_dict_file,
    save_tensors,
    write_yaml,
)
from ..config import LossConfig, QuantizerConfig, VQGANConfig
from ..errors import UserError

VQ_TARGET = "taming.models.vqgan.VQModel"
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"
LPIPS_FILE = "lpips.safetensors"
LOSS_CONFIG_FILE = "loss.yaml"
_MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def find_config(ckpt: Path) -> Path | None:
    """The YAML beside a released checkpoint: `model.yaml`/`project.yaml` next to it or one folder up, or
    the log layout `<run>/checkpoints/last.ckpt` + `<run>/configs/*-project.yaml`."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        for name in ("model.yaml", "project.yaml", "config.yaml"):
            if (folder / name).is_file():
                return folder / name
        configs = sorted((folder / "configs").glob("*project.yaml")) if (folder / "configs").is_dir() else []
        if configs:
            return configs[-1]
    same_stem = ckpt.with_suffix(".yaml")
    return same_stem if same_stem.is_file() else None


def read_taming_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read taming config {path}: {str(e).splitlines()[0]}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "target" not in model:
        raise UserError(f"{path} is not a taming-transformers config (no model.target)")
    return model


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
                       quantizer=QuantizerConfig(n_embed=params["n_embed"], embed_dim=params["embed_dim"], beta=0.25,
                                                 legacy_beta=True, remap_codes=remap_codes, unknown_index=unknown)
                       if not gumbel else
                       # taming's temperature after loading is its initial 1.0 (not stored in the weights)
                       QuantizerConfig(kind="gumbel", n_embed=params["n_embed"], embed_dim=params["embed_dim"],
                                       kl_weight=float(params.get("kl_weight", 5e-4)), temperature=1.0))


def _remap_codes(path: str, where: str):
    """The code ids of taming's `remap` .npy file (a path as the config gives it: absolute, relative to the
    working directory, or its file name beside the config)."""
    import numpy as np

    base = Path(where.split(" ")[0]).parent
    for candidate in (Path(path), base / path, base / Path(path).name):
        if candidate.is_file():
            try:
                return np.load(candidate, allow_pickle=False).reshape(-1)
            except (OSError, ValueError) as e:
                raise UserError(f"{where}: cannot read the remap file {candidate}: {e}") from None
    raise UserError(f"{where}: the quantizer's remap file {path} is not found; put it beside the config")


def _add_remap_codes(model: VQModel, sd: dict[str, torch.Tensor], params: dict[str, Any], where: str) -> None:
    """taming keeps the remap list as the buffer `quantize.used`; a checkpoint without it gets the file's."""
    if model.config.quantizer.remap_codes and "quantize.used" not in sd:
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
    ckpt = Path(ckpt)
    cfg_path = Path(config) if config else find_config(ckpt)
    if cfg_path is None:
        raise UserError(f"no taming config found for {ckpt}; pass it with --config (the model.yaml or "
                        "*-project.yaml released beside the checkpoint)")
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


def convert(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """Write the project's format: model.safetensors + config.yaml (+ the loss weights and loss.yaml; for a
    transformer, its tokenizer in tokenizer/)."""
    cfg_path = Path(config) if config else find_config(Path(ckpt))
    if cfg_path is not None and read_taming_config(cfg_path)["target"] == TRANSFORMER_TARGET:
        from ..checkpoint import save_model

        gpt, first_stage, conditioning, cond_stage = load_taming_transformer(ckpt, cfg_path)
        with atomic_directory(out_dir) as tmp:
            save_tensors(gpt.state_dict(), tmp / WEIGHTS_FILE)
            write_yaml({**gpt.config_dict(), "conditioning": conditioning}, tmp / CONFIG_FILE)
            save_model(first_stage, tmp / "tokenizer")
            if cond_stage is not None:
                save_model(cond_stage, tmp / "cond_tokenizer")
        return {"out": str(out_dir), "kind": "gpt", "conditioning": conditioning, "tokenizer": str(Path(out_dir) /
                                                                                                  "tokenizer")}
    model, loss_cfg, disc_sd, lpips_sd = load_taming_vqgan(ckpt, cfg_path)
    with atomic_directory(out_dir) as tmp:
        save_tensors(model.state_dict(), tmp / WEIGHTS_FILE)
        write_yaml(model.config_dict(), tmp / CONFIG_FILE)
        if loss_cfg is not None:
            write_yaml(asdict(loss_cfg), tmp / LOSS_CONFIG_FILE)
        if disc_sd:
            save_tensors(disc_sd, tmp / DISC_FILE, metadata={"source": str(ckpt)})
        if lpips_sd:
            save_tensors(lpips_sd, tmp / LPIPS_FILE, metadata={"source": str(ckpt)})
    return {"out": str(out_dir), "kind": "vqgan", "codes": model.quantize.n_embed,
            "downsample_factor": model.downsample_factor, "discriminator": bool(disc_sd), "lpips": bool(lpips_sd)}


def load_for_finetuning(path: str | Path) -> tuple[VQModel, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """(model, discriminator weights or None, LPIPS weights or None) from a taming `.ckpt`, a converted
    directory, a training checkpoint or a run directory."""
    from ..checkpoint import load_model

    p = Path(path)
    if p.is_file():
        model, _, disc, lpips = load_taming_vqgan(p)
        return model, disc or None, lpips or None
    model = load_model(p)
    folder = p if (p / WEIGHTS_FILE).is_file() else None
    if folder is None:  # a run directory: the weights came from its final model or latest checkpoint
        from ..checkpoint import latest_checkpoint

        folder = latest_checkpoint(p / "checkpoints")
    disc = load_state_dict_file(folder / DISC_FILE) if folder and (folder / DISC_FILE).is_file() else None
    lpips = load_state_dict_file(folder / LPIPS_FILE) if folder and (folder / LPIPS_FILE).is_file() else None
    return model, disc, lpips


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
    from ..transformer import GPT, GPTConfig

    ckpt = Path(ckpt)
    cfg_path = Path(config) if config else find_config(ckpt)
    if cfg_path is None:
        raise UserError(f"no taming config found for {ckpt}; pass it with --config")
    model_cfg = read_taming_config(cfg_path)
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
