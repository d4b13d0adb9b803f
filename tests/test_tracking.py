"""Tests of MLflow tracking: parent and child runs, resume, failures, threads and a local server."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from biasprune import tracking
from biasprune.tracking import LocalTrackingServer, SweepTracker

CONFIG_YAML = "sweep:\n  pruners: [l1, random]\n  ratios: [0.5]\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module: creating its tables takes seconds."""
    root = tmp_path_factory.mktemp("mlflow-store")
    return tracking.default_tracking_uri(root)


@pytest.fixture
def tracker(store, request) -> SweepTracker:
    """A tracker of a sweep of its own (the test's name as sweep key and experiment)."""
    return SweepTracker(store, f"exp-{request.node.name}", f"key-{request.node.name}", "grid", CONFIG_YAML,
                        {"world.images_sha256": "abc123"})  # fmt: skip


def _row(pruner: str, ratio: float, steps: int, **metrics: float) -> dict:
    row = {"world": "toyfaces", "model": "toy-ddpm", "pruner": pruner, "pruning_ratio": ratio,
           "finetune_steps": steps, "seed": 0, "num_samples": 32, "fd_extractor": ""}  # fmt: skip
    row.update(metrics)
    return row


def _children(tracker: SweepTracker) -> list:
    query = f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    return tracker.client.search_runs([tracker.experiment_id], query)


def test_default_tracking_uri_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert (tmp_path / "mlflow" / "artifacts").is_dir()
    assert tracking.default_artifact_location(uri, "my sweep") == (tmp_path.resolve() / "mlflow/artifacts/my_sweep").as_uri()


def test_default_tracking_uri_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert tracking.default_artifact_location("http://127.0.0.1:5999", "x") is None


def test_sweep_tracker_log_point_values(tracker):
    rows = [
        _row("dense", 0.0, 0, fd_toyfaces=1.25, macs=4_000_000, share_gender_male=0.5),
        _row("l1", 0.5, 200, fd_toyfaces=3.5, macs=1_000_000, share_gender_male=0.75),
        _row("random", 0.25, 200, fd_toyfaces=2.0, macs=2_250_000, share_gender_male=0.625),
    ]
    ids = [tracker.log_point(row) for row in rows]

    children = {run.info.run_id: run for run in _children(tracker)}
    assert sorted(children) == sorted(ids)
    l1 = children[ids[1]]
    assert l1.info.run_name == "l1-r0.5-s200"
    assert l1.info.status == "FINISHED"
    assert l1.data.tags["biasprune.point_key"] == "l1|0.5|200"
    assert l1.data.params == {"world": "toyfaces", "model": "toy-ddpm", "pruner": "l1", "pruning_ratio": "0.5",
                              "finetune_steps": "200", "seed": "0", "num_samples": "32", "fd_extractor": ""}  # fmt: skip
    assert l1.data.metrics == {"fd_toyfaces": 3.5, "macs": 1_000_000.0, "share_gender_male": 0.75}
    assert children[ids[0]].data.metrics["fd_toyfaces"] == 1.25
    assert tracker.finished_points() == {"dense|0|0", "l1|0.5|200", "random|0.25|200"}


def test_sweep_tracker_parent_config_and_tags(tracker, store):
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["biasprune.sweep_key"] == tracker.sweep_key
    assert parent.data.tags["world.images_sha256"] == "abc123"
    commit = parent.data.tags["biasprune.code_version"]
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    local = tracker.client.download_artifacts(tracker.parent_run_id, "config.yaml")
    assert Path(local).read_text() == CONFIG_YAML
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == tracking.default_artifact_location(store, experiment.name)


def test_sweep_tracker_same_sweep_key_continues_parent(tracker, store):
    tracker.log_point(_row("l1", 0.5, 100, fd_toyfaces=3.0))
    tracker.finish()

    again = SweepTracker(store, tracker.client.get_experiment(tracker.experiment_id).name, tracker.sweep_key,
                         "grid", CONFIG_YAML, {})  # fmt: skip
    assert again.parent_run_id == tracker.parent_run_id
    assert again.client.get_run(again.parent_run_id).info.status == "RUNNING"
    parents = again.client.search_runs([again.experiment_id], "tags.`biasprune.kind` = 'sweep'")
    assert len(parents) == 1
    assert again.finished_points() == {"l1|0.5|100"}


def test_sweep_tracker_log_point_finished_again_creates_nothing(tracker):
    first = tracker.log_point(_row("l1", 0.5, 100, fd_toyfaces=3.0))
    second = tracker.log_point(_row("l1", 0.5, 100, fd_toyfaces=9.0))
    assert second == first
    children = _children(tracker)
    assert len(children) == 1
    assert children[0].data.metrics["fd_toyfaces"] == 3.0


def test_sweep_tracker_failed_point(tracker):
    row = {"pruner": "diff-pruning", "pruning_ratio": 0.75, "finetune_steps": 400, "seed": 1}
    run_id = tracker.log_point(row, status="FAILED", error="FloatingPointError: loss is nan at step 17")

    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["biasprune.error"] == "FloatingPointError: loss is nan at step 17"
    assert run.data.params["seed"] == "1"
    error_file = tracker.client.download_artifacts(run_id, "error.txt")
    assert Path(error_file).read_text() == "FloatingPointError: loss is nan at step 17"
    assert tracker.finished_points() == set()
    assert tracker.failed_points() == {"diff-pruning|0.75|400"}

    finished_id = tracker.log_point({**row, "fd_toyfaces": 5.0})
    assert finished_id != run_id
    assert tracker.finished_points() == {"diff-pruning|0.75|400"}
    assert tracker.failed_points() == set()
    tracker.finish()
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["biasprune.points_finished"], parent.data.tags["biasprune.points_failed"]) == ("1", "0")


def test_sweep_tracker_nonfinite_metrics(tracker):
    row = _row("l1", 0.5, 0, ratio_race=math.inf, ratio_age=-math.inf, js_gender=math.nan, tv_gender=0.125)
    run = tracker.client.get_run(tracker.log_point(row))
    assert math.isnan(run.data.metrics["js_gender"])
    assert run.data.metrics["tv_gender"] == 0.125
    assert run.data.metrics["ratio_race"] == sys.float_info.max
    assert run.data.metrics["ratio_age"] == -sys.float_info.max
    assert run.data.tags["biasprune.infinite_metrics"] == "ratio_race=+inf,ratio_age=-inf"


def test_sweep_tracker_artifacts_under_child(tracker, tmp_path):
    grid = tmp_path / "grid-of-l1.png"
    grid.write_bytes(b"\x89PNG fake")
    table = tmp_path / "p.parquet"
    table.write_bytes(b"PAR1")
    row = {**_row("l1", 0.5, 200, fd_toyfaces=1.0), "artifact_dir": "/tmp/out/l1-r0.5-s200"}
    files = {"sample_grid.png": grid, "tables/predictions.parquet": table, "shares": tmp_path / "shares.png"}
    files["shares"].write_bytes(b"\x89PNG shares")
    run_id = tracker.log_point(row, files, config_yaml="pruner: l1\n")

    names = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert names == {"sample_grid.png", "shares.png", "tables", "config.yaml"}
    assert [a.path for a in tracker.client.list_artifacts(run_id, "tables")] == ["tables/predictions.parquet"]
    assert Path(tracker.client.download_artifacts(run_id, "sample_grid.png")).read_bytes() == b"\x89PNG fake"
    assert tracker.client.get_run(run_id).data.tags["biasprune.artifact_dir"] == "/tmp/out/l1-r0.5-s200"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"status": "DONE"}, "status must be"),
        ({"status": "FAILED"}, "error is empty"),
        ({"artifacts": {"../escape.png": Path(__file__)}}, "relative path inside the run"),
    ],
)
def test_sweep_tracker_log_point_invalid(tracker, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tracker.log_point(_row("l1", 0.5, 200), **kwargs)


def test_sweep_tracker_log_point_threads(tracker):
    rows = [_row("l1", ratio, steps, fd_toyfaces=ratio + steps) for ratio in (0.25, 0.5, 0.75) for steps in (0, 100)]
    rows += [rows[0], rows[0]]  # the same point from three threads at once
    errors: list[BaseException] = []

    def log(row: dict) -> None:
        try:
            tracker.log_point(row)
        except BaseException as err:  # collected so the test fails with the cause
            errors.append(err)

    threads = [threading.Thread(target=log, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    keys = sorted(run.data.tags["biasprune.point_key"] for run in _children(tracker))
    assert keys == sorted(f"l1|{r}|{s}" for r in (0.25, 0.5, 0.75) for s in (0, 100))


_WORKER = textwrap.dedent(
    """
    import sys
    from mlflow import MlflowClient

    uri, experiment_id, worker = sys.argv[1], sys.argv[2], sys.argv[3]
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=f"worker-{worker}")
    client.log_param(run.info.run_id, "worker", worker)
    client.log_metric(run.info.run_id, "value", float(worker) / 4)
    client.log_text(run.info.run_id, worker, "worker.txt")
    client.set_terminated(run.info.run_id)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_tracking_server_concurrent_processes(tmp_path):
    with LocalTrackingServer(tmp_path / "store") as server:
        assert server.uri.startswith("http://127.0.0.1:")
        client = MlflowClient(server.uri)
        experiment_id = client.create_experiment("shared")
        workers = [
            subprocess.Popen([sys.executable, "-c", _WORKER, server.uri, experiment_id, str(i)], stderr=subprocess.PIPE)
            for i in range(3)
        ]
        failures = [w.stderr.read().decode()[-2000:] for w in workers if w.wait(120) != 0]
        assert failures == []
        runs = client.search_runs([experiment_id])
        assert sorted(r.data.params["worker"] for r in runs) == ["0", "1", "2"]
        assert sorted(r.data.metrics["value"] for r in runs) == [0.0, 0.25, 0.5]
        assert {r.info.status for r in runs} == {"FINISHED"}

        tracker = SweepTracker(server.uri, "sweeps", "server-key", "grid", CONFIG_YAML, {})
        run_id = tracker.log_point(_row("l1", 0.5, 0, fd_toyfaces=2.5, js_gender=math.nan))
        assert tracker.finished_points() == {"l1|0.5|0"}
        assert math.isnan(tracker.client.get_run(run_id).data.metrics["js_gender"])
        port = server.port

    assert list((tmp_path / "store" / "artifacts").rglob("worker.txt"))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_local_tracking_server_invalid_timeout(tmp_path):
    with pytest.raises(ValueError, match="startup_timeout_s"):
        LocalTrackingServer(tmp_path, startup_timeout_s=0)
