from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from biasprune.sweep import (
    GridConfig,
    expand_grid,
    point_key,
    summary_table,
    sweep_key,
    to_grid_config,
    trial_config_for,
    trial_points,
    validate_grid,
)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="grid_schema", node=GridConfig)


def _compose(overrides: list[str]) -> GridConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_grid_config(compose(config_name="grid", overrides=overrides))


def test_default_grid_is_the_study():
    config = _compose([])
    assert config.pruners == ["diff-pruning", "l1", "random"]
    assert config.ratios == [0.25, 0.5, 0.75]
    assert len(config.finetune_steps) >= 2
    specs = expand_grid(config)
    assert len(specs) == 1 + 3 * 3
    assert specs[0] == {"pruner": "dense", "pruning_ratio": 0.0, "finetune_steps": [0]}
    assert sum(len(trial_points(s)) for s in specs) == 1 + 9 * len(config.finetune_steps)


def test_expand_grid_overrides():
    config = _compose(["pruners=[l1,taylor]", "ratios=[0.3]", "finetune_steps=[100,0]", "include_dense=false"])
    specs = expand_grid(config)
    assert [(s["pruner"], s["pruning_ratio"]) for s in specs] == [("l1", 0.3), ("taylor", 0.3)]
    assert all(s["finetune_steps"] == [0, 100] for s in specs)
    assert trial_points(specs[0]) == ["l1|0.3|0", "l1|0.3|100"]


def test_trial_config_for_sets_point_and_threads():
    config = _compose(["resources.cpus_per_trial=2"])
    trial = trial_config_for(config, {"pruner": "random", "pruning_ratio": 0.5, "finetune_steps": [0, 5]})
    assert (trial.pruner, trial.pruning_ratio, trial.finetune_steps) == ("random", 0.5, [0, 5])
    assert trial.num_threads == 2
    assert config.trial.pruner != "random" or config.trial.pruning_ratio != 0.5  # base left untouched


def test_compose_unknown_key_invalid():
    with pytest.raises(ConfigCompositionException):
        _compose(["prunerz=[l1]"])


def test_compose_wrong_type_invalid():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["ratios=[half]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pruners=[magnitude]"], "magnitude"),
        (["ratios=[0.5,1.2]"], "1.2"),
        (["ratios=[0.5,0.5]"], "repeat"),
        (["resources.cpus_per_trial=0"], "cpus_per_trial"),
        (["finetune_steps=[-1]"], "finetune_steps"),
        (["pruners=[]", "include_dense=false"], "no point"),
    ],
)
def test_validate_grid_invalid(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_grid(_compose(overrides))


def test_sweep_key_ignores_where_it_runs():
    base = _compose([])
    moved = _compose(["output_dir=/tmp/elsewhere", "trial.cache_dir=/tmp/cache", "resources.cpus_per_trial=2"])
    changed = _compose(["ratios=[0.25,0.5]"])
    assert sweep_key(base) == sweep_key(moved)
    assert sweep_key(base) != sweep_key(changed)


def test_point_key_normalises_numbers():
    assert point_key("l1", 0.5, 200) == point_key("l1", 0.50, 200) == "l1|0.5|200"
    assert point_key("dense", 0, 0) == "dense|0|0"


def test_summary_table_orders_like_the_study():
    frame = pd.DataFrame(
        {
            "pruner": ["random", "l1", "dense", "diff-pruning", "l1"],
            "pruning_ratio": [0.25, 0.5, 0.0, 0.25, 0.25],
            "finetune_steps": [0, 0, 0, 0, 100],
        }
    )
    ordered = summary_table(frame, _compose([]))
    assert list(zip(ordered["pruner"], ordered["pruning_ratio"], ordered["finetune_steps"])) == [
        ("dense", 0.0, 0),
        ("diff-pruning", 0.25, 0),
        ("l1", 0.25, 100),
        ("l1", 0.5, 0),
        ("random", 0.25, 0),
    ]


def test_trial_resources_default_gpu():
    from biasprune.sweep import ResourcesConfig, trial_resources

    assert trial_resources(ResourcesConfig(), "auto", 0) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(ResourcesConfig(), "auto", 2) == {"cpu": 1.0, "gpu": 1.0}
    assert trial_resources(ResourcesConfig(), "cpu", 2) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(ResourcesConfig(2, 0.5), "cuda", 2) == {"cpu": 2, "gpu": 0.5}


def test_appended_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'ratio' \(did you mean 'ratios'\?\)"):
        _compose(["+ratio=[0.5]"])
    with pytest.raises(ValueError, match=r"did you mean 'trial.sampling.num_samples'"):
        _compose(["+trial.sampling.num_sample=200"])
