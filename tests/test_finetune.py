from __future__ import annotations

import pytest
import torch
from conftest import build_unet_8px
from diffusers import DDPMScheduler, UNet2DModel

from biasprune.finetune import Finetuner, FinetuneSettings, validate_milestones

SCHEDULER = dict(DDPMScheduler(num_train_timesteps=100).config)


def _images(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _state(unet: UNet2DModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_finetuner_milestones_in_order(tmp_path):
    seen = []
    trainer = Finetuner(build_unet_8px(), SCHEDULER, _images(), FinetuneSettings(batch_size=4), tmp_path)
    trainer.run([3, 0, 1], on_milestone=lambda step, ema: seen.append(step))
    assert seen == [0, 1, 3]
    assert trainer.step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0", "step_1", "step_3"]


def test_finetuner_changes_weights_and_ema_lags():
    unet = build_unet_8px()
    before = _state(unet)
    trainer = Finetuner(unet, SCHEDULER, _images(), FinetuneSettings(batch_size=4, ema_decay=0.9))
    trainer.run([5])
    after, ema = _state(trainer.unet), _state(trainer.ema)
    name = "conv_in.weight"
    assert not torch.equal(before[name], after[name])
    # The EMA lies between the start and the trained weights, nearer neither end exactly.
    assert not torch.equal(ema[name], after[name])
    assert not torch.equal(ema[name], before[name])


def test_finetuner_resume_matches_uninterrupted(tmp_path):
    settings = FinetuneSettings(batch_size=4, seed=3)
    straight = Finetuner(build_unet_8px(), SCHEDULER, _images(), settings)
    straight.run([6])

    first = Finetuner(build_unet_8px(), SCHEDULER, _images(), settings, tmp_path)
    first.run([3])
    resumed = Finetuner(build_unet_8px(), SCHEDULER, _images(), settings, tmp_path)
    resumed.run([3, 6])

    assert resumed.step == 6
    for name, value in _state(straight.ema).items():
        torch.testing.assert_close(_state(resumed.ema)[name], value, rtol=1e-5, atol=1e-6)


def test_finetuner_reuses_cached_milestone(tmp_path):
    settings = FinetuneSettings(batch_size=4)
    Finetuner(build_unet_8px(), SCHEDULER, _images(), settings, tmp_path).run([2])
    again = Finetuner(build_unet_8px(), SCHEDULER, _images(), settings, tmp_path)
    calls = []
    again.train_step = lambda: calls.append(1) or 0.0  # type: ignore[method-assign]
    again.run([2])
    assert calls == []
    assert again.step == 2


def test_finetuner_nonfinite_loss_names_step():
    images = _images()
    images[:] = float("nan")
    trainer = Finetuner(build_unet_8px(), SCHEDULER, images, FinetuneSettings(batch_size=4))
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.run([3])


@pytest.mark.parametrize("milestones", [[], [-1], [1.5]])
def test_validate_milestones_invalid(milestones):
    with pytest.raises(ValueError, match="finetune_steps"):
        validate_milestones(milestones)


def test_validate_milestones_sorts_and_dedups():
    assert validate_milestones([5, 0, 5, 2]) == [0, 2, 5]
