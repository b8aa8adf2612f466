"""The optimisation loop: latents -> snapped codes -> decoder -> cutouts -> CLIP -> loss -> Adam.

One `Optimiser` holds the latents of one image and runs steps on them; the run (run.py) decides the prompts in
force at each step (story) and where each video frame starts (zoom/pan).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .clip_models import ClipModel
from .cutouts import MakeCutouts
from .latents import Steerable
from .losses import ClampWithGrad, prompt_loss, similarity
from .prompts import Prompt, prompt_labels


@dataclass
class OptimiseConfig:
    """The loop's settings (the CLI's options)."""

    steps: int = 300
    lr: float = 0.1  # Adam on the latents, as the notebook
    lr_end: float = 0.1  # the learning rate decays to lr * lr_end by half a cosine (1: constant)
    cutn: int = 16
    cut_pow: float = 1.0
    augment: bool = True
    noise: float = 0.1  # largest std of the noise added to each cutout
    init_weight: float = 0.0  # pull toward the init latents: init_weight * (1 - t) * mse(z, z_init), t = step/steps

    def lr_at(self, step: int, steps: int) -> float:
        t = min(1.0, step / max(1, steps - 1))
        return self.lr * (self.lr_end + (1 - self.lr_end) * 0.5 * (1 + math.cos(math.pi * t)))


class Targets:
    """Each prompt's target embedding for each CLIP of the ensemble: {prompt: [(D,) per model]}, and its label
    in the logs (distinct between prompts)."""

    def __init__(self, clips: list[ClipModel], prompts: list[Prompt], load_image: Callable[[Prompt, int], torch.Tensor]):
        self.labels = prompt_labels(prompts)
        self.by_prompt: dict[Prompt, list[torch.Tensor]] = {}
        for p in prompts:
            if p.image is None:
                self.by_prompt[p] = [c.encode_text([p.text])[0] for c in clips]
            else:
                with torch.no_grad():
                    self.by_prompt[p] = [c.encode_image(load_image(p, c.input_size).to(c.device))[0] for c in clips]


class Optimiser:
    """The latents of one image and their Adam state; `step` runs one optimisation step."""

    def __init__(self, steer: Steerable, clips: list[ClipModel], targets: Targets, config: OptimiseConfig,
                 latents: list[torch.Tensor], init: list[torch.Tensor] | None, generator: torch.Generator):
        self.steer, self.clips, self.targets, self.config = steer, clips, targets, config
        self.latents = [z.detach().clone().requires_grad_(True) for z in latents]
        self.init = [z.detach().clone() for z in init] if init is not None else None
        self.optimizer = torch.optim.Adam(self.latents, lr=config.lr)
        self.cutouts = {c.input_size: MakeCutouts(c.input_size, config.cutn, config.cut_pow, config.noise,
                                                  config.augment, generator) for c in clips}

    def image(self) -> torch.Tensor:
        """The current image (1, 3, H, W) in [0, 1], differentiable in the latents."""
        out = self.steer.decode(self.steer.snap(self.latents))
        return ClampWithGrad.apply(out.float().add(1).div(2), 0.0, 1.0)

    def losses(self, image: torch.Tensor, prompts: tuple[Prompt, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss of `image` against `prompts`, and each prompt's mean cosine similarity (over models)."""
        total = image.new_zeros(())
        labels = self.targets.labels
        sims: dict[str, list[float]] = {labels[p]: [] for p in prompts}
        views = {size: cut(image) for size, cut in self.cutouts.items()}
        for i, clip in enumerate(self.clips):
            embeddings = clip.encode_image(views[clip.input_size])
            for p in prompts:
                target = self.targets.by_prompt[p][i]
                total = total + prompt_loss(embeddings, target, p)
                sims[labels[p]].append(similarity(embeddings, target))
        return total, {k: sum(v) / len(v) for k, v in sims.items()}

    def step(self, step: int, steps: int, prompts: tuple[Prompt, ...]) -> dict[str, float]:
        """One Adam step at `step` of `steps`; returns the log row (loss, similarity per prompt, lr)."""
        lr = self.config.lr_at(step, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, sims = self.losses(self.image(), prompts)
        clip_loss = loss.item()
        if self.init is not None and self.config.init_weight:
            pull = self.config.init_weight * (1 - step / max(1, steps))
            loss = loss + pull * sum(F.mse_loss(z, z0) for z, z0 in zip(self.latents, self.init))
        loss.backward()
        self.optimizer.step()
        self.steer.clamp_(self.latents)
        return {"step": step, "loss": loss.item(), "clip_loss": clip_loss, "lr": lr,
                "similarity": {k: round(v, 5) for k, v in sims.items()}}

    @torch.no_grad()
    def current(self) -> torch.Tensor:
        """The image as it stands, (1, 3, H, W) in [-1, 1], detached."""
        return self.steer.decode(self.steer.snap(self.latents)).float().clamp(-1, 1)
