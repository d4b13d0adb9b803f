"""Fine-tuning with the DDPM noise-prediction loss (Ho et al., "Denoising Diffusion Probabilistic Models", 2020).

Checkpoints are written at requested step milestones and a run resumes from any of them.
Every random draw of step k (batch indices, noise, timesteps) comes from a generator seeded
by (seed, k), so a run resumed from a checkpoint follows the same trajectory as one that
never stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import FrozenDict

from biasprune import pruning
from biasprune.data import to_model_range

logger = logging.getLogger(__name__)

_MODEL_DIR = "model"
_EMA_DIR = "ema"
_STATE_FILE = "trainer_state.pt"
_INFO_FILE = "checkpoint.json"


@dataclass
class FinetuneSettings:
    """Optimizer and data settings of a fine-tuning run.

    Attributes:
        batch_size: Images per step. Default 64.
        learning_rate: AdamW learning rate. Default 1e-4.
        weight_decay: AdamW weight decay. Default 0.
        ema_decay: Maximum EMA decay; the decay warms up as min(ema_decay, (1 + k) / (10 + k)). Default 0.9999.
        grad_clip: Maximum global gradient norm. Default 1.0.
        seed: Seed of batches, noise and timesteps. Default 0.
        log_every: Steps between INFO progress lines. Default 100.
        cosine_decay_steps: If positive, the learning rate follows a cosine from its value
            at step 0 to 0 at this step (Loshchilov and Hutter, SGDR, 2017); 0 keeps it constant.
    """

    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    cosine_decay_steps: int = 0


def validate_milestones(milestones: list[int]) -> list[int]:
    """Return the milestones sorted and de-duplicated; raise ValueError for a negative one."""
    if not milestones:
        raise ValueError("finetune_steps is empty; give at least one step milestone, for example [0, 500]")
    bad = [m for m in milestones if int(m) != m or m < 0]
    if bad:
        raise ValueError(f"finetune_steps must be non-negative integers, got {bad}")
    return sorted({int(m) for m in milestones})


def ddpm_loss(unet: UNet2DModel, alphas_cumprod: torch.Tensor, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return the noise-prediction loss ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖² at uniform random timesteps."""
    num_timesteps = alphas_cumprod.shape[0]
    t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = x0.to(noise.device)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    device = next(unet.parameters()).device
    prediction = unet(noisy.to(device), t.to(device)).sample
    return F.mse_loss(prediction.float(), noise.to(device))


class Finetuner:
    """Trains a UNet with AdamW, EMA and gradient clipping, checkpointing at milestones.

    Args:
        unet: The model to train; it is trained in place and its EMA copy is what the
            milestones hand out.
        scheduler_config: Config of the DDPM training scheduler (gives ᾱ_t).
        images: Training images, shape (N, C, H, W): uint8, converted to [-1, 1] one batch at a
            time (so a large dataset is not held in float), or float already in [-1, 1].
        settings: Optimizer and data settings.
        checkpoint_dir: Where milestone checkpoints go (`step_<k>/`), or None for none.
        device: Device to train on.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: FrozenDict | dict,
        images: torch.Tensor,
        settings: FinetuneSettings,
        checkpoint_dir: Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from diffusers import DDPMScheduler

        self.unet = unet.to(device).train()
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False)
        self.alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.float()
        self.images = images
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = device
        self.optimizer = torch.optim.AdamW(
            unet.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / f"step_{step}"

    def latest_checkpoint(self, at_most: int) -> int | None:
        """Return the largest checkpointed step not above `at_most`, or None."""
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return None
        steps = [
            int(p.name.removeprefix("step_"))
            for p in self.checkpoint_dir.glob("step_*")
            if p.name.removeprefix("step_").isdigit() and (p / _INFO_FILE).is_file()
        ]
        steps = [s for s in steps if s <= at_most]
        return max(steps) if steps else None

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_path(self.step)
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        pruning.save_pruned(self.unet, tmp / _MODEL_DIR)
        pruning.save_pruned(self.ema, tmp / _EMA_DIR)
        torch.save({"optimizer": self.optimizer.state_dict()}, tmp / _STATE_FILE)
        (tmp / _INFO_FILE).write_text(json.dumps({"step": self.step, "settings": asdict(self.settings)}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        logger.debug("wrote checkpoint %s", path)
        return path

    def load_checkpoint(self, step: int) -> None:
        """Restore model, EMA and optimizer state from the checkpoint at `step`."""
        path = self.checkpoint_path(step)
        model = pruning.load_pruned(path / _MODEL_DIR)
        ema = pruning.load_pruned(path / _EMA_DIR)
        self.unet.load_state_dict(model.state_dict())
        self.ema.load_state_dict(ema.state_dict())
        state = torch.load(path / _STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = step
        logger.info("resumed fine-tuning from %s", path)

    # -- training ----------------------------------------------------------------------

    def train_step(self) -> float:
        """Run one optimizer step and the EMA update; return the loss."""
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
        index = torch.randint(0, self.images.shape[0], (s.batch_size,), generator=generator)
        batch = self.images[index]
        if batch.dtype == torch.uint8:
            batch = to_model_range(batch)
        loss = ddpm_loss(self.unet, self.alphas_cumprod, batch, generator)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"non-finite fine-tuning loss {loss.item()} at step {self.step + 1}; lower the learning rate "
                f"(now {s.learning_rate}) or the gradient clip (now {s.grad_clip})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.cosine_decay_steps > 0:
            progress = min(self.step, s.cosine_decay_steps) / s.cosine_decay_steps
            for group in self.optimizer.param_groups:
                group["lr"] = s.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), s.grad_clip)
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        return loss.item()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.settings.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)

    def run(
        self,
        milestones: list[int],
        on_milestone: Callable[[int, UNet2DModel], None] | None = None,
        resume: bool = True,
    ) -> None:
        """Train to each milestone in turn, checkpointing and calling `on_milestone(step, ema)`.

        With `resume`, training starts from the latest checkpoint at or below the first
        milestone still to reach, and milestones already checkpointed are handed out from disk.
        """
        milestones = validate_milestones(milestones)
        started, first_step = time.perf_counter(), self.step
        for milestone in milestones:
            if resume and self.step < milestone:
                cached = self.latest_checkpoint(milestone)
                if cached is not None and cached > self.step:
                    self.load_checkpoint(cached)
            if self.step > milestone:
                raise ValueError(f"model is already at step {self.step}, past milestone {milestone}")
            while self.step < milestone:
                loss = self.train_step()
                if self.step % self.settings.log_every == 0 or self.step == milestone:
                    rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
                    logger.info("fine-tune step %d/%d loss %.4f (%.1f steps/s)", self.step, milestones[-1], loss, rate)
            if self.checkpoint_dir is not None and self.latest_checkpoint(milestone) != milestone:
                self.save_checkpoint()
            if on_milestone is not None:
                on_milestone(milestone, self.ema)
