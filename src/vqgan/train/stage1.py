"""Stage 1: train the VQGAN tokenizer on a folder of images.

One process, or many under `torchrun --nproc_per_node N` (DistributedDataParallel for the autoencoder,
averaged gradients and BatchNorm statistics for the discriminator). Each iteration: the quantizer's schedules
set from the step (`Quantizer.set_step`), one autoencoder forward, the generator step (L1 / MSE / logit-Laplace
+ LPIPS + codebook + adaptive GAN term), and the discriminator step on
the same reconstruction. Checkpoints are atomic and resumable bit for bit.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from ..checkpoint import (
    CONFIG_FILE,
    DISC_FILE,
    LOSS_CONFIG_FILE,
    WEIGHTS_FILE,
    check_state_dict,
    latest_checkpoint,
    load_for_finetuning,
    save_model,
)
from ..config import TokenizerConfig, TokenizerTrainConfig, differences, from_dict
from ..data.images import ImageDataset, ReadableItems, collate_readable
from ..data.sources import image_sources
from ..errors import UserError
from ..eval.metrics import evaluate_reconstruction
from ..losses import VQGANLoss, build_lpips
from ..registry import TOKENIZERS
from ..tokenizers import Tokenizer
from .common import (
    EpochBatches,
    ResumableSampler,
    Runtime,
    all_reduce_grads,
    autocast,
    average_buffers,
    cleanup_runtime,
    compile_in_place,
    fused_optimizer,
    loader_workers,
    resolve_precision,
    setup_runtime,
    to_floats,
)
from .guard import all_finite
from .loop import TrainingLoop
from .run import STATE_FILE, CheckpointParts, Resume, require_finite

log = logging.getLogger("vqgan.train")


class _InputTap:
    """Keeps the input of a module from its last forward (the decoder's last layer, for lambda)."""

    def __init__(self, module: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]


DISC_SHAPE_KEYS = ("disc_kind", "disc_layers", "disc_ndf", "disc_norm")


def saved_loss_settings(path: str) -> dict[str, Any] | None:
    """The loss settings a tokenizer was trained with, where it records them: `loss.yaml` (written by `vqgan
    convert`), a checkpoint's `train_config.yaml`, a run's `config.yaml`, or a taming `.ckpt`'s project YAML."""
    p = Path(path)
    if p.is_file():  # only another project's checkpoint needs the converter
        from ..convert.taming import find_config, loss_config, read_taming_config

        found = find_config(p)
        loss = loss_config(read_taming_config(found).get("params") or {}) if found else None
        return asdict(loss) if loss else None
    latest = latest_checkpoint(p / "checkpoints")
    for f in (p / LOSS_CONFIG_FILE, p / "train_config.yaml", p / "config.yaml",
              *([latest / "train_config.yaml"] if latest else [])):
        data = yaml.safe_load(f.read_text()) if f.is_file() else None
        if isinstance(data, dict) and isinstance(data.get("loss", data if f.name == LOSS_CONFIG_FILE else None), dict):
            return data.get("loss", data)
    return None


def _take_discriminator_shape(cfg: TokenizerTrainConfig, init_from: str) -> None:
    """Fine-tuning keeps the saved discriminator, so its shape comes from the settings it was saved with."""
    saved = saved_loss_settings(init_from) or {}
    changed = {k: saved[k] for k in DISC_SHAPE_KEYS if k in saved and saved[k] != getattr(cfg.loss, k)}
    for k, v in changed.items():
        setattr(cfg.loss, k, v)
    if changed:
        log.info("%s: its discriminator is loaded, so its shape is kept: %s (with train.init_from, "
                 "train.init_discriminator=false starts a fresh one)", init_from,
                 ", ".join(f"loss.{k}={v}" for k, v in changed.items()))


def build_loss(cfg: TokenizerTrainConfig, lpips_state: dict[str, torch.Tensor] | None = None,
               lpips_source: str = "") -> VQGANLoss:
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = build_lpips(cfg.loss.vgg_weights, cfg.loss.lpips_heads, cfg.loss.allow_random_perceptual,
                                 state_dict=lpips_state, state_source=lpips_source)
    return VQGANLoss(cfg.loss, perceptual, cfg.model.out_ch, cfg.model.input_kind, cfg.model.resolution)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the paper's betas, fused where this torch can."""
    return fused_optimizer(torch.optim.Adam, params, lr=lr, betas=(0.5, 0.9))


def learning_rate(cfg: TokenizerTrainConfig, world_size: int) -> float:
    t = cfg.train
    return t.base_learning_rate * (t.batch_size * t.grad_accum * world_size if t.scale_lr else 1)


class TokenizerTrainer(TrainingLoop):
    name = "train-tokenizer"
    required_files = (WEIGHTS_FILE, CONFIG_FILE, DISC_FILE, STATE_FILE)

    def __init__(self, cfg: TokenizerTrainConfig, resume: Resume | bool = False, runtime: Runtime | None = None,
                 progress: bool = True):
        resuming = self.start_run(cfg, resume, runtime, progress)
        self.dtype = resolve_precision(cfg.train.precision, self.rt.device)
        self.workers = loader_workers(cfg.data.num_workers, self.rt.local_world_size)
        self._build_data()
        self.model = TOKENIZERS.build(cfg.model.kind, cfg.model).to(self.rt.device)  # model.kind: vqgan, vqvae2
        init = load_for_finetuning(cfg.train.init_from) if cfg.train.init_from and not resuming else None
        if resuming:  # the discriminator in the checkpoint has the shape this run was started with
            _take_discriminator_shape(cfg, str(self.run_dir))
        elif init is not None and init[1] is not None and cfg.train.init_discriminator:
            _take_discriminator_shape(cfg, cfg.train.init_from)
        # a released checkpoint carries the LPIPS network it was trained with: use it unless told otherwise
        self.loss = build_loss(cfg, init[2] if init else None, cfg.train.init_from or "").to(self.rt.device)
        self.lr = learning_rate(cfg, self.rt.world_size)
        self.opt_ae = adam(self.model.parameters(), self.lr)
        self.opt_d = adam(self.loss.discriminator.parameters(), self.lr)
        fp16 = self.dtype == torch.float16
        self.scaler_ae = torch.amp.GradScaler(self.rt.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.rt.device.type, enabled=fp16)
        self.care = self.model.quantize.start_upkeep(cfg.train.codebook, cfg.train.steps, seed=cfg.train.seed)
        if self.open_run(resuming) is None and init is not None:
            self._init_from(cfg.train.init_from, init[0], init[1] if cfg.train.init_discriminator else None)
        self.tap = _InputTap(self.model.decoder.last_layer)  # before compiling: the compiled decoder runs it
        if cfg.train.compile:
            perceptual = [self.loss.perceptual] if self.loss.perceptual is not None else []
            compile_in_place(self.model.networks() + [self.loss.discriminator] + perceptual, self.rt.device)
        self.ae = (DistributedDataParallel(self.model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda"
                                           else None, broadcast_buffers=False)
                   if self.rt.distributed else self.model)

    # -- data ------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        sources, n_bad = image_sources(cfg.data.path, cfg.data.builtin_count, cfg.model.resolution,
                                       cfg.model.input_kind)
        self.n_unreadable = n_bad
        holdout = cfg.data.holdout
        if holdout >= len(sources):
            holdout = max(1, len(sources) // 5) if len(sources) > 1 else 0
            log.warning("data.holdout %d >= %d images: holding out %d instead", cfg.data.holdout, len(sources),
                        holdout)
        train_sources = sources[:len(sources) - holdout] if holdout else sources
        eval_sources = sources[len(sources) - holdout:] if holdout else sources[:16]
        common = dict(resolution=cfg.model.resolution, crop=cfg.data.crop, seed=cfg.train.seed,
                      kind=cfg.model.input_kind, n_labels=cfg.model.in_channels)
        self.train_set = ImageDataset(train_sources, flip=cfg.data.flip, train=True, **common)
        self.eval_set = ImageDataset(eval_sources, flip=False, train=False, **common)
        self.sampler = ResumableSampler(len(self.train_set), cfg.train.batch_size, self.rt.rank, self.rt.world_size,
                                        seed=cfg.train.seed)
        # evaluation: each rank evaluates the whole held-out set (it is small); rank 0 reports
        # held-out files that fail to decode are left out (and counted), not stood in for by their neighbours
        self.eval_loader = DataLoader(ReadableItems(self.eval_set), batch_size=min(16, len(self.eval_set)),
                                      shuffle=False, num_workers=0, collate_fn=collate_readable)
        self.eval_unreadable: list[int] = []
        self.skipped_files = 0

    def batches(self):
        """Endless steps' worth of micro-batches (`train.grad_accum` of them), positioned from `self.step`."""
        micro = self._micro_batches()
        while True:
            yield [next(micro) for _ in range(self.cfg.train.grad_accum)]

    def _micro_batches(self):
        """Endless micro-batches, positioned from `self.step` so a resumed run continues the sequence; one
        loader for the whole run (`EpochBatches`), its workers never restarted."""
        t = self.cfg.train
        epoch, offset = divmod(self.step * t.grad_accum, self.sampler.batches_per_epoch)
        loader = DataLoader(self.train_set, batch_sampler=EpochBatches(self.sampler, epoch, offset),
                            num_workers=self.workers, pin_memory=self.rt.device.type == "cuda",
                            # its own generator: making a loader must not draw from the global RNG
                            generator=torch.Generator().manual_seed(t.seed + epoch))
        for batch in loader:
            if int(batch["epoch"][0]) != epoch:
                epoch = int(batch["epoch"][0])
                self._end_of_epoch(epoch)
            yield batch

    def _end_of_epoch(self, epoch: int) -> None:
        usage = self.care.epoch_usage(reset=True)
        self.last_epoch_usage = usage
        if self.rt.is_main:
            self.metrics.write(self.step, {"epoch": epoch, "epoch_usage": usage}, kind="epoch")

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(
            tensors={WEIGHTS_FILE: self.model.state_dict(), DISC_FILE: self.loss.discriminator.state_dict()},
            yaml={CONFIG_FILE: self.model.config_dict(), "train_config.yaml": asdict(self.cfg)},
            state={"opt_ae": self.opt_ae.state_dict(), "opt_d": self.opt_d.state_dict(),
                   "scaler_ae": self.scaler_ae.state_dict(), "scaler_d": self.scaler_d.state_dict(),
                   "codebook_care": self.care.state_dict(), "skipped_files": self.skipped_files})

    def load_parts(self, path: Path, parts: CheckpointParts) -> None:
        saved_model_cfg = {k: v for k, v in parts.yaml[CONFIG_FILE].items() if k != "codes"}
        saved_cls = TokenizerConfig.for_kind(saved_model_cfg.get("kind", "vqgan"))
        saved, current = asdict(from_dict(saved_cls, saved_model_cfg, "model")), asdict(self.cfg.model)  # defaults filled
        if saved != current:
            diff = "; ".join(f"model.{key}: {a!r} there, {b!r} here" for key, a, b in differences(saved, current)[:3])
            raise UserError(f"{path}: the model config differs from the checkpoint's ({diff}); resume with the same "
                            "model section (see its config.yaml)")
        sd, dsd, state = parts.tensors[WEIGHTS_FILE], parts.tensors[DISC_FILE], parts.state
        check_state_dict(self.model, sd, str(path / WEIGHTS_FILE))
        check_state_dict(self.loss.discriminator, dsd, str(path / DISC_FILE))
        self.model.load_state_dict(sd)
        self.loss.discriminator.load_state_dict(dsd)
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_ae.load_state_dict(state["scaler_ae"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.care.load_state_dict(state["codebook_care"])
        self.skipped_files = int(state.get("skipped_files", 0))

    def _init_from(self, path: str, source: Tokenizer, disc_sd: dict[str, torch.Tensor] | None) -> None:
        if asdict(source.config) != asdict(self.cfg.model):
            differ = [k for k, v in asdict(source.config).items() if asdict(self.cfg.model).get(k) != v]
            log.warning("train.init_from %s: model settings differ from the config (%s); the checkpoint's weights "
                        "must still fit", path, ", ".join(differ))
        sd = source.state_dict()
        check_state_dict(self.model, sd, path)
        self.model.load_state_dict(sd)
        # a converted or trained codebook is kept unless asked otherwise
        self.care.initialized = not self.cfg.train.reset_codebook
        if disc_sd is not None:
            own = self.loss.discriminator.state_dict()
            if own.keys() == disc_sd.keys() and all(own[k].shape == v.shape for k, v in disc_sd.items()):
                self.loss.discriminator.load_state_dict(disc_sd)
                log.info("discriminator initialised from %s", path)
            else:
                log.warning("the discriminator in %s does not fit loss.disc_* settings; it starts fresh", path)
        log.info("initialised from %s%s", path, " (codebook re-initialised from data)"
                 if self.cfg.train.reset_codebook else "")

    @torch.no_grad()
    def _initialize_codebook(self) -> None:
        per_image = self.cfg.model.latent_size ** 2
        rows = self.model.quantize.codebook_size
        if self.model.quantize.trainable_codebook() is None:  # a grid's start is checked on ~4,000 positions
            rows = min(rows, 1024)
        n_images = min(len(self.train_set), max(self.cfg.train.batch_size, math.ceil(4 * rows / per_image)), 512)
        g = torch.Generator().manual_seed(self.cfg.train.seed + 17)
        subset = Subset(self.train_set, torch.randperm(len(self.train_set), generator=g)[:n_images].tolist())
        loader = DataLoader(subset, batch_size=32, num_workers=0)
        with autocast(self.rt.device, self.dtype):  # the model's codebooks: the first level's first (VQ-VAE-2)
            done = self.model.initialize_codebook(lambda: (batch["image"].to(self.rt.device) for batch in loader))
        self.metrics.note(f"data initialisation on {n_images} images: {done}")

    # -- one iteration ---------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        step, accum = self.step, len(micro_batches)
        for group in self.opt_ae.param_groups + self.opt_d.param_groups:
            warm = self.cfg.train.warmup_steps
            group["lr"] = self.lr * min(1.0, (step + 1) / warm) if warm else self.lr
        self.opt_ae.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        # the quantizer's schedules (Gumbel temperature, KL weight) follow the step: a resumed run is where it was
        schedule = self.model.quantize.set_step(step)
        disc_trains = self.loss.disc_trains(step)
        logs: dict[str, torch.Tensor] = {}
        finite = torch.tensor(True, device=self.rt.device)
        disc_buffers = [b.clone() for b in self.loss.discriminator.buffers()]  # restored if the step is skipped
        for j, batch in enumerate(micro_batches):
            x = batch["image"].to(self.rt.device, non_blocking=True)
            self.skipped_files += int(batch["skipped"].sum())
            sync = self.ae.no_sync() if (self.rt.distributed and j < accum - 1) else nullcontext()
            with sync, autocast(self.rt.device, self.dtype):
                rec, codebook_loss, info = self.ae(x)
                gen = self.loss.generator_loss(x, rec, codebook_loss, self.model.decoder.last_layer, self.tap.value,
                                               step, output=info.get("decoder_output"))
                self.scaler_ae.scale(gen.loss / accum).backward()
            finite &= torch.isfinite(gen.loss.detach())
            logs = {k: logs.get(k, 0) + v.float() / accum for k, v in gen.logs.items()}
            if disc_trains:
                with autocast(self.rt.device, self.dtype):
                    d_loss, d_logs = self.loss.discriminator_loss_step(x, rec, gen.logits_fake)
                d_params = [p for p in self.loss.discriminator.parameters()]
                self.scaler_d.scale(d_loss / accum).backward(inputs=d_params)
                finite &= torch.isfinite(d_loss.detach())
                logs.update({k: logs.get(k, 0) + v.float() / accum for k, v in d_logs.items()})
            self.tap.value = None
        if self.dtype != torch.float16:  # with fp16 the gradient scalers skip overflowing steps themselves
            finite &= all_finite(p.grad for p in self.parameters_with_grad())
        if not self.guard.after_step(step, finite):
            self.nonfinite_steps += 1
            self.opt_ae.zero_grad(set_to_none=True)
            self.opt_d.zero_grad(set_to_none=True)
            for b, saved in zip(self.loss.discriminator.buffers(), disc_buffers):
                b.copy_(saved)
            return to_floats(logs)
        self.scaler_ae.step(self.opt_ae)
        self.scaler_ae.update()
        if disc_trains:
            all_reduce_grads(self.loss.discriminator, self.rt.world_size)
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        if self.rt.distributed:
            average_buffers(self.loss.discriminator, self.rt.world_size)
        # codebook upkeep on the last micro-batch (statistics reduced across ranks): the quantizer's own
        upkeep = self.model.quantize.maintain(step, info["prequant"], info["codes"], self.opt_ae)
        out = to_floats({**logs, "usage_batch": info["usage"], "perplexity": info["perplexity"]})
        out.update(**upkeep, **schedule,
                   lr=self.opt_ae.param_groups[0]["lr"], skipped_files=self.skipped_files)
        return out

    def parameters_with_grad(self):
        for module in (self.model, self.loss.discriminator):
            yield from (p for p in module.parameters() if p.grad is not None)

    # -- evaluation and pictures -----------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        result = evaluate_reconstruction(self.model, self.eval_loader, self.rt.device)
        if result["unreadable"] != self.eval_unreadable:
            self.eval_unreadable = result["unreadable"]
            if self.rt.is_main:
                self.metrics.note(f"{len(self.eval_unreadable)} held-out file(s) could not be read and are left out: "
                                  + ", ".join(self.eval_set.name(i) for i in self.eval_unreadable[:20]))
        if self.rt.is_main:
            from ..eval.report import pairs_grid

            images = self.run_dir / "images"
            images.mkdir(parents=True, exist_ok=True)
            x, rec = result["examples"]
            pairs_grid(x, rec).save(images / f"step_{self.step:08d}.png")
            self.metrics.write(self.step, {k: result[k] for k in ("psnr", "accuracy", "miou", "l1", "usage",
                                                                   "codes_used", "perplexity") if k in result},
                               kind="eval")
        return result

    def periodic_evaluation(self) -> None:
        self.evaluate()

    # -- the loop (train/loop.py) ----------------------------------------------------------------
    def begin(self) -> None:
        t = self.cfg.train
        if self.rt.is_main:
            self.metrics.note(
                f"start at step {self.step}/{t.steps}: {len(self.train_set)} training images, "
                f"{len(self.eval_set)} held out, {self.n_unreadable} unreadable files skipped while scanning; "
                f"{self.rt.world_size} process(es) on {self.rt.device} ({self.workers} loader processes each), "
                f"precision {self.dtype}"
                f"{', compiled' if t.compile else ''}, lr {self.lr:.3g}; "
                f"perceptual: {self.loss.perceptual_description}")
            log.info("perceptual loss: %s", self.loss.perceptual_description)
        if not self.care.initialized and t.codebook.init_from_data and self.model.quantize.starts_from_data:
            self._initialize_codebook()
        self.care.initialized = True
        self.last_epoch_usage = float("nan")
        self.model.train()
        self.loss.train()

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['total']:.3f}", "rec": f"{logs['rec']:.3f}",
                # codes that won within the restart window (restarts keep codes alive: not held-out usage)
                "alive": f"{logs.get('usage_window', float('nan')):.2f}"}

    def finish(self) -> dict[str, Any]:
        try:
            final = self.evaluate()
            if self.rt.is_main:
                require_finite(self.model.state_dict(), "the final model")
                save_model(self.model, self.run_dir / "model")
        finally:
            self.tap.handle.remove()
        final.update(skipped_files=self.skipped_files + self.n_unreadable + len(self.eval_unreadable),
                     epoch_usage=self.last_epoch_usage,
                     perceptual=self.loss.perceptual_description)
        return final


def train_tokenizer(cfg: TokenizerTrainConfig, resume: Resume | bool = False, progress: bool = True) -> dict[str, Any]:
    rt = setup_runtime()
    try:
        return TokenizerTrainer(cfg, resume=resume, runtime=rt, progress=progress).fit()
    finally:
        cleanup_runtime(rt)
