from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_trial_config

from biasprune import finetune, trial
from biasprune.config import to_trial_config


def test_run_trial_tiny_world_end_to_end(tiny_cache, tmp_path):
    config = tiny_trial_config(tiny_cache, pruner="l1", pruning_ratio=0.5, output_dir=str(tmp_path))
    seen = []
    rows = trial.run_trial(config, on_result=seen.append)

    assert [row["finetune_steps"] for row in rows] == [0, 4]
    assert seen == rows
    first = rows[0]
    assert first["pruner"] == "l1"
    assert first["pruning_ratio"] == 0.5
    assert first["quality_metric"] == "fd_toyfaces"
    assert first["num_samples"] == 32
    assert first["sampler_steps"] == 4
    assert first["fd_toyfaces_num_samples"] == 32
    assert "fid" not in first  # FID is never reported under that name for another extractor
    assert first["params"] > 0
    assert first["macs"] > 0
    assert first["model_size_mb"] > 0
    assert first["images_per_s"] > 0
    assert 0.0 <= first["fairness_divergence"] <= 1.0
    assert first["fairness_divergence_ci_low"] <= first["fairness_divergence_ci_high"]
    for reference in ("data_predicted", "data_labels", "dense", "uniform"):
        assert f"fairness_divergence_vs_{reference}" in first
    assert first["fairness_divergence"] == first["fairness_divergence_vs_data_predicted"]
    for name in ("ratio_gender", "ratio_race", "ratio_age", "unknown_rate", "share_race_white"):
        assert name in first
    # Pruning and fine-tuning leave the architecture alone between milestones.
    assert rows[1]["params"] == first["params"]
    assert (tmp_path / "l1-r0.5-s4" / "evaluation_key.txt").read_text().strip() == rows[1]["evaluation_key"]


def test_run_trial_pruned_smaller_than_dense(tiny_cache):
    dense = trial.run_trial(tiny_trial_config(tiny_cache, pruner="dense"))
    pruned = trial.run_trial(tiny_trial_config(tiny_cache, pruner="random", pruning_ratio=0.5))
    assert len(dense) == 1
    assert dense[0]["finetune_steps"] == 0
    assert dense[0]["fairness_divergence_vs_dense"] == pytest.approx(0.0, abs=1e-12)
    assert pruned[0]["params"] < 0.5 * dense[0]["params"]
    assert pruned[0]["macs"] < 0.5 * dense[0]["macs"]


def test_run_trial_second_run_recomputes_nothing(tiny_cache, monkeypatch):
    config = tiny_trial_config(tiny_cache, pruner="l1", pruning_ratio=0.25)
    first = trial.run_trial(config)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached product")

    monkeypatch.setattr(trial, "sample_ddim", fail)
    monkeypatch.setattr(trial.pruning, "prune_unet", fail)
    monkeypatch.setattr(finetune.Finetuner, "train_step", fail)
    second = trial.run_trial(config)
    assert [row["evaluation_key"] for row in second] == [row["evaluation_key"] for row in first]
    for a, b in zip(first, second):
        for key, value in a.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(b[key])
            else:
                assert b[key] == value, key


def test_run_trial_more_steps_continue_from_checkpoint(tiny_cache, monkeypatch):
    trial.run_trial(tiny_trial_config(tiny_cache, pruner="l1", pruning_ratio=0.75, finetune_steps=[0, 4]))
    steps = []
    original = finetune.Finetuner.train_step

    def counting(self):
        steps.append(self.step)
        return original(self)

    monkeypatch.setattr(finetune.Finetuner, "train_step", counting)
    rows = trial.run_trial(tiny_trial_config(tiny_cache, pruner="l1", pruning_ratio=0.75, finetune_steps=[0, 4, 6]))
    assert [row["finetune_steps"] for row in rows] == [0, 4, 6]
    assert steps == [4, 5]  # only the two steps past the cached milestone


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"pruner": "magnitude"}, ValueError, "magnitude"),
        ({"pruning_ratio": 1.0}, ValueError, "1.0"),
        ({"finetune_steps": [-5]}, ValueError, "finetune_steps"),
        ({"device": "tpu"}, ValueError, "tpu"),
    ],
)
def test_run_trial_invalid_before_work(tiny_cache, monkeypatch, overrides, error, message):
    def fail(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(trial, "load_world", fail)
    with pytest.raises(error, match=message):
        trial.run_trial(tiny_trial_config(tiny_cache, **overrides))


def test_run_trial_missing_fid_weights(tiny_cache, monkeypatch):
    monkeypatch.setattr(trial, "load_world", lambda cfg: pytest.fail("work started before validation"))
    config = tiny_trial_config(tiny_cache)
    config.measure.fid_weights = "/nonexistent/pt_inception.pth"
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        trial.run_trial(config)


def test_run_trial_classifier_groups_mismatch(tiny_cache, monkeypatch):
    original = trial.load_world

    def world_with_other_groups(cfg, *args):
        world = original(cfg, *args)
        world.groups = {**world.groups, "race": ["a", "b", "c", "d"]}
        return world

    monkeypatch.setattr(trial, "load_world", world_with_other_groups)
    with pytest.raises(ValueError, match="race"):
        trial.run_trial(tiny_trial_config(tiny_cache))


def test_to_trial_config_rejects_unknown_key():
    with pytest.raises(Exception, match="prunr"):
        to_trial_config({"prunr": "l1"})


def test_to_trial_config_rejects_wrong_type():
    with pytest.raises(Exception, match="pruning_ratio"):
        to_trial_config({"pruning_ratio": "half"})


def test_run_trial_save_images_writes_every_sample(tiny_cache, tmp_path):
    config = tiny_trial_config(tiny_cache, pruner="l1", pruning_ratio=0.5, finetune_steps=[0], output_dir=str(tmp_path))
    config.sampling.save_images = True
    row = trial.run_trial(config)[0]
    pngs = sorted((tmp_path / "l1-r0.5-s0" / "samples").glob("*.png"))
    assert row["artifact_dir"] == str(tmp_path / "l1-r0.5-s0")
    assert len(pngs) == config.sampling.num_samples


def test_data_predictions_are_computed_once_per_world(tiny_cache, monkeypatch):
    cfg = tiny_trial_config(tiny_cache, pruner="dense")
    world, measurer = trial.open_measurer(cfg)
    first = measurer.references()["data_predicted"]
    calls = []
    original = world.classifier.predict

    def counting_predict(images):
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(world.classifier, "predict", counting_predict)
    again = trial.Measurer(world, cfg, measurer.device, measurer.precision).references()["data_predicted"]
    assert not [n for n in calls if n == len(world.images)]  # the world's images were not classified again
    for attribute in first:
        np.testing.assert_array_equal(first[attribute], again[attribute])
