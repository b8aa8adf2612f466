"""Stage 2: train the GPT prior on a token store (`vqgan tokenize`), never on images.

AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient clipping, label dropout for
classifier-free guidance, mixed precision on GPU, atomic resumable checkpoints, JSONL logs and periodic
sample grids (decoded with the store's tokenizer when it can be loaded).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from ..checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_directory,
    check_state_dict,
    fingerprint,
    save_model,
    save_tensors,
    write_yaml,
)
from ..config import PriorTrainConfig, TransformerTrainConfig
from ..data.tokens import UNUSABLE, TokenStore
from ..errors import UserError
from ..priors.gpt import GPT, GPTConfig
from ..priors.layout import layout_for_store
from ..priors.load import load_prior, recorded_tokenizer
from ..priors.sampling import sample_images_tokens
from ..priors.windows import LevelWindows
from .common import (
    ResumableSampler,
    Runtime,
    autocast,
    cleanup_runtime,
    compiled,
    fused_optimizer,
    resolve_precision,
    setup_runtime,
    to_floats,
)
from .guard import all_finite
from .loop import TrainingLoop
from .run import STATE_FILE, CheckpointParts, Resume, require_finite

log = logging.getLogger("vqgan.train")


def adamw(model: GPT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay on the Linear weight matrices only (not biases, LayerNorms, embeddings, positions)."""
    decay = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    decay_ids = {id(p) for p in decay}
    other = [p for p in model.parameters() if id(p) not in decay_ids]
    return fused_optimizer(torch.optim.AdamW, [{"params": decay, "weight_decay": weight_decay},
                                               {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, cfg: PriorTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class PriorTrainer(TrainingLoop):
    """One process, or many under torchrun (DistributedDataParallel; each rank reads its shard of the store;
    rank 0 logs, samples and writes checkpoints)."""

    name = "train-transformer"
    required_files = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE)

    def __init__(self, cfg: TransformerTrainConfig, resume: Resume | bool = False, progress: bool = True,
                 runtime: Runtime | None = None):
        resuming = self.start_run(cfg, resume, runtime, progress)
        self.store = TokenStore(cfg.data.tokens)
        self.grids, self.windows = self._windows(cfg.data.window)  # the grids a sequence covers
        self.n_tokens = self.store.spec.length_on(self.grids)
        init = self._init_prior(cfg.train.init_from) if cfg.train.init_from else None
        self.layout = init.layout if init else layout_for_store(self.store, cfg.data.conditioning, cfg.data.tokens)
        m = cfg.model
        self.gpt_config = init.gpt.config if init else GPTConfig(
            vocab_size=self.layout.vocab_size, block_size=self.layout.prefix_len + self.n_tokens - 1,
            n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout)
        self.model = GPT(self.gpt_config).to(self.rt.device)
        if init:
            self.model.load_state_dict(init.gpt.state_dict())
            log.info("initialised from %s", cfg.train.init_from)
        self.opt = adamw(self.model, cfg.train.learning_rate, cfg.train.weight_decay)
        self.dtype = resolve_precision(cfg.train.precision, self.rt.device)
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.dtype == torch.float16)
        usable = [r for r in range(len(self.store)) if self.store.labels[r] != UNUSABLE]
        if not usable:
            raise UserError(f"{cfg.data.tokens} has no usable rows")
        holdout = min(cfg.data.holdout, len(usable) // 5)
        self.train_rows = usable[:len(usable) - holdout]
        self.eval_rows = usable[len(usable) - holdout:] or self.train_rows[:16]
        self.sampler = ResumableSampler(len(self.train_rows), cfg.train.batch_size, self.rt.rank, self.rt.world_size,
                                        seed=cfg.train.seed)
        self.open_run(resuming)
        self.net = (DistributedDataParallel(self.model, device_ids=[self.rt.device.index]
                                            if self.rt.device.type == "cuda" else None)
                    if self.rt.distributed else self.model)
        if cfg.train.compile:  # the training forward only: evaluation and sampling keep the eager model
            self.net = compiled(self.net, self.rt.device)

    def _windows(self, side: int) -> tuple[list[tuple[int, int]], LevelWindows | None]:
        """data.window: (the window's grid at each level, the policy that crops rows to it), else the store's."""
        grids = [tuple(g) for g in self.store.grids]
        if not side:
            return grids, None
        (h0, w0) = grids[0]
        windows = [(side * h // h0, side * w // w0) for h, w in grids]
        if side > min(h0, w0) or any(side * h % h0 or side * w % w0 for h, w in grids):
            raise UserError(f"data.window={side} must be at most the first level's grid {h0}x{w0} and give whole "
                            f"windows at every level (grids {grids})")
        if self.store.condition and self.cfg.data.conditioning in ("auto", "spatial"):
            raise UserError("data.window: a prior conditioned on maps trains on whole rows; set data.window=0")
        return windows, LevelWindows(grids, windows, [level.depth for level in self.store.spec.levels])

    def _init_prior(self, path: str):
        """The prior to fine-tune; it must speak the store's tokens (same tokenizer, same conditioning)."""
        prior = load_prior(path)
        store, layout = self.store, prior.layout
        if fingerprint(prior.tokenizer) != store.meta["tokenizer"]["fingerprint"]:
            raise UserError(f"train.init_from {path}: its tokenizer is not the one that made {self.cfg.data.tokens}; "
                            f"tokenize the images with {path}'s tokenizer first")
        if layout.spatial and not store.condition:
            raise UserError(f"train.init_from {path} is conditioned on maps but {self.cfg.data.tokens} has none")
        if layout.spatial and layout.cond_len != store.cond_tokens.shape[1]:
            raise UserError(f"train.init_from {path}: condition rows of {layout.cond_len} tokens, the store has "
                            f"{store.cond_tokens.shape[1]} (grids {store.cond_grids})")
        if layout.codes is not None and layout.codes != store.spec:
            raise UserError(f"train.init_from {path} models codes {layout.codes.describe()}, the store holds "
                            f"{store.spec.describe()}")
        if layout.n_classes and len(store.class_names) > layout.n_classes:
            raise UserError(f"train.init_from {path} knows {layout.n_classes} classes, the store has "
                            f"{len(store.class_names)}")
        if layout.prefix_len + self.n_tokens - 1 > prior.gpt.config.block_size:
            raise UserError(f"train.init_from {path}: block_size {prior.gpt.config.block_size} is too short for "
                            f"{self.n_tokens} image tokens")
        return prior

    # -- checkpoints -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        kind = "spatial" if self.layout.spatial else "class" if self.layout.n_classes else "unconditional"
        meta = self.store.meta
        cond = {"kind": kind, **self.layout.to_dict(), "grid": list(self.grids[0]),
                "grids": [list(g) for g in self.grids],
                "class_names": self.store.class_names if self.layout.n_classes else [],
                "tokenizer": meta["tokenizer"]["path"], "tokenizer_fingerprint": meta["tokenizer"]["fingerprint"]}
        if self.layout.spatial:
            c = meta["condition"]
            cond.update(cond_kind=c["kind"], cond_grid=list(self.store.cond_grids[0]), cond_tokenizer=c["tokenizer"]["path"],
                        cond_tokenizer_fingerprint=c["tokenizer"]["fingerprint"])
        return {**self.model.config_dict(), "conditioning": cond}

    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(tensors={WEIGHTS_FILE: self.model.state_dict()},
                               yaml={CONFIG_FILE: self.config_dict(), "train_config.yaml": asdict(self.cfg)},
                               state={"opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()})

    def load_parts(self, path: Path, parts: CheckpointParts) -> None:
        saved = {k: v for k, v in parts.yaml[CONFIG_FILE].items() if k != "conditioning"}
        if saved != self.model.config_dict():
            raise UserError(f"{path}: the prior's model settings differ from the checkpoint's ({CONFIG_FILE}); resume "
                            "with the same model section")
        sd, state = parts.tensors[WEIGHTS_FILE], parts.state
        check_state_dict(self.model, sd, str(path / WEIGHTS_FILE))
        self.model.load_state_dict(sd)
        self.opt.load_state_dict(state["opt"])
        self.scaler.load_state_dict(state["scaler"])

    # -- steps -----------------------------------------------------------------------------------
    def _sequences(self, batch: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, prefix + L - 1) and targets (B, L): every image token after its condition (L: the store's
        row length; codes become token ids by their stream's offset, layout.py)."""
        tokens = self.layout.codes_to_tokens(batch["tokens"].to(self.rt.device), self.store.grids)  # (B, L)
        if self.windows is not None:  # a window of each row: random in training, the central one in evaluation
            n_i, n_j = self.windows.units
            units = (zip(torch.randint(n_i, (len(tokens),)).tolist(), torch.randint(n_j, (len(tokens),)).tolist())
                     if train else [(n_i // 2, n_j // 2)] * len(tokens))
            index = torch.stack([self.windows.crop(u) for u in units]).to(tokens.device)
            tokens = tokens.gather(1, index)  # (B, window length)
        labels = batch["label"].to(self.rt.device) if self.layout.n_classes else None
        if labels is not None and train and self.cfg.train.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        prefix = self.layout.condition_tokens(labels, tokens.shape[0], self.rt.device, batch.get("cond"))
        return torch.cat([prefix, tokens[:, :-1]], 1), tokens

    def loss(self, batch: dict, train: bool = True) -> torch.Tensor:
        inputs, targets = self._sequences(batch, train)
        with autocast(self.rt.device, self.dtype):
            logits = (self.net if train else self.model)(inputs)[:, self.layout.prefix_len - 1:]  # the positions that predict image tokens
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        loader = DataLoader(Subset(self.store, self.eval_rows), batch_size=self.cfg.train.batch_size)
        total, n = 0.0, 0
        for batch in loader:
            total += float(self.loss(batch, train=False)) * len(batch["label"])
            n += len(batch["label"])
        self.model.train()
        return total / max(n, 1)

    # -- the loop (train/loop.py) ----------------------------------------------------------------
    def begin(self) -> None:
        self.metrics.note(f"prior: {sum(p.numel() for p in self.model.parameters())} parameters, vocab "
                          f"{self.layout.vocab_size}, {self.layout.n_classes} classes, {len(self.train_rows)} "
                          f"training sequences of {self.n_tokens} tokens")
        self.model.train()

    def batches(self):
        """Endless batches of the training rows, positioned from `self.step`."""
        t = self.cfg.train
        epoch, offset = divmod(self.step, self.sampler.batches_per_epoch)
        while True:
            self.sampler.set_position(epoch, offset)
            yield from DataLoader(Subset(self.store, self.train_rows), batch_size=t.batch_size, sampler=self.sampler,
                                  drop_last=True, generator=torch.Generator().manual_seed(t.seed + epoch))
            epoch, offset = epoch + 1, 0

    def train_step(self, batch: dict) -> dict[str, float]:
        t = self.cfg.train
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, t)
        loss = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        # with fp16 the scaler skips overflowing steps itself; otherwise a non-finite step is skipped here
        finite = all_finite([loss.detach()] + ([] if self.scaler.is_enabled() else [grad_norm]))
        if self.guard.after_step(self.step, finite):
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.nonfinite_steps += 1
            self.opt.zero_grad(set_to_none=True)
        self.tokens_per_step = batch["tokens"].numel() * self.rt.world_size
        return to_floats({"loss": loss, "grad_norm": grad_norm, "lr": self.opt.param_groups[0]["lr"]})

    def rates(self, steps_per_s: float) -> dict[str, float]:
        return {"tokens_per_s": steps_per_s * self.tokens_per_step}

    def periodic_evaluation(self) -> None:
        if self.rt.is_main:
            self.metrics.write(self.step, {"nll": self.evaluate()}, kind="eval")
            self.write_samples()

    def finish(self) -> dict[str, Any]:
        final_nll, samples = float("nan"), None
        if self.rt.is_main:
            final_nll = self.evaluate()
            self.metrics.write(self.step, {"nll": final_nll}, kind="eval")
            samples = self.write_samples()
            self.save_final()
        return {"nll": final_nll, "out": str(self.run_dir), "samples": samples}

    def save_final(self) -> Path:
        """`model/`: the prior, and copies of its tokenizers (when they still match the store's tokens), so
        the directory samples on its own."""
        target = self.run_dir / "model"
        require_finite(self.model.state_dict(), "the final prior")
        tokenizer, cond_tokenizer = self.tokenizers()
        with atomic_directory(target) as tmp:
            save_tensors(self.model.state_dict(), tmp / WEIGHTS_FILE)
            write_yaml(self.config_dict(), tmp / CONFIG_FILE)
            for sub, model in (("tokenizer", tokenizer), ("cond_tokenizer", cond_tokenizer)):
                if model is not None:
                    save_model(model, tmp / sub)
        return target

    def tokenizers(self):
        """(tokenizer, condition tokenizer) recorded by the store, each None when missing or changed since."""
        if not hasattr(self, "_tokenizers"):
            cond = self.store.condition
            found = (recorded_tokenizer(self.store.meta["tokenizer"]),
                     recorded_tokenizer(cond["tokenizer"] if cond else None))
            # they load on the CPU; the samples they decode come from the prior's device
            self._tokenizers = tuple(t if t is None else t.to(self.rt.device) for t in found)
        return self._tokenizers

    def sample(self, batch: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
               **kwargs) -> torch.Tensor:
        """Sampled codes as the tokenizer takes them: (B, h, w, depth), or one such tensor per level."""
        self.model.eval()
        tokens = sample_images_tokens(self.model, self.layout, self.n_tokens, batch, labels, cond,
                                      grids=self.grids, **kwargs)
        self.model.train()
        levels = self.store.spec.unflatten(tokens, self.grids)
        return levels[0] if len(levels) == 1 else levels

    @torch.no_grad()
    def write_samples(self, per_row: int = 8) -> str | None:
        """images/step_N.png: samples per class; for a spatial prior, held-out condition maps, samples
        on them, and the real images; unconditional: two rows. Needs the tokenizer."""
        tokenizer, cond_tokenizer = self.tokenizers()
        if tokenizer is None:
            return None
        from ..data.maps import to_display
        from ..eval.report import image_grid

        g = torch.Generator(device=self.rt.device).manual_seed(self.cfg.train.seed)
        rows = []
        if self.layout.spatial:
            items = [self.store[r] for r in self.eval_rows[:per_row]]
            cond = torch.stack([it["cond"] for it in items]).to(self.rt.device)
            if cond_tokenizer is not None:
                rows.append(to_display(cond_tokenizer.decode(self.store.cond_rows_to_codes(cond)),
                                       cond_tokenizer.config.input_kind))
            rows.append(tokenizer.decode(self.sample(len(items), cond=cond, generator=g)))
            real = torch.stack([it["tokens"] for it in items]).to(self.rt.device)
            rows.append(tokenizer.decode(self.store.rows_to_codes(real)))
        elif self.layout.n_classes:
            for c in range(min(self.layout.n_classes, 8)):
                labels = torch.full((per_row,), c, device=self.rt.device)
                rows.append(tokenizer.decode(self.sample(per_row, labels, generator=g)))
        else:
            rows += list(tokenizer.decode(self.sample(2 * per_row, generator=g)).split(per_row))
        out = self.run_dir / "images" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid([r.cpu() for r in rows], scale=2).save(out)
        return str(out)


def train_prior(cfg: TransformerTrainConfig, resume: Resume | bool = False, progress: bool = True) -> dict[str, Any]:
    rt = setup_runtime()
    try:
        return PriorTrainer(cfg, resume=resume, progress=progress, runtime=rt).fit()
    finally:
        cleanup_runtime(rt)
