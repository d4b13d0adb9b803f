from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_world_config

from biasprune.classifier import UNKNOWN
from biasprune.sampling import sample_ddim
from biasprune.worlds import toyfaces
from biasprune.worlds.toyfaces import GROUPS, ToyFacesConfig, classifier_accuracy, render_dataset


def test_render_dataset_deterministic():
    config = ToyFacesConfig(num_images=200)
    first, labels_first = render_dataset(config)
    second, labels_second = render_dataset(config)
    other, _ = render_dataset(config, seed=5)
    assert torch.equal(first, second)
    for attribute in GROUPS:
        assert np.array_equal(labels_first[attribute], labels_second[attribute])
    assert not torch.equal(first, other)


def test_render_dataset_shape_and_range():
    images, labels = render_dataset(ToyFacesConfig(num_images=10, resolution=24))
    assert images.shape == (10, 3, 24, 24)
    assert images.dtype == torch.uint8
    assert set(labels) == set(GROUPS)


def test_render_dataset_frequencies_follow_config():
    config = ToyFacesConfig(num_images=20000)
    _, labels = render_dataset(config)
    for attribute, expected in config.frequencies.items():
        shares = np.bincount(labels[attribute], minlength=len(expected)) / config.num_images
        np.testing.assert_allclose(shares, np.array(expected) / sum(expected), atol=0.015)


def test_render_skin_tone_follows_race():
    # The face centre is skin; its mean colour must order the tones as configured (black darkest).
    images, labels = render_dataset(ToyFacesConfig(num_images=2000))
    centre = images[:, :, 8, 6:10].float().mean(dim=(1, 2))
    means = [centre[labels["race"] == g].mean().item() for g in range(4)]
    assert means[GROUPS["race"].index("black")] == min(means)
    assert means[GROUPS["race"].index("white")] > means[GROUPS["race"].index("indian")] + 40


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"resolution": 10}, "resolution"),
        ({"frequencies": {"gender": [1.0], "race": [1, 1, 1, 1], "age": [1, 1, 1]}}, "gender"),
        ({"frequencies": {"gender": [1, 1], "race": [1, -1, 1, 1], "age": [1, 1, 1]}}, "race"),
        ({"classifier_threshold": 1.5}, "classifier_threshold"),
        ({"num_images": 10}, "num_images"),
    ],
)
def test_toyfaces_config_invalid(overrides, message):
    with pytest.raises(ValueError, match=message):
        toyfaces.validate_config(ToyFacesConfig(**overrides))


def test_tiny_world_builds_once_then_loads(tmp_path, monkeypatch):
    config = tiny_world_config()
    world = toyfaces.load_world(config, tmp_path)
    assert world.unet.config.sample_size == 8
    assert world.images.shape == (256, 3, 8, 8)
    assert world.groups == GROUPS
    info = json.loads(next((tmp_path / "worlds").glob("toyfaces-*/world.json")).read_text())
    assert info["images_sha256"] == world.content_hashes["images_sha256"]

    def fail(*args, **kwargs):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(toyfaces, "build_world", fail)
    again = toyfaces.load_world(config, tmp_path)
    for name, value in world.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[name], value)


def test_tiny_world_key_changes_with_config():
    assert toyfaces.world_key(tiny_world_config()) != toyfaces.world_key(tiny_world_config(ddpm_steps=21))


def test_classifier_abstains_below_threshold(tmp_path):
    world = toyfaces.load_world(tiny_world_config(), tmp_path)
    noise = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    world.classifier.threshold = 0.999999
    predictions = world.classifier.predict(noise)
    assert (predictions.labels["race"] == UNKNOWN).mean() > 0.5
    assert np.all(predictions.confidence["race"][predictions.labels["race"] == UNKNOWN] < 0.999999)


@pytest.mark.slow
def test_default_world_meets_quality_bar():
    """The default world's classifier and dense DDPM are good enough to measure bias with."""
    config = ToyFacesConfig()
    world = toyfaces.load_world(config)

    holdout, holdout_labels = render_dataset(config, seed=config.data_seed + 1, num_images=config.holdout_images)
    accuracy = classifier_accuracy(world.classifier, holdout, holdout_labels)
    for attribute in GROUPS:
        assert accuracy[attribute] >= 0.95, (attribute, accuracy)

    samples = sample_ddim(world.unet, world.scheduler_config, 1000, num_inference_steps=50, batch_size=500, seed=0)
    predictions = world.classifier.predict(samples.images)
    unknown = np.zeros(1000, dtype=bool)
    for attribute, frequencies in config.frequencies.items():
        labels = predictions.labels[attribute]
        unknown |= labels == UNKNOWN
        known = labels[labels != UNKNOWN]
        shares = np.bincount(known, minlength=len(frequencies)) / len(known)
        expected = np.bincount(world.labels[attribute], minlength=len(frequencies)) / len(world.images)
        assert np.abs(shares - expected).max() <= 0.05, (attribute, shares, expected)
    assert unknown.mean() <= 0.10


def _generated_shares(world, num_samples: int = 1000) -> dict[str, np.ndarray]:
    samples = sample_ddim(world.unet, world.scheduler_config, num_samples, num_inference_steps=50, batch_size=500, seed=0)
    predictions = world.classifier.predict(samples.images)
    shares = {}
    for attribute, groups in world.groups.items():
        known = predictions.labels[attribute][predictions.labels[attribute] != UNKNOWN]
        shares[attribute] = np.bincount(known, minlength=len(groups)) / len(known)
    return shares


@pytest.mark.slow
def test_shipped_world_matches_rebuild(tmp_path):
    """Rebuilding the default world from its config reproduces the shipped one."""
    shipped = toyfaces.load_world(ToyFacesConfig())
    assert toyfaces.shipped_world_key() == toyfaces.world_key(ToyFacesConfig())

    directory = toyfaces.rebuild_shipped_world(tmp_path / "rebuilt")
    shipped_info = json.loads((toyfaces.SHIPPED_WORLD_DIR / "world.json").read_text())
    rebuilt_info = json.loads((directory / "world.json").read_text())
    assert rebuilt_info["world_key"] == shipped_info["world_key"]
    assert rebuilt_info["images_sha256"] == shipped_info["images_sha256"]  # rendering is exact
    for attribute, accuracy in shipped_info["classifier_holdout_accuracy"].items():
        assert rebuilt_info["classifier_holdout_accuracy"][attribute] == pytest.approx(accuracy, abs=0.01)

    rebuilt = toyfaces._load_built(ToyFacesConfig(), directory, rebuilt_info["world_key"])
    shipped_shares, rebuilt_shares = _generated_shares(shipped), _generated_shares(rebuilt)
    for attribute in GROUPS:
        np.testing.assert_allclose(rebuilt_shares[attribute], shipped_shares[attribute], atol=0.04)
