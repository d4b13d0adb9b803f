"""End-to-end grid sweeps on the tiny world with a real Ray runtime and a real MLflow store."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from biasprune.sweep import GridConfig, run_grid, to_grid_config

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = str(ROOT / "tests" / "conf")
ConfigStore.instance().store(name="grid_schema", node=GridConfig)


def _tiny_grid(tmp_path: Path, cache: Path, overrides: list[str] = ()) -> GridConfig:
    base = [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"trial.cache_dir={cache}"]
    with initialize_config_dir(config_dir=TEST_CONF, version_base="1.3"):
        return to_grid_config(compose(config_name="tiny_grid", overrides=[*base, *overrides]))


def _child_runs(tracking_uri: str, experiment: str = "biasprune") -> pd.DataFrame:
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return pd.DataFrame(
        [
            {
                "point": r.data.tags.get("biasprune.point_key"),
                "status": r.info.status,
                "run_id": r.info.run_id,
                **{f"metric.{k}": v for k, v in r.data.metrics.items()},
            }
            for r in children
        ]
    )


def _finished_rows(path: Path) -> int:
    try:
        return int((pd.read_parquet(path)["status"] == "finished").sum())
    except (FileNotFoundError, OSError, ValueError):  # not written yet, or replaced mid-read
        return 0


@pytest.fixture(autouse=True)
def _shutdown_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_grid_sweep_parquet_matches_mlflow(tmp_path, tiny_cache):
    config = _tiny_grid(tmp_path, tiny_cache)
    table = run_grid(config)

    expected = {"dense|0|0", "l1|0.5|0", "l1|0.5|2", "random|0.5|0", "random|0.5|2"}
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials) == len(expected)
    assert set(trials["status"]) == {"finished"}
    assert list(table["pruner"]) == ["dense", "l1", "l1", "random", "random"]

    runs = _child_runs(config.tracking.uri)
    assert set(runs["point"]) == expected
    assert len(runs) == len(expected)  # parallel trials logged once each
    assert set(runs["status"]) == {"FINISHED"}
    for _, row in trials.iterrows():
        key = f"{row['pruner']}|{row['pruning_ratio']:g}|{row['finetune_steps']}"
        run = runs[runs["point"] == key].iloc[0]
        assert run["metric.fairness_divergence"] == pytest.approx(row["fairness_divergence"])
        assert run["metric.macs"] == pytest.approx(row["macs"])

    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert len(predictions) == len(expected) * config.trial.sampling.num_samples

    client = mlflow.MlflowClient(config.tracking.uri)
    run_id = runs.set_index("point").loc["l1|0.5|2", "run_id"]
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"sample_grid.png", "shares.png", "predictions.parquet", "config.yaml"} <= artifacts


def test_grid_sweep_rerun_recomputes_nothing(tmp_path, tiny_cache, monkeypatch):
    config = _tiny_grid(tmp_path, tiny_cache, ["pruners=[l1]"])
    first = run_grid(config)

    import biasprune.sweep as sweep

    monkeypatch.setattr(sweep, "_run_tune", lambda *args: pytest.fail("finished points were run again"))
    second = run_grid(_tiny_grid(tmp_path, tiny_cache, ["pruners=[l1]"]))
    pd.testing.assert_frame_equal(first, second)
    assert len(_child_runs(config.tracking.uri)) == 3


def test_grid_sweep_failing_trial_is_recorded(tmp_path, tiny_cache):
    # 0.9 would empty the 4-channel norm groups of the tiny UNet, so that trial raises.
    config = _tiny_grid(tmp_path, tiny_cache, ["pruners=[l1]", "ratios=[0.5,0.9]", "finetune_steps=[0]"])
    table = run_grid(config)

    failed = table[table["status"] == "failed"]
    assert list(zip(failed["pruner"], failed["pruning_ratio"])) == [("l1", 0.9)]
    assert "pruning_ratio" in failed["error"].iloc[0]
    finished = table[table["status"] == "finished"]
    assert len(finished) == 2  # dense and l1 at 0.5 finished despite the failure
    runs = _child_runs(config.tracking.uri)
    assert runs.set_index("point").loc["l1|0.9|0", "status"] == "FAILED"
    assert math.isnan(failed["fairness_divergence"].iloc[0])


def test_grid_sweep_two_node_cluster(tmp_path, tiny_cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        config = _tiny_grid(
            tmp_path, tiny_cache, [f"ray_address={cluster.address}", "include_dense=false", "ratios=[0.25,0.5]"]
        )
        run_grid(config)
        trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
        assert len(trials) == 2 * 2 * 2
        assert trials["node_id"].nunique() == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_grid_sweep_resumes_after_killed_driver(tmp_path, tiny_cache):
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, str(ROOT / "sweeps" / "grid.py"), "--config-dir", TEST_CONF, "--config-name", "tiny_grid",
        f"output_dir={out}", f"tracking.uri={uri}", f"trial.cache_dir={tiny_cache}",
        "pruners=[l1,random]", "ratios=[0.25,0.75]", "finetune_steps=[0,2,4]", "max_concurrent_trials=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Only the Parquet table is polled: opening the SQLite store while the driver creates it
        # would race with its schema migration.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if _finished_rows(out / "trials.parquet") >= 3:
                break
            assert driver.poll() is None, "the sweep ended before it could be killed"
            time.sleep(1)
        else:
            pytest.fail("no point finished within 300 s")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        # The driver's local Ray processes die with their session.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    before = _child_runs(uri)
    finished_before = dict(zip(before[before["status"] == "FINISHED"]["point"], before["run_id"]))
    assert 0 < len(finished_before) < 1 + 2 * 2 * 3

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Sweep summary" in resumed.stdout

    after = _child_runs(uri)
    finished = after[after["status"] == "FINISHED"]
    assert len(finished) == 1 + 2 * 2 * 3
    assert finished["point"].is_unique  # no duplicated runs
    for point, run_id in finished_before.items():
        assert finished.set_index("point").loc[point, "run_id"] == run_id  # not re-run
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 1 + 2 * 2 * 3
    assert set(trials["status"]) == {"finished"}
