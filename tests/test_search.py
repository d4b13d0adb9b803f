"""The Optuna search: config checks, the search space, and an end-to-end search on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import ray
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from biasprune.search import (
    TAG_RECOMMENDED_RATIO,
    ParetoConfig,
    _SearchSpace,
    default_storage_url,
    make_sampler,
    run_search,
    search_key,
    to_pareto_config,
    validate_pareto,
)

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = str(ROOT / "tests" / "conf")
ConfigStore.instance().store(name="pareto_schema", node=ParetoConfig)


def _tiny_search(tmp_path: Path, cache: Path, overrides: list[str] = ()) -> ParetoConfig:
    base = [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"trial.cache_dir={cache}"]
    with initialize_config_dir(config_dir=TEST_CONF, version_base="1.3"):
        return to_pareto_config(compose(config_name="tiny_pareto", overrides=[*base, *overrides]))


@pytest.fixture(autouse=True)
def _shutdown_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


# --- config, sampler and space --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"pruners": []}, "pruners must list"),
        ({"pruners": ["l1", "dense"]}, "pruners must list"),
        ({"pruners": ["magnitude"]}, "invalid pruner"),
        ({"ratio_min": 0.8, "ratio_max": 0.5}, "0 < ratio_min <= ratio_max < 1"),
        ({"ratio_max": 1.0}, "0 < ratio_min <= ratio_max < 1"),
        ({"ratio_step": 0.9}, "ratio_step"),
        ({"finetune_steps": [0, 0]}, "distinct step counts"),
        ({"num_trials": 0}, "num_trials"),
        ({"sampler": "cmaes"}, "sampler must be one of"),
        ({"sampler": "nsga2", "startup_trials": 1}, "startup_trials"),
        ({"tolerance_kind": "percent"}, "tolerance_kind"),
        ({"quality_tolerance": -1.0}, "quality_tolerance"),
        ({"reference_point": [1.0, 2.0]}, "reference_point"),
        ({"constraints": {"macs": float("inf")}}, "constraints"),
    ],
)
def test_validate_pareto_invalid(overrides, match):
    config = ParetoConfig(**overrides)
    with pytest.raises(ValueError, match=match):
        validate_pareto(config)


def test_validate_pareto_defaults_pass():
    validate_pareto(ParetoConfig())


def test_search_key_ignores_budget_and_rule():
    base = ParetoConfig()
    same = ParetoConfig(num_trials=40, sampler="random", quality_tolerance=0.5, constraints={"macs": 1.0})
    other = ParetoConfig(ratio_max=0.6)
    assert search_key(base) == search_key(same)
    assert search_key(base) != search_key(other)


@pytest.mark.parametrize(
    "name, kind, population",
    [("tpe", optuna.samplers.TPESampler, None), ("nsga2", optuna.samplers.NSGAIISampler, 6),
     ("random", optuna.samplers.RandomSampler, None)],
)  # fmt: skip
def test_make_sampler_kinds(name, kind, population):
    sampler = make_sampler(name, seed=3, startup_trials=6)
    assert isinstance(sampler, kind)
    if population is not None:
        assert sampler._population_size == population


def test_make_sampler_seeded_proposals_repeat():
    def first_ratios(seed: int) -> list[float]:
        study = optuna.create_study(directions=["minimize"] * 3, sampler=make_sampler("tpe", seed, 5))
        ratios = []
        for _ in range(4):
            trial = study.ask()
            ratios.append(trial.suggest_float("pruning_ratio", 0.1, 0.75))
            study.tell(trial, [1.0, 1.0, 1.0])
        return ratios

    assert first_ratios(7) == first_ratios(7)
    assert first_ratios(7) != first_ratios(8)


def test_default_storage_url_beside_sqlite_store(tmp_path):
    assert default_storage_url(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}") == f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"


def test_search_space_point_has_grid_shape():
    config = ParetoConfig(pruners=["l1", "random"], ratio_step=0.05, finetune_steps=[0, 200])
    config.resources.cpus_per_trial = 2
    space = _SearchSpace(config)
    fixed = optuna.trial.FixedTrial({"pruner": "random", "pruning_ratio": 0.35000000000000003, "finetune_steps": 200})
    point = space(fixed)["point"]
    assert (point["pruner"], point["pruning_ratio"], point["finetune_steps"]) == ("random", 0.35, [200])
    trial = point["trial"]
    assert (trial["pruner"], trial["pruning_ratio"], trial["finetune_steps"]) == ("random", 0.35, [200])
    assert trial["num_threads"] == 2


def test_settle_stale_trials_completes_recorded_and_fails_rest(tmp_path):
    from biasprune import results
    from biasprune.search import _settle_stale_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", directions=["minimize"] * 3)
    for ratio in (0.3, 0.4):  # two trials an interrupted driver left running
        trial = study.ask()
        trial.suggest_categorical("pruner", ["l1"])
        trial.suggest_float("pruning_ratio", ratio, ratio)
        trial.suggest_categorical("finetune_steps", [2])
    row = {"pruner": "l1", "pruning_ratio": 0.3, "finetune_steps": 2, "fd_toyfaces": 12.0, "macs": 1000,
           "fairness_divergence": 0.1, "status": "finished"}  # fmt: skip
    results.write_trials([row], tmp_path / "trials.parquet")

    _settle_stale_trials(study, tmp_path / "trials.parquet", "fd_toyfaces")

    recorded, unrecorded = study.get_trials()
    assert recorded.state == optuna.trial.TrialState.COMPLETE
    assert recorded.values == [12.0, 1000.0, 0.1]
    assert unrecorded.state == optuna.trial.TrialState.FAIL


# --- end to end -----------------------------------------------------------------------------------


def _child_runs(tracking_uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("biasprune")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_run_search_tiny_then_continue_study(tmp_path, tiny_cache):
    config = _tiny_search(tmp_path, tiny_cache)
    first = run_search(config)

    # 1. The study contains 4 ended trials in the SQLite storage beside the MLflow store.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert first.storage == storage
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    first_params = [t.params for t in study.trials]

    # 2. Front, plot and recommendation on disk; the front is non-dominated among the points.
    out = tmp_path / "out"
    front = pd.read_parquet(out / "front.parquet")
    objectives = first.objectives
    assert objectives == ["fd_toyfaces", "macs", "fairness_divergence"]
    assert {"pruner", "pruning_ratio", "finetune_steps", *objectives} <= set(front.columns)
    assert 1 <= len(front) <= 4
    pruned = first.points[(first.points["pruner"] != "dense") & (first.points["status"] == "finished")]
    for _, row in front.iterrows():
        better = pruned[(pruned[objectives] <= row[objectives]).all(axis=1) & (pruned[objectives] < row[objectives]).any(axis=1)]
        assert better.empty
    assert (out / "pareto_front.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hypervolume"] > 0
    assert summary["reference_point"] == pytest.approx([1.1 * pruned[o].max() for o in objectives])
    assert summary["recommendation"]["reason"] == first.recommendation.reason

    # 3. One MLflow child run per distinct point plus the dense baseline; the parent has the tags.
    points = {f"{p}|{r:.12g}|{s}" for p, r, s in zip(pruned["pruner"], pruned["pruning_ratio"], pruned["finetune_steps"])}
    runs = _child_runs(config.tracking.uri)
    assert {r.data.tags["biasprune.point_key"] for r in runs} == points | {"dense|0|0"}
    assert len(runs) == len(points) + 1
    parent = mlflow.MlflowClient(config.tracking.uri).get_run(runs[0].data.tags["mlflow.parentRunId"])
    expected_ratio = "none" if first.recommendation.row is None else f"{first.recommendation.pruning_ratio:.12g}"
    assert parent.data.tags[TAG_RECOMMENDED_RATIO] == expected_ratio
    assert parent.data.metrics["hypervolume"] == pytest.approx(summary["hypervolume"])

    # 4. A re-run with num_trials=6 continues the same study: 2 more trials, the first 4 kept.
    second = run_search(_tiny_search(tmp_path, tiny_cache, ["num_trials=6"]))
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 6
    assert [t.params for t in study.trials[:4]] == first_params
    assert second.trials_run == 2
    assert second.trials_in_study == 6
    assert len(optuna.get_all_study_names(storage)) == 1
    parents = {r.data.tags["mlflow.parentRunId"] for r in _child_runs(config.tracking.uri)}
    assert len(parents) == 1  # the same MLflow parent run continued


def test_run_search_changed_space_rejected(tmp_path, tiny_cache):
    import biasprune.search as search

    # Only the study is opened before the check, so no model is built.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search._open_study(storage, "tiny", search_key(_tiny_search(tmp_path, tiny_cache)))
    with pytest.raises(ValueError, match="another search space"):
        run_search(_tiny_search(tmp_path, tiny_cache, ["ratio_max=0.5"]))


def test_run_search_failing_trials_never_on_front(tmp_path, tiny_cache):
    # Ratios near 0.9 empty the tiny UNet's 4-channel norm groups, so every trial raises.
    config = _tiny_search(tmp_path, tiny_cache, ["ratio_min=0.9", "ratio_max=0.95", "num_trials=2", "finetune_steps=[0]"])
    result = run_search(config)

    study = optuna.load_study(study_name="tiny", storage=result.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    failed = result.points[result.points["pruner"] != "dense"]
    assert list(failed["status"]) == ["failed", "failed"]
    assert result.front.empty
    assert result.recommendation.row is None
    assert result.recommendation.eliminated["unfinished"] == 2
    assert result.reference_point == []
    assert (tmp_path / "out" / "pareto_front.png").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["hypervolume"] is None
