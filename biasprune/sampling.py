"""Seeded, batched DDIM sampling (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.configuration_utils import FrozenDict

from biasprune.data import from_model_range

logger = logging.getLogger(__name__)


@dataclass
class SamplingResult:
    """Generated images (uint8, shape (N, 3, H, W)) and the throughput they were made at."""

    images: torch.Tensor
    images_per_s: float
    num_inference_steps: int
    eta: float
    seed: int


def validate_sampling_args(num_samples: int, num_inference_steps: int, eta: float, batch_size: int) -> None:
    """Raise ValueError for a sampling setting that cannot run."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if num_inference_steps < 1:
        raise ValueError(f"sampler_steps must be at least 1, got {num_inference_steps}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
    if batch_size < 1:
        raise ValueError(f"sample batch_size must be at least 1, got {batch_size}")


@torch.no_grad()
def sample_ddim(
    unet: UNet2DModel,
    scheduler_config: FrozenDict | dict,
    num_samples: int,
    *,
    num_inference_steps: int = 100,
    eta: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> SamplingResult:
    """Generate images with DDIM.

    The timesteps are a uniform skip over the training schedule (diffusers'
    `timestep_spacing="leading"`, the spacing of the DDIM paper). The initial noise of
    all `num_samples` images is drawn in order from one generator seeded with `seed`, so
    image i is the same whatever the batch size when `eta` is 0. With `eta > 0` the
    per-step noise comes from a generator seeded by `seed` and the batch index, so the
    output is reproducible for a fixed seed and batch size.

    Args:
        unet: The noise-prediction model; put into eval mode.
        scheduler_config: Config of the training scheduler (DDPM); its betas are reused.
        num_samples: Number of images to generate.
        num_inference_steps: DDIM steps. Default 100.
        eta: DDIM stochasticity; 0 is deterministic. Default 0.
        batch_size: Images per forward pass. Default 256.
        seed: Seed of the initial noise. Default 0.
        device: Device to sample on.
        autocast_dtype: Mixed-precision dtype (for example `torch.bfloat16` on a GPU), or None.

    Returns:
        The images as uint8 (N, 3, H, W) and the measured images per second.
    """
    validate_sampling_args(num_samples, num_inference_steps, eta, batch_size)
    config = dict(scheduler_config)
    config["timestep_spacing"] = "leading"
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    unet = unet.to(device).eval()

    size = unet.config.sample_size
    shape = (num_samples, unet.config.in_channels, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    batches = []
    started = time.perf_counter()
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        x = noise[start : start + batch_size].to(device)
        step_generator = torch.Generator(device=device).manual_seed(seed * 100_003 + batch_index)
        for t in scheduler.timesteps:
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                eps = unet(x, t).sample
            x = scheduler.step(eps.float(), t, x, eta=eta, generator=step_generator).prev_sample
        batches.append(from_model_range(x).cpu())
        logger.debug("sampled %d/%d images", min(start + batch_size, num_samples), num_samples)
    elapsed = time.perf_counter() - started

    images = torch.cat(batches)
    return SamplingResult(images, num_samples / max(elapsed, 1e-9), num_inference_steps, eta, seed)

