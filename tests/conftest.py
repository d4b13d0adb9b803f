"""Shared test helpers: tiny configs, models with random weights and an isolated cache."""

from __future__ import annotations

import face_photos
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from biasprune.config import TrialConfig
from biasprune.worlds.toyfaces import ToyFacesConfig

torch.set_num_threads(2)


def tiny_world_config(**overrides) -> ToyFacesConfig:
    """A toyfaces world small enough to build in seconds: 256 images at 8x8."""
    settings = dict(
        resolution=8,
        num_images=256,
        block_out_channels=[16, 16, 32],
        attention_head_dim=8,
        norm_num_groups=4,
        num_train_timesteps=100,
        ddpm_steps=20,
        ddpm_batch_size=32,
        classifier_steps=150,
        classifier_threshold=0.5,
        holdout_images=64,
    )
    settings.update(overrides)
    return ToyFacesConfig(**settings)


def tiny_trial_config(cache_dir, **overrides) -> TrialConfig:
    """A trial on the tiny world that runs end to end in seconds."""
    config = TrialConfig(cache_dir=str(cache_dir), device="cpu")
    config.world.toyfaces = tiny_world_config()
    config.finetune_steps = [0, 4]
    config.finetune.batch_size = 8
    config.prune.calibration_images = 16
    config.prune.calibration_batch_size = 8
    config.sampling.num_samples = 32
    config.sampling.sampler_steps = 4
    config.sampling.batch_size = 16
    config.measure.bootstrap_samples = 50
    config.measure.fid = "off"
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_unet(seed: int = 0) -> UNet2DModel:
    """A 16x16 UNet with attention at the middle level; about 0.28 M parameters."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def build_unet_8px(seed: int = 0) -> UNet2DModel:
    """An 8x8 UNet with two levels and attention, for sampling and fine-tuning tests."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return build_tiny_unet()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache directory shared by the tests of one session, so the tiny world builds once."""
    return tmp_path_factory.mktemp("biasprune-cache")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo (512×512 RGB, a woman's face)."""
    return face_photos.astronaut()


@pytest.fixture(scope="module")
def face_crop() -> np.ndarray:
    return face_photos.face_crop()


@pytest.fixture(scope="module")
def face64() -> np.ndarray:
    return face_photos.face64()
