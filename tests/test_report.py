"""Tests of the study report: the table, the significance marks, the figures, MLflow input and logging."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from scipy import stats

from biasprune import report as study
from biasprune.report import ReportError, build_table, holm_bonferroni, main, two_proportion_z_test, write_report
from biasprune.results import read_trials, write_trials
from biasprune.tracking import SweepTracker

GROUPS = {"gender": ["male", "female"], "race": ["white", "black", "asian", "indian"], "age": ["0-9", "10-49", "50+"]}
TOKENS = {"gender": ["male", "female"], "race": ["white", "black", "asian", "indian"], "age": ["0-9", "10-49", "50plus"]}
DENSE_SHARES = {"gender": [0.6, 0.4], "race": [0.45, 0.25, 0.2, 0.1], "age": [0.2, 0.6, 0.2]}
DATASET_SHARES = {"gender": [0.5, 0.5], "race": [0.4, 0.2, 0.3, 0.1], "age": [0.25, 0.5, 0.25]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(pruner: str, ratio: float, steps: int, shares=None, reference_shares: bool = True, sweep: str = "", **metrics) -> dict:
    """A finished trial row with every column the report reads; 1000 images, 10 % unknown per attribute."""
    row = {
        "pruner": pruner, "pruning_ratio": ratio, "finetune_steps": steps, "world": "toyfaces", "model": "toy-ddpm",
        "seed": 0, "num_samples": 1000, "sampler_steps": 50, "eta": 0.0, "reference": "data_predicted",
        "quality_metric": "fd_toyfaces", "evaluation_key": f"eval-{sweep}-{pruner}-{ratio}-{steps}",
        "fd_toyfaces": 14.0, "params": 977443, "macs": 51506032, "model_size_mb": 3.749401,
        "fairness_divergence": 0.0123, "fairness_divergence_ci_low": 0.01, "fairness_divergence_ci_high": 0.015,
        "ratio_gender": 1.5, "ratio_race": 1.8, "ratio_age": 1.5, "unknown_rate": 0.25,
    }  # fmt: skip
    for attribute, values in (shares or DENSE_SHARES).items():
        row[f"unknown_rate_{attribute}"] = 0.1
        for group, value in zip(TOKENS[attribute], values):
            row[f"share_{attribute}_{group}"] = value
    if reference_shares:
        for attribute, values in DATASET_SHARES.items():
            for group, value in zip(TOKENS[attribute], values):
                row[f"reference_share_data_labels_{attribute}_{group}"] = value
                row[f"reference_share_data_predicted_{attribute}_{group}"] = value
    row.update(metrics)
    return row


def _failed(pruner: str, ratio: float, steps: int, error: str = "RuntimeError: norm groups emptied") -> dict:
    return {"pruner": pruner, "pruning_ratio": ratio, "finetune_steps": steps, "status": "failed", "error": error}


# l1 at 0.5 moves gender a lot (significant) and white by 5 points (raw p < 0.05, not after Holm).
L1_SHARES = {"gender": [0.8, 0.2], "race": [0.5, 0.2, 0.2, 0.1], "age": [0.2, 0.6, 0.2]}


def _sweep_rows(reference_shares: bool = True, sweep: str = "") -> list[dict]:
    """A sweep of dense, diff-pruning 0.25, l1 0.5 and random 0.5 at 0 and 100 steps; random fails at 100."""
    return [
        _row("dense", 0.0, 0, reference_shares=reference_shares, sweep=sweep),
        _row("l1", 0.5, 0, reference_shares=reference_shares, sweep=sweep, fd_toyfaces=900.0),
        _row("l1", 0.5, 100, L1_SHARES, reference_shares, sweep, fd_toyfaces=123.456, params=247763, macs=13086008,
             model_size_mb=0.965565, fairness_divergence=0.0823, fairness_divergence_ci_low=0.07,
             fairness_divergence_ci_high=0.095, ratio_gender=4.0, ratio_race=2.5),  # fmt: skip
        _row("diff-pruning", 0.25, 0, reference_shares=reference_shares, sweep=sweep),
        _row("diff-pruning", 0.25, 100, reference_shares=reference_shares, sweep=sweep, ratio_race=math.inf, fd_toyfaces=50.0),
        _row("random", 0.5, 0, reference_shares=reference_shares, sweep=sweep, fd_toyfaces=1000.0),
        _failed("random", 0.5, 100),
    ]


def _write_sweep(folder: Path, rows: list[dict]) -> Path:
    write_trials(rows, folder / "trials.parquet")
    return folder


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path, monkeypatch):
    """The default tracking URI of these tests is a missing store under tmp, never the project's ./mlflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-store' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module: creating its tables takes seconds."""
    root = tmp_path_factory.mktemp("report-store")
    (root / "artifacts").mkdir()
    return f"sqlite:///{root / 'mlflow.db'}"


def _track(store: str, key: str, rows: list[dict]) -> SweepTracker:
    """Log rows as a sweep's parent and child runs, the way the sweep driver does."""
    tracker = SweepTracker(store, "report-tests", key, f"sweep-{key}", "name: test\n")
    for row in rows:
        if row.get("status") == "failed":
            tracker.log_point(row, status="FAILED", error=row["error"])
        else:
            tracker.log_point(row)
    tracker.finish()
    return tracker


def _p_value(count_a: int, total_a: int, count_b: int, total_b: int) -> float:
    table = [[count_a, total_a - count_a], [count_b, total_b - count_b]]
    return stats.chi2_contingency(table, correction=False).pvalue


# --- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(60, 100, 40, 100), (720, 900, 540, 900), (3, 50, 9, 61), (450, 900, 405, 900), (1, 900, 0, 900)])
def test_two_proportion_z_test_matches_chi_square(counts):
    z, p_value = two_proportion_z_test(*counts)
    table = [[counts[0], counts[1] - counts[0]], [counts[2], counts[3] - counts[2]]]
    chi2 = stats.chi2_contingency(table, correction=False)
    assert p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    assert z**2 == pytest.approx(chi2.statistic, rel=1e-9)


def test_two_proportion_z_test_known_value_and_edges():
    z, p_value = two_proportion_z_test(60, 100, 40, 100)
    assert z == pytest.approx(2.0 * math.sqrt(2.0))  # 0.2 / sqrt(0.25 * 0.02)
    assert p_value == pytest.approx(0.0046777, abs=1e-6)
    assert two_proportion_z_test(0, 100, 0, 80) == (0.0, 1.0)
    assert two_proportion_z_test(100, 100, 80, 80) == (0.0, 1.0)
    assert all(math.isnan(v) for v in two_proportion_z_test(0, 0, 3, 10))
    with pytest.raises(ValueError, match="0 <= successes <= total"):
        two_proportion_z_test(11, 10, 3, 10)


def test_holm_bonferroni_known_values():
    adjusted, rejected = holm_bonferroni([0.01, 0.04, 0.03, 0.005])
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 → 0.02, 0.03, 0.06, 0.04, then the running max.
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert rejected.tolist() == [True, False, False, True]
    adjusted, rejected = holm_bonferroni([0.02, math.nan, 0.5], alpha=0.05)
    assert adjusted[0] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.5)
    assert rejected.tolist() == [True, False, False]
    assert holm_bonferroni([0.9, 0.8])[0].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="alpha must be in"):
        holm_bonferroni([0.1], alpha=1.5)


# --- the table -----------------------------------------------------------------------------------


def test_table_cells(tmp_path):
    table = build_table(read_trials(_write_sweep(tmp_path, _sweep_rows()) / "trials.parquet"))

    assert [c.label for c in table.columns] == ["dataset", "dense", "diff-pruning 0.25", "l1 0.5", "random 0.5"]
    assert table.steps == 100
    assert table.milestones == [0, 100]
    assert table.attributes == TOKENS
    assert table.cell("quality", "dense") == "14"
    assert table.cell("quality", "l1 0.5") == "123.5"  # the 100-step row, not the 0-step one
    assert table.cell("quality", "dataset") == "—"
    assert table.cell("params", "l1 0.5") == "0.2478"
    assert table.cell("macs", "dense") == "0.05151"
    assert table.cell("model_size_mb", "l1 0.5") == "0.9656"
    assert table.cell("share_gender_male", "dataset") == "50.0"
    assert table.cell("share_gender_male", "dense") == "60.0"
    assert table.cell("share_age_50plus", "dense") == "20.0"
    assert table.cell("unknown_rate_race", "l1 0.5") == "10.0"
    assert table.cell("ratio_gender", "dataset") == "1"  # 0.5 / 0.5
    assert table.cell("ratio_race", "dataset") == "2"  # white 0.4 / black 0.2
    assert table.cell("ratio_age", "dataset") == "1"  # 10-49 0.5 / others 0.5
    assert table.cell("ratio_race", "diff-pruning 0.25") == "∞"
    assert table.cell("ratio_gender", "l1 0.5") == "4"
    assert table.cell("fairness_divergence", "l1 0.5") == "0.0823 [0.07, 0.095]"
    assert table.cell("unknown_rate", "dense") == "25.0"
    assert table.cell("num_samples", "l1 0.5") == "1000"
    assert table.cell("sampler_steps", "dense") == "50"
    block_titles = [b.title for b in table.blocks]
    assert block_titles == ["Model statistics", "gender shares", "race shares", "age shares", "Fairness", "Sampling"]


def test_failed_point_fills_its_column_with_failed(tmp_path):
    table = build_table(read_trials(_write_sweep(tmp_path, _sweep_rows()) / "trials.parquet"))
    cells = [row.cells[4] for block in table.blocks for row in block.rows]
    assert set(cells) == {"failed"}
    # At 0 steps the same point finished.
    table = build_table(read_trials(tmp_path / "trials.parquet"), steps=0)
    assert table.cell("quality", "random 0.5") == "1000"


def test_significance_marks_follow_holm_over_scipy_p_values(tmp_path):
    table = build_table(read_trials(_write_sweep(tmp_path, _sweep_rows()) / "trials.parquet"))
    comparisons = table.comparisons
    # Two finished pruned columns × 9 groups; the failed column is not compared.
    assert len(comparisons) == 18
    assert set(comparisons["model"]) == {"diff-pruning 0.25", "l1 0.5"}

    # Counts: share × 900 known labels (1000 images, 10 % unknown).
    expected = [_p_value(round(r.share * 900), 900, round(r.dense_share * 900), 900) for r in comparisons.itertuples()]
    np.testing.assert_allclose(comparisons["p_value"], expected, rtol=1e-9)
    order = np.argsort(expected)
    holm = np.maximum.accumulate([min(1.0, (18 - i) * expected[j]) for i, j in enumerate(order)])
    np.testing.assert_allclose(comparisons["p_holm"].to_numpy()[order], holm, rtol=1e-9)

    male = comparisons.set_index(["model", "attribute", "group"]).loc[("l1 0.5", "gender", "male")]
    assert (male["count"], male["known"], male["dense_count"], male["dense_known"]) == (720, 900, 540, 900)
    assert male["significant"]
    assert table.cell("share_gender_male", "l1 0.5") == "80.0*"
    assert table.cell("share_gender_female", "l1 0.5") == "20.0*"
    white = comparisons.set_index(["model", "attribute", "group"]).loc[("l1 0.5", "race", "white")]
    assert white["p_value"] < 0.05 < white["p_holm"]  # significant alone, not after the correction
    assert table.cell("share_race_white", "l1 0.5") == "50.0"
    assert table.cell("share_gender_male", "diff-pruning 0.25") == "60.0"
    assert table.cell("share_gender_male", "dense") == "60.0"
    note = table.footnotes[-1]
    assert "two-proportion z-test" in note
    assert "Holm–Bonferroni" in note
    assert "α = 0.05" in note
    assert "all 18 share comparisons" in note


def test_counts_without_unknown_rates(tmp_path):
    rows = _sweep_rows()
    for row in rows:
        for attribute in GROUPS:
            row.pop(f"unknown_rate_{attribute}", None)
    table = build_table(read_trials(_write_sweep(tmp_path, rows) / "trials.parquet"))
    male = table.comparisons.set_index(["model", "attribute", "group"]).loc[("l1 0.5", "gender", "male")]
    assert (male["count"], male["known"]) == (800, 1000)
    assert male["p_value"] == pytest.approx(_p_value(800, 1000, 600, 1000))


def test_dataset_column_without_reference_columns(tmp_path):
    table = build_table(read_trials(_write_sweep(tmp_path, _sweep_rows(reference_shares=False)) / "trials.parquet"))
    assert table.cell("share_gender_male", "dataset") == "n/a"
    assert table.cell("ratio_race", "dataset") == "n/a"
    assert table.cell("share_gender_male", "dense") == "60.0"
    assert any("reference_share_data_labels_<attribute>_<group>" in note for note in table.footnotes)


def test_steps_must_be_a_milestone(tmp_path):
    frame = read_trials(_write_sweep(tmp_path, _sweep_rows()) / "trials.parquet")
    with pytest.raises(ReportError, match=r"--steps 7 is not a fine-tuning milestone of this sweep; choose one of \[0, 100\]"):
        build_table(frame, steps=7)


def test_different_quality_metrics_are_named_per_cell(tmp_path):
    rows = _sweep_rows()
    rows[2].update(quality_metric="fid", fid=33.3)
    table = build_table(read_trials(_write_sweep(tmp_path, rows) / "trials.parquet"))
    assert table.cell("quality", "l1 0.5") == "33.3 (fid)"
    assert table.cell("quality", "dense") == "14 (fd_toyfaces)"


# --- files and MLflow ----------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    with Image.open(path) as image:
        assert image.width >= 600
        assert image.height >= 400


def test_report_from_folder_logged_to_parent(tmp_path, store):
    rows = _sweep_rows(sweep="folder")
    folder = _write_sweep(tmp_path / "sweep", rows)
    tracker = _track(store, "folder-sweep", rows)

    report = write_report(folder, tracking_uri=store)

    assert report.output_dir == folder / "report"
    assert report.parent_run_id == tracker.parent_run_id  # found by the rows' evaluation keys
    for name in ("quality_vs_ratio.png", "fairness_vs_ratio.png", "shares.png", "finetune_steps.png"):
        _assert_png(folder / "report" / name)
    markdown = (folder / "report" / "report.md").read_text()
    assert markdown.startswith("# Study report: sweep-folder-sweep\n")  # the parent run's name
    assert "| male (%) | 50.0 | 60.0 | 60.0 | 80.0* | failed |" in markdown
    assert "RuntimeError: norm groups emptied" in markdown
    page = (folder / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert page.count("src=") == 4  # nothing outside the page
    assert "<td class=marked>80.0*</td>" in page
    logged = {a.path for a in MlflowClient(store).list_artifacts(tracker.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/shares.png", "report/share_tests.csv"} <= logged
    assert f"- source: {folder.resolve()}" in markdown

    # A report at an earlier milestone goes beside the sweep's report, not over it.
    milestones = sorted({r["finetune_steps"] for r in rows if r["pruner"] != "dense"})
    write_report(folder, output_dir=tmp_path / "early", steps=milestones[0], tracking_uri=store)
    early = {a.path for a in MlflowClient(store).list_artifacts(tracker.parent_run_id, f"report-steps{milestones[0]}")}
    assert f"report-steps{milestones[0]}/report.md" in early
    logged_md = MlflowClient(store).download_artifacts(tracker.parent_run_id, "report/report.md", str(tmp_path))
    assert Path(logged_md).read_text() == markdown


def test_report_from_run_id_matches_the_folder_report(tmp_path, store):
    rows = _sweep_rows(sweep="run-id")
    folder = _write_sweep(tmp_path / "sweep", rows)
    tracker = _track(store, "run-id-sweep", rows)

    from_folder = build_table(read_trials(folder / "trials.parquet"))
    report = write_report(tracker.parent_run_id, tracking_uri=store)

    assert report.output_dir == tmp_path / "outputs" / "reports" / tracker.parent_run_id
    assert report.parent_run_id == tracker.parent_run_id
    table = report.table
    assert [c.label for c in table.columns] == [c.label for c in from_folder.columns]
    for block in from_folder.blocks:
        for row in block.rows:
            for column in from_folder.columns:
                assert table.cell(row.key, column.label) == from_folder.cell(row.key, column.label), (row.key, column.label)
    assert table.cell("ratio_race", "diff-pruning 0.25") == "∞"  # restored from the infinite-metrics tag
    assert table.cell("quality", "random 0.5") == "failed"
    assert "failed" in (report.output_dir / "report.md").read_text()


def test_parent_run_found_by_the_saved_config(tmp_path, store):
    from omegaconf import OmegaConf

    from biasprune.sweep import GridConfig, sweep_key

    config = GridConfig(name="saved-config", pruners=["l1"], ratios=[0.5], finetune_steps=[0, 100])
    config.tracking.uri = store
    rows = [{k: v for k, v in row.items() if k != "evaluation_key"} for row in _sweep_rows() if row["pruner"] in ("dense", "l1")]
    folder = _write_sweep(tmp_path / "sweep", rows)
    (folder / "hydra" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(config), folder / "hydra" / ".hydra" / "config.yaml")
    tracker = _track(store, sweep_key(config), rows)

    report = write_report(folder)  # the store comes from the saved config's tracking.uri

    assert report.parent_run_id == tracker.parent_run_id
    assert "report/report.html" in {a.path for a in MlflowClient(store).list_artifacts(tracker.parent_run_id, "report")}


def test_report_without_parent_run_warns_and_writes_files(tmp_path, store, caplog):
    rows = [_row("dense", 0.0, 0, evaluation_key="unlogged-dense"), _row("l1", 0.5, 0, evaluation_key="unlogged-l1")]
    folder = _write_sweep(tmp_path / "sweep", rows)
    with caplog.at_level(logging.WARNING, logger="biasprune.report"):
        report = write_report(folder, output_dir=tmp_path / "out", tracking_uri=store)
    assert report.parent_run_id is None
    assert "no MLflow parent run of the sweep" in caplog.text
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert not (tmp_path / "out" / "finetune_steps.png").exists()  # one milestone only
    _assert_png(tmp_path / "out" / "quality_vs_ratio.png")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biasprune.report"):
        write_report(folder, output_dir=tmp_path / "out2")  # the default store does not exist
    assert "no MLflow store at" in caplog.text
    assert (tmp_path / "out2" / "report.md").stat().st_size > 0


# --- bad input -----------------------------------------------------------------------------------


def test_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"'.*empty' is not a sweep output folder: it has no trials.parquet; pass the output_dir"):
        write_report(tmp_path / "empty")


def test_value_that_is_neither_folder_nor_run_id():
    with pytest.raises(ReportError, match=r"'outputs/nothing' is neither a folder nor an MLflow run id"):
        write_report("outputs/nothing")


def test_run_id_that_does_not_exist(store):
    missing = "0" * 32
    with pytest.raises(ReportError, match=rf"no MLflow run with id '{missing}' in {re.escape(store)}.*check --tracking-uri"):
        write_report(missing, tracking_uri=store)


def test_run_id_with_a_missing_store(tmp_path):
    with pytest.raises(ReportError, match=r"no MLflow store at .*nothing.db .*--tracking-uri"):
        write_report("a" * 32, tracking_uri=f"sqlite:///{tmp_path / 'nothing.db'}")


def test_run_id_of_a_point_names_its_parent(store):
    tracker = _track(store, "point-run", [_row("dense", 0.0, 0, sweep="point-run")])
    query = f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    child = MlflowClient(store).search_runs([tracker.experiment_id], query)[0].info.run_id
    with pytest.raises(ReportError, match=rf"is not a sweep's parent run .*'point'.*pass its parent run {tracker.parent_run_id}"):
        write_report(child, tracking_uri=store)


def test_sweep_without_finished_points(tmp_path):
    folder = _write_sweep(tmp_path, [_failed("l1", 0.5, 0), _failed("l1", 0.5, 100, "ValueError: pruning_ratio 0.9")])
    with pytest.raises(ReportError, match=r"no finished point \(2 failed\); the first error is: RuntimeError: norm groups"):
        write_report(folder)


def test_cli_prints_error_and_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert "has no trials.parquet" in captured.err
    assert captured.out == ""


def test_cli_writes_the_report(tmp_path, capsys):
    folder = _write_sweep(tmp_path / "sweep", _sweep_rows())
    assert main([str(folder), "--steps", "0", "--output", str(tmp_path / "out")]) == 0
    assert f"Study report: {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "fine-tuning steps of the pruned columns: 0 (milestones of the sweep: 0, 100)" in markdown


# --- the sweep hook ------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_sweep_writes_its_report(tmp_path, tiny_cache):
    import ray
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from biasprune.sweep import GridConfig, run_grid, to_grid_config

    ConfigStore.instance().store(name="grid_schema", node=GridConfig)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}", f"trial.cache_dir={tiny_cache}", "pruners=[l1]"]
    with initialize_config_dir(config_dir=str(Path(study.__file__).parents[1] / "tests" / "conf"), version_base="1.3"):
        config = to_grid_config(compose(config_name="tiny_grid", overrides=overrides))
    try:
        table = run_grid(config, after_sweep=study.report_after_sweep)
    finally:
        if ray.is_initialized():
            ray.shutdown()

    page = Path(table.attrs["report"])
    assert page == tmp_path / "out" / "report" / "report.html"
    assert page.stat().st_size > 0
    _assert_png(tmp_path / "out" / "report" / "finetune_steps.png")
    markdown = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| DDIM steps | — | 4 | 4 |" in markdown
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("biasprune").experiment_id], "tags.`biasprune.kind` = 'sweep'")[0]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_group_label_restores_the_plus_of_age_groups():
    assert study.group_label("50plus") == "50+"
    assert study.group_label("10-49") == "10-49"
    assert study.group_label("plus") == "plus"
