from __future__ import annotations

import pytest
import torch
from conftest import build_unet_8px
from diffusers import DDPMScheduler

from biasprune.sampling import sample_ddim


SCHEDULER = dict(DDPMScheduler(num_train_timesteps=100).config)


def test_sample_ddim_shape_and_dtype():
    result = sample_ddim(build_unet_8px(), SCHEDULER, 5, num_inference_steps=3, batch_size=2)
    assert result.images.shape == (5, 3, 8, 8)
    assert result.images.dtype == torch.uint8
    assert result.images_per_s > 0


def test_sample_ddim_same_seed_same_images():
    unet = build_unet_8px()
    first = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, seed=7).images
    second = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, seed=7).images
    other = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, seed=8).images
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_sample_ddim_eta0_independent_of_batch_size():
    unet = build_unet_8px()
    whole = sample_ddim(unet, SCHEDULER, 6, num_inference_steps=3, batch_size=6).images
    split = sample_ddim(unet, SCHEDULER, 6, num_inference_steps=3, batch_size=4).images
    assert (whole.int() - split.int()).abs().max() <= 1  # float batching noise only


def test_sample_ddim_eta1_reproducible():
    unet = build_unet_8px()
    first = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, eta=1.0, seed=3).images
    second = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, eta=1.0, seed=3).images
    deterministic = sample_ddim(unet, SCHEDULER, 4, num_inference_steps=3, eta=0.0, seed=3).images
    assert torch.equal(first, second)
    assert not torch.equal(first, deterministic)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "sampler_steps"),
        ({"eta": 1.5}, "eta"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_sample_ddim_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_ddim(build_unet_8px(), SCHEDULER, 2, **kwargs)


def test_sample_ddim_invalid_num_samples():
    with pytest.raises(ValueError, match="num_samples"):
        sample_ddim(build_unet_8px(), SCHEDULER, 0)
