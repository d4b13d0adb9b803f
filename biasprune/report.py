"""The study report of a sweep: one table of every model's quality, cost and fairness, with figures.

    python -m biasprune.report outputs/grid                  # writes outputs/grid/report/
    python -m biasprune.report 3f2c...e1 --tracking-uri sqlite:///mlflow/mlflow.db --steps 200

The input is a sweep's output folder (its ``trials.parquet``, see `biasprune.results`) or the
MLflow run id of a sweep's parent run, whose child runs carry the same params and metrics as the
Parquet rows. The report folder receives:

- ``report.md`` and ``report.html`` (self-contained: the figures are embedded as data URIs);
- ``quality_vs_ratio.png``, ``fairness_vs_ratio.png``, ``shares.png`` and, when the sweep has
  several fine-tuning milestones, ``finetune_steps.png``;
- ``share_tests.csv``: every share comparison behind the significance marks.

The table has one column per model: the dataset reference (the shares of the dataset's labels,
from the row columns ``reference_share_data_labels_<attribute>_<group>``), the dense model, then
each pruner × pruning ratio at one fine-tuning milestone. Its row blocks are the model
statistics, the group shares of each attribute, the study's ratios with ``fairness_divergence``
and the sampling settings.

A pruned model's share that differs from the dense model's is marked ``*`` when a pooled
two-proportion z-test (`two_proportion_z_test`), adjusted by Holm–Bonferroni over every share
comparison of the table (`holm_bonferroni`), rejects equal proportions at α = 0.05. The counts are
share × images with a known label, that is ``num_samples`` × (1 − ``unknown_rate_<attribute>``).

The files are also logged under ``report/`` as artifacts of the sweep's MLflow parent run when
that run can be found.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.05
"""Family-wise error rate of the significance marks."""

DENSE = "dense"
"""Pruner name of the unpruned baseline row (`biasprune.config.DENSE`, which imports torch)."""

STATUS_FINISHED = "finished"
STATUS_FAILED = "failed"
NOT_RUN = "not run"

REPORT_DIRNAME = "report"
"""Folder of the report inside a sweep's output folder."""

ARTIFACT_PATH = "report"
"""Folder of the report among the artifacts of the sweep's parent run; a report at another
milestone than the largest goes to ``report-steps<N>`` beside it."""

MARKDOWN_FILENAME = "report.md"
HTML_FILENAME = "report.html"
TESTS_FILENAME = "share_tests.csv"
QUALITY_FIGURE = "quality_vs_ratio.png"
FAIRNESS_FIGURE = "fairness_vs_ratio.png"
SHARES_FIGURE = "shares.png"
STEPS_FIGURE = "finetune_steps.png"

DATASET_REFERENCE = "data_labels"
"""Reference whose shares fill the dataset column: the labels of the training images."""

_PLUS_TOKEN = re.compile(r"(?<=\d)plus$")


def group_label(token: str) -> str:
    """Return a group's name for display from its metric-key token (`50plus` → `50+`)."""
    return _PLUS_TOKEN.sub("+", token)


REFERENCE_SHARE_PREFIX = "reference_share_"
"""Prefix of the row columns ``reference_share_<reference>_<attribute>_<group>``."""

SIGNIFICANCE_MARK = "*"
NOT_AVAILABLE = "n/a"
NOT_APPLICABLE = "—"

PRUNER_ORDER = ("diff-pruning", "taylor", "l1", "random")
"""Column order of the pruners of `biasprune.pruning`; other pruners follow in name order."""

STUDY_RATIO_GROUPS = {
    "gender": (("male",), ("female",)),
    "race": (("white",), ("black",)),
    "age": (("10-49",), None),
}
"""Groups of ``ratio_<attribute>`` (numerator, denominator; None means every other group), as
`biasprune.trial` configures them. Used only to compute the dataset column's ratios; groups
are matched without regard to case."""

_NUMERIC_PARAMS = {"pruning_ratio": float, "eta": float, "finetune_steps": int, "seed": int,
                   "num_samples": int, "sampler_steps": int}  # fmt: skip
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_FIGURE_DPI = 100


class ReportError(ValueError):
    """The report's input is not a usable sweep; the message names the value and the fix."""


# --- statistics ----------------------------------------------------------------------------------


def two_proportion_z_test(successes_a: float, total_a: float, successes_b: float, total_b: float) -> tuple[float, float]:
    """Test whether two proportions are equal with a pooled two-proportion z-test.

    z = (p_a − p_b) / sqrt(p·(1 − p)·(1/n_a + 1/n_b)) with p = (x_a + x_b) / (n_a + n_b), and the
    p-value is two-sided from the standard normal. z² equals the Pearson chi-square statistic of
    the 2×2 table without continuity correction, so the p-value equals
    ``scipy.stats.chi2_contingency(table, correction=False).pvalue``.

    Args:
        successes_a: Count x_a of the first sample in the group.
        total_a: Size n_a of the first sample.
        successes_b: Count x_b of the second sample.
        total_b: Size n_b of the second sample.

    Returns:
        (z, two-sided p-value). Both proportions 0 or both 1 give (0, 1). An empty sample gives
        (NaN, NaN).

    Raises:
        ValueError: A count is negative or larger than its sample.
    """
    for successes, total in ((successes_a, total_a), (successes_b, total_b)):
        if not 0 <= successes <= total:
            raise ValueError(f"counts must satisfy 0 <= successes <= total, got {successes} of {total}")
    if total_a == 0 or total_b == 0:
        return math.nan, math.nan
    pooled = (successes_a + successes_b) / (total_a + total_b)
    variance = pooled * (1.0 - pooled) * (1.0 / total_a + 1.0 / total_b)
    if variance <= 0.0:
        return 0.0, 1.0
    z = (successes_a / total_a - successes_b / total_b) / math.sqrt(variance)
    return z, float(2.0 * stats.norm.sf(abs(z)))


def holm_bonferroni(p_values: Sequence[float], alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Adjust p-values for multiple comparisons with the Holm–Bonferroni step-down method.

    With the m defined p-values sorted ascending, p_(i) becomes max over j ≤ i of
    min(1, (m − j + 1)·p_(j)). A hypothesis is rejected when its adjusted value is at most
    ``alpha``, which controls the family-wise error rate at ``alpha``.

    Args:
        p_values: One p-value per comparison; NaN marks a comparison that could not be made and
            does not count in m.
        alpha: Family-wise error rate, in (0, 1). Default 0.05.

    Returns:
        (adjusted p-values, rejected) in the input order; NaN inputs stay NaN and are not rejected.

    Raises:
        ValueError: ``alpha`` is outside (0, 1) or a p-value is outside [0, 1].
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    values = np.asarray(p_values, dtype=float)
    defined = ~np.isnan(values)
    if np.any((values[defined] < 0.0) | (values[defined] > 1.0)):
        raise ValueError(f"p-values must lie in [0, 1], got {values[defined].tolist()}")
    adjusted = np.full(values.shape, np.nan)
    index = np.flatnonzero(defined)
    order = index[np.argsort(values[index], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, position in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[position]))
        adjusted[position] = running
    rejected = np.where(defined, adjusted <= alpha, False)
    return adjusted, rejected


# --- loading -------------------------------------------------------------------------------------


@dataclass
class SweepRecords:
    """The rows of one sweep and where they came from.

    Attributes:
        frame: One row per evaluated point, with the columns of ``trials.parquet``.
        source: The folder or run id the rows were read from, as text for the report.
        sweep_dir: The sweep's output folder; None for rows read from MLflow.
        parent_run_id: The sweep's MLflow parent run, when known.
        tracking_uri: The tracking store of ``parent_run_id``.
        name: The sweep's name (parent run name, else the folder name).
    """

    frame: pd.DataFrame
    source: str
    sweep_dir: Path | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    name: str = ""


def load_sweep_dir(path: str | os.PathLike) -> SweepRecords:
    """Read the trials table of a sweep's output folder.

    Args:
        path: The folder that contains ``trials.parquet`` (the file itself also works).

    Raises:
        ReportError: No such folder, or it contains no ``trials.parquet``, or the table is unreadable.
    """
    from biasprune.results import TRIALS_FILENAME, read_trials

    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == TRIALS_FILENAME:
        folder = folder.parent
    if not folder.is_dir():
        raise ReportError(f"{str(path)!r} is not a folder; pass a sweep's output folder (for example outputs/grid)")
    table = folder / TRIALS_FILENAME
    if not table.is_file():
        raise ReportError(
            f"{str(path)!r} is not a sweep output folder: it has no {TRIALS_FILENAME}; pass the output_dir "
            "of a grid sweep (for example outputs/grid) or the MLflow run id of its parent run"
        )
    try:
        frame = read_trials(table)
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read {table}: {err}; rerun the sweep to rewrite it") from err
    return SweepRecords(frame, str(folder.resolve()), sweep_dir=folder.resolve(), name=folder.resolve().name)


def load_mlflow_run(run_id: str, tracking_uri: str) -> SweepRecords:
    """Read a sweep's points from the child runs of its MLflow parent run.

    Params become typed columns (`_NUMERIC_PARAMS`), metrics float columns (infinite values
    restored from the tag ``biasprune.infinite_metrics``), and the run status becomes
    ``status`` (``finished`` or ``failed``, with the tag ``biasprune.error`` as ``error``). A
    point with several runs keeps its newest finished run, else its newest failed run.

    Args:
        run_id: The parent run's id (tag ``biasprune.kind = sweep``).
        tracking_uri: The tracking store.

    Raises:
        ReportError: The store does not exist, the run does not exist, or it is not a sweep's parent run.
    """
    from mlflow.exceptions import MlflowException

    from biasprune import tracking

    client = _client(tracking_uri, required=True)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ReportError(
            f"no MLflow run with id {run_id!r} in {tracking_uri}; pass the id of a sweep's parent run "
            "(tag biasprune.kind = sweep), or its output folder, and check --tracking-uri"
        ) from err
    kind = run.data.tags.get(tracking.TAG_KIND)
    if kind != "sweep":
        parent = run.data.tags.get(tracking.TAG_PARENT)
        hint = f"; pass its parent run {parent}" if parent else ""
        raise ReportError(f"MLflow run {run_id!r} is not a sweep's parent run (its biasprune.kind is {kind!r}){hint}")
    query = f"tags.`{tracking.TAG_PARENT}` = '{run_id}'"
    children = _search_all(client, [run.info.experiment_id], query, ["attributes.start_time ASC"])
    rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for child in children:
        row = _row_of_run(child, tracking)
        if row is None:
            continue
        key = child.data.tags.get(tracking.TAG_POINT_KEY, child.info.run_id)
        rank = 1 if row["status"] == STATUS_FINISHED else 0
        if key not in rows or rank >= rows[key][0]:  # newest run of the best status wins
            rows[key] = (rank, row)
    if not rows:
        raise ReportError(
            f"MLflow run {run_id!r} has no finished or failed point runs; run the sweep "
            "(python sweeps/grid.py) until at least one point finishes"
        )
    frame = pd.DataFrame([row for _, row in rows.values()])
    return SweepRecords(frame, f"MLflow run {run_id}", parent_run_id=run_id, tracking_uri=tracking_uri,
                        name=run.info.run_name or run_id)  # fmt: skip


def _row_of_run(run, tracking) -> dict[str, Any] | None:
    status = {tracking.FINISHED: STATUS_FINISHED, tracking.FAILED: STATUS_FAILED}.get(run.info.status)
    if status is None:
        logger.warning("skipping point run %s: its status is %s", run.info.run_id, run.info.status)
        return None
    row: dict[str, Any] = {}
    for key, value in run.data.params.items():
        row[key] = _typed_param(key, value)
    row.update({key: float(value) for key, value in run.data.metrics.items()})
    for item in filter(None, run.data.tags.get(tracking.TAG_INFINITE, "").split(",")):
        key, _, sign = item.partition("=")
        if key in row:
            row[key] = -math.inf if sign.startswith("-") else math.inf
    row["status"] = status
    row["error"] = run.data.tags.get(tracking.TAG_ERROR, "") if status == STATUS_FAILED else ""
    return row


def _typed_param(key: str, value: str) -> Any:
    kind = _NUMERIC_PARAMS.get(key)
    if kind is None:
        return value
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        return value


def _client(tracking_uri: str, required: bool):
    """Return an MlflowClient, or None (or ReportError when required) for a SQLite store that does not exist."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            if required:
                raise ReportError(
                    f"no MLflow store at {database} (tracking URI {tracking_uri}); pass the store the "
                    "sweep logged to with --tracking-uri"
                )
            return None
    return MlflowClient(tracking_uri)


def _search_all(client, experiment_ids: list[str], query: str, order_by: list[str] | None = None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --- the parent run of a sweep folder ------------------------------------------------------------


def find_parent_run(client, records: SweepRecords) -> str | None:
    """Find the MLflow parent run of a sweep read from its output folder.

    First the sweep key computed from the Hydra config the sweep saved (``*/.hydra/config.yaml``)
    is looked up as the tag ``biasprune.sweep_key`` of a parent run. That key changes when the
    config schema gains a field, so otherwise the finished rows' ``evaluation_key`` params are
    looked up among point runs. The parent run whose children match the most rows wins. Ties go
    to the parent with the fewest extra points, then to the newest.

    Returns:
        The parent run's id, or None when no run matches.
    """
    from biasprune import tracking

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    for key in _config_sweep_keys(records.sweep_dir):
        query = f"tags.`{tracking.TAG_KIND}` = 'sweep' and tags.`{tracking.TAG_SWEEP_KEY}` = '{key}'"
        parents = _search_all(client, experiments, query, ["attributes.start_time ASC"])
        if parents:
            logger.debug("parent run %s found by the sweep key %s of the saved config", parents[0].info.run_id, key)
            return parents[0].info.run_id
    return _parent_by_evaluation_keys(client, experiments, records.frame, tracking)


def _config_sweep_keys(sweep_dir: Path | None) -> list[str]:
    if sweep_dir is None:
        return []
    keys = []
    for path in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        try:
            from omegaconf import OmegaConf

            from biasprune.sweep import sweep_key, to_grid_config

            keys.append(sweep_key(to_grid_config(OmegaConf.load(path))))
        except Exception as err:  # a config of an older schema: fall back to the evaluation keys
            logger.debug("no sweep key from %s: %s", path, err)
    return keys


def _parent_by_evaluation_keys(client, experiments: list[str], frame: pd.DataFrame, tracking) -> str | None:
    if "evaluation_key" not in frame:
        return None
    finished = frame[frame["status"] == STATUS_FINISHED]
    points = {_point_text(r): r["evaluation_key"] for r in _records(finished) if r.get("evaluation_key")}
    matches: dict[str, set[str]] = {}
    for point, evaluation_key in points.items():
        if "'" in evaluation_key or "\\" in evaluation_key:
            continue
        query = (f"params.evaluation_key = '{evaluation_key}' and tags.`{tracking.TAG_KIND}` = 'point' "
                 f"and attributes.status = '{tracking.FINISHED}'")  # fmt: skip
        for run in _search_all(client, experiments, query):
            parent = run.data.tags.get(tracking.TAG_PARENT)
            if parent and run.data.tags.get(tracking.TAG_POINT_KEY) == point:
                matches.setdefault(parent, set()).add(point)
    if not matches:
        return None

    def rank(parent: str) -> tuple[int, int, int]:
        run = client.get_run(parent)
        query = f"tags.`{tracking.TAG_PARENT}` = '{parent}' and attributes.status = '{tracking.FINISHED}'"
        children = {r.data.tags.get(tracking.TAG_POINT_KEY) for r in _search_all(client, [run.info.experiment_id], query)}
        return len(matches[parent]), -len(children - set(points)), run.info.start_time or 0

    return max(matches, key=rank)


def _point_text(row: dict[str, Any]) -> str:
    return f"{row['pruner']}|{float(row['pruning_ratio']):.12g}|{int(row['finetune_steps'])}"


# --- the table -----------------------------------------------------------------------------------


@dataclass
class ModelColumn:
    """One column of the table.

    Attributes:
        label: Column header, e.g. ``dataset``, ``dense`` or ``l1 0.5``.
        kind: ``dataset``, ``dense`` or ``pruned``.
        row: The point's result row; None for the dataset column and for a point not run.
        pruner: The pruner (``dense`` for the dense model); None for the dataset.
        ratio: The pruning ratio; None for the dataset.
    """

    label: str
    kind: str
    row: dict[str, Any] | None = None
    pruner: str | None = None
    ratio: float | None = None

    @property
    def status(self) -> str:
        """``finished``, ``failed`` or ``not run`` (the dataset column counts as finished)."""
        if self.kind == "dataset":
            return STATUS_FINISHED
        return NOT_RUN if self.row is None else str(self.row.get("status") or STATUS_FINISHED)


@dataclass
class TableRow:
    """One row of the table: ``key`` identifies it (a column name of the trials table or ``quality``)."""

    key: str
    label: str
    cells: list[str]


@dataclass
class TableBlock:
    """A titled group of rows, such as the shares of one attribute."""

    title: str
    rows: list[TableRow]


@dataclass
class StudyTable:
    """The report's table, its footnotes and the share comparisons behind its marks.

    Attributes:
        columns: Dataset, dense, then each pruner × ratio.
        blocks: Row blocks in display order.
        footnotes: Notes printed under the table.
        steps: The fine-tuning milestone of the pruned columns; None when the sweep has no pruned point.
        milestones: Every milestone of the pruned points.
        attributes: Group tokens per attribute, in table order.
        comparisons: One row per pruned share compared with the dense share (see `share_comparisons`).
        alpha: Family-wise error rate of the marks.
    """

    columns: list[ModelColumn]
    blocks: list[TableBlock]
    footnotes: list[str]
    steps: int | None
    milestones: list[int]
    attributes: dict[str, list[str]]
    comparisons: pd.DataFrame
    alpha: float = DEFAULT_ALPHA

    def cell(self, key: str, column: str) -> str:
        """Return the text of the cell in row ``key`` and the column labelled ``column``.

        Raises:
            KeyError: No such row or column.
        """
        labels = [c.label for c in self.columns]
        if column not in labels:
            raise KeyError(f"no column {column!r}; the columns are {labels}")
        for block in self.blocks:
            for row in block.rows:
                if row.key == key:
                    return row.cells[labels.index(column)]
        raise KeyError(f"no row {key!r}; the rows are {[r.key for b in self.blocks for r in b.rows]}")


def sweep_attributes(columns: Sequence[str]) -> dict[str, list[str]]:
    """Return the group tokens of each attribute, read from ``share_<attribute>_<group>`` columns.

    Attributes are taken from the ``unknown_rate_<attribute>`` columns, so that an attribute or a
    group token with an underscore splits correctly. Without them a share column splits at its
    first underscore after ``share_``. Groups keep the order of the columns.
    """
    names = [str(c) for c in columns]
    known = sorted((c.removeprefix("unknown_rate_") for c in names if c.startswith("unknown_rate_")), key=len, reverse=True)
    attributes: dict[str, list[str]] = {}
    for name in names:
        if not name.startswith("share_"):
            continue
        rest = name.removeprefix("share_")
        attribute = next((a for a in known if rest.startswith(f"{a}_")), None)
        if attribute is None:
            if known or "_" not in rest:
                continue
            attribute = rest.split("_", 1)[0]
        attributes.setdefault(attribute, []).append(rest.removeprefix(f"{attribute}_"))
    return attributes


def known_label_count(row: dict[str, Any], attribute: str) -> float:
    """Return how many images of a point have a known label for ``attribute``.

    That is ``num_samples`` × (1 − ``unknown_rate_<attribute>``), rounded; without the unknown
    rate, ``num_samples``; NaN when ``num_samples`` is missing.
    """
    total = _number(row.get("num_samples"))
    if math.isnan(total):
        return math.nan
    unknown = _number(row.get(f"unknown_rate_{attribute}"))
    return float(round(total * (1.0 - unknown))) if not math.isnan(unknown) else float(round(total))


def share_comparisons(
    columns: Sequence[ModelColumn], attributes: dict[str, list[str]], alpha: float = DEFAULT_ALPHA
) -> pd.DataFrame:
    """Compare every finished pruned model's group shares with the dense model's.

    Each comparison is a `two_proportion_z_test` on the counts round(share × known) and known =
    `known_label_count`; the p-values are adjusted together with `holm_bonferroni`.

    Args:
        columns: The table's columns; the dense column and the pruned columns are used.
        attributes: Group tokens per attribute.
        alpha: Family-wise error rate. Default 0.05.

    Returns:
        One row per comparison: ``model``, ``attribute``, ``group``, ``share``, ``dense_share``,
        ``count``, ``known``, ``dense_count``, ``dense_known``, ``z``, ``p_value``, ``p_holm``
        and ``significant``. Empty when the dense model did not finish.
    """
    names = ["model", "attribute", "group", "share", "dense_share", "count", "known", "dense_count",
             "dense_known", "z", "p_value", "p_holm", "significant"]  # fmt: skip
    dense = next((c for c in columns if c.kind == "dense" and c.status == STATUS_FINISHED), None)
    records = []
    for column in columns:
        if dense is None or column.kind != "pruned" or column.status != STATUS_FINISHED:
            continue
        for attribute, groups in attributes.items():
            known, dense_known = known_label_count(column.row, attribute), known_label_count(dense.row, attribute)
            for group in groups:
                share = _number(column.row.get(f"share_{attribute}_{group}"))
                dense_share = _number(dense.row.get(f"share_{attribute}_{group}"))
                count, dense_count = _count(share, known), _count(dense_share, dense_known)
                z = p_value = math.nan
                if not any(math.isnan(v) for v in (count, known, dense_count, dense_known)):
                    z, p_value = two_proportion_z_test(count, known, dense_count, dense_known)
                records.append([column.label, attribute, group, share, dense_share, count, known,
                                dense_count, dense_known, z, p_value])  # fmt: skip
    frame = pd.DataFrame(records, columns=names[:-2])
    adjusted, rejected = holm_bonferroni(frame["p_value"].to_numpy(float), alpha)
    frame["p_holm"] = adjusted
    frame["significant"] = rejected.astype(bool)
    return frame


def build_table(
    frame: pd.DataFrame,
    steps: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    dataset_reference: str = DATASET_REFERENCE,
) -> StudyTable:
    """Build the study table of a sweep's rows.

    Args:
        frame: One row per evaluated point, as `biasprune.results.read_trials` returns them.
        steps: Fine-tuning milestone of the pruned columns. Default: the largest milestone present.
        alpha: Family-wise error rate of the significance marks. Default 0.05.
        dataset_reference: Reference whose ``reference_share_<reference>_*`` columns fill the
            dataset column. Default ``data_labels``.

    Raises:
        ReportError: The rows lack the point columns, no point finished, or ``steps`` is not a
            milestone of the sweep.
    """
    rows = _checked_rows(frame)
    milestones = sorted({int(r["finetune_steps"]) for r in rows if r["pruner"] != DENSE})
    if steps is None:
        steps = milestones[-1] if milestones else None
    elif int(steps) not in milestones:
        raise ReportError(f"--steps {steps} is not a fine-tuning milestone of this sweep; choose one of {milestones}")
    attributes = sweep_attributes(frame.columns)
    columns = _model_columns(rows, steps)
    comparisons = share_comparisons(columns, attributes, alpha)
    significant = comparisons.loc[comparisons["significant"], ["model", "attribute", "group"]]
    marked = set(significant.itertuples(index=False, name=None))
    dataset = _dataset_shares(rows, attributes, dataset_reference)
    notes = _Footnotes()

    blocks = [_statistics_block(columns, notes)]
    for attribute, groups in attributes.items():
        blocks.append(_share_block(columns, attribute, groups, dataset, marked, notes, dataset_reference))
    blocks.append(_fairness_block(columns, attributes, dataset, rows, notes))
    blocks.append(_sampling_block(columns))

    footnotes = notes.texts()
    footnotes.append(_significance_note(comparisons, columns, alpha))
    return StudyTable(columns, blocks, footnotes, steps, milestones, attributes, comparisons, alpha)


class _Footnotes:
    """Footnotes added once each, in the order the table first needs them."""

    def __init__(self) -> None:
        self._texts: dict[str, None] = {}

    def add(self, text: str) -> None:
        self._texts.setdefault(text, None)

    def texts(self) -> list[str]:
        return list(self._texts)


def _checked_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    missing = [c for c in ("pruner", "pruning_ratio", "finetune_steps") if c not in frame]
    if missing:
        raise ReportError(f"the trials table lacks the point column(s) {missing}; it was not written by biasprune.results")
    rows = _records(frame)
    for row in rows:
        row["status"] = row.get("status") or STATUS_FINISHED
    finished = [r for r in rows if r["status"] == STATUS_FINISHED]
    if not finished:
        errors = sorted({str(r.get("error") or "") for r in rows} - {""})
        first = f"; the first error is: {errors[0][:300]}" if errors else ""
        raise ReportError(
            f"the sweep has no finished point ({len(rows)} failed){first}. Fix the error and run the sweep again"
        )
    return rows


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if _is_missing(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _model_columns(rows: list[dict[str, Any]], steps: int | None) -> list[ModelColumn]:
    columns = [ModelColumn("dataset", "dataset")]
    dense = [r for r in rows if r["pruner"] == DENSE]
    columns.append(ModelColumn("dense", "dense", dense[0] if dense else None, DENSE, 0.0))
    pairs = sorted({(r["pruner"], float(r["pruning_ratio"])) for r in rows if r["pruner"] != DENSE}, key=_pair_order)
    by_point = {(r["pruner"], float(r["pruning_ratio"]), int(r["finetune_steps"])): r for r in rows}
    for pruner, ratio in pairs:
        columns.append(ModelColumn(f"{pruner} {ratio:.12g}", "pruned", by_point.get((pruner, ratio, steps)), pruner, ratio))
    return columns


def _pair_order(pair: tuple[str, float]) -> tuple[int, str, float]:
    pruner, ratio = pair
    return (PRUNER_ORDER.index(pruner) if pruner in PRUNER_ORDER else len(PRUNER_ORDER), pruner, ratio)


def _dataset_shares(rows: list[dict[str, Any]], attributes: dict[str, list[str]], reference: str) -> dict[str, float]:
    """Return ``<attribute>_<group>`` → the reference's share, from the first finished row that has it."""
    shares: dict[str, float] = {}
    finished = sorted((r for r in rows if r["status"] == STATUS_FINISHED), key=lambda r: r["pruner"] != DENSE)
    for attribute, groups in attributes.items():
        for group in groups:
            name = f"{REFERENCE_SHARE_PREFIX}{reference}_{attribute}_{group}"
            value = next((_number(r.get(name)) for r in finished if not math.isnan(_number(r.get(name)))), math.nan)
            if not math.isnan(value):
                shares[f"{attribute}_{group}"] = value
    return shares


def _statistics_block(columns: list[ModelColumn], notes: _Footnotes) -> TableBlock:
    metrics = {str(c.row.get("quality_metric")) for c in columns if c.row and c.row.get("quality_metric")}
    single = len(metrics) == 1
    quality_label = f"{next(iter(metrics))} ↓" if single else "quality ↓ (metric in brackets)"

    def quality(row: dict[str, Any]) -> str:
        metric = row.get("quality_metric")
        text = _format_number(_number(row.get(metric)) if metric else math.nan)
        return text if single or not metric else f"{text} ({metric})"

    if not single and metrics:
        notes.add("The points were measured with different quality metrics; each cell names its metric.")
    rows = [
        _model_row("quality", quality_label, columns, quality),
        _model_row("params", "params (M)", columns, lambda r: _format_number(_number(r.get("params")) / 1e6)),
        _model_row("macs", "MACs (G)", columns, lambda r: _format_number(_number(r.get("macs")) / 1e9)),
        _model_row("model_size_mb", "model size (MB)", columns, lambda r: _format_number(_number(r.get("model_size_mb")))),
    ]
    notes.add(f"{NOT_APPLICABLE}: not applicable to the dataset. ↓: lower is better. "
              "MACs are counted by Torch-Pruning for one image; model size is the saved weights in MiB.")  # fmt: skip
    return TableBlock("Model statistics", rows)


def _share_block(
    columns: list[ModelColumn],
    attribute: str,
    groups: list[str],
    dataset: dict[str, float],
    marked: set[tuple[str, str, str]],
    notes: _Footnotes,
    reference: str,
) -> TableBlock:
    rows = []
    for group in groups:
        cells = []
        for column in columns:
            if column.kind == "dataset":
                value = dataset.get(f"{attribute}_{group}")
                if value is None:
                    notes.add(
                        f"{NOT_AVAILABLE} in the dataset column: the trial rows have no "
                        f"{REFERENCE_SHARE_PREFIX}{reference}_<attribute>_<group> columns (sweeps recorded "
                        "before these columns existed lack them); run the sweep again to fill them."
                    )
                    cells.append(NOT_AVAILABLE)
                else:
                    cells.append(_format_percent(value))
                continue
            mark = SIGNIFICANCE_MARK if (column.label, attribute, group) in marked else ""
            cells.append(_model_cell(column, lambda r: _format_percent(_number(r.get(f"share_{attribute}_{group}"))) + mark))
        rows.append(TableRow(f"share_{attribute}_{group}", f"{group_label(group)} (%)", cells))
    rows.append(_model_row(f"unknown_rate_{attribute}", "unknown (% of images)", columns,
                           lambda r: _format_percent(_number(r.get(f"unknown_rate_{attribute}")))))  # fmt: skip
    notes.add("Shares are percentages of the images with a known label for the attribute; the dataset column "
              f"contains the shares of the dataset's labels ({reference}).")  # fmt: skip
    return TableBlock(f"{attribute} shares", rows)


def _fairness_block(
    columns: list[ModelColumn],
    attributes: dict[str, list[str]],
    dataset: dict[str, float],
    rows: list[dict[str, Any]],
    notes: _Footnotes,
) -> TableBlock:
    table_rows = []
    ratio_names = sorted({k for r in rows for k in r if k.startswith("ratio_")}, key=_ratio_order)
    for name in ratio_names:
        attribute = name.removeprefix("ratio_")
        cells = []
        for column in columns:
            if column.kind == "dataset":
                cells.append(_format_number(_dataset_ratio(dataset, attribute, attributes.get(attribute, [])), ratio=True))
            else:
                cells.append(_model_cell(column, lambda r: _format_number(_number(r.get(name)), ratio=True)))
        table_rows.append(TableRow(name, _RATIO_LABELS.get(name, name), cells))
    if ratio_names:
        notes.add("Ratios: ratio_gender = male / female, ratio_race = white / black, ratio_age = 10–49 / other "
                  "ages; ∞ when the denominator group has no image. "
                  "The dataset's ratios are computed from its shares.")  # fmt: skip

    def divergence(row: dict[str, Any]) -> str:
        value = _format_number(_number(row.get("fairness_divergence")), digits=3)
        low, high = _number(row.get("fairness_divergence_ci_low")), _number(row.get("fairness_divergence_ci_high"))
        if math.isnan(low) or math.isnan(high):
            return value
        return f"{value} [{_format_number(low, digits=3)}, {_format_number(high, digits=3)}]"

    references = sorted({str(r["reference"]) for r in rows if r.get("reference")})
    reference_text = ", ".join(references) or "the configured reference"
    table_rows.append(_model_row("fairness_divergence", "fairness divergence [95 % CI] ↓", columns, divergence))
    notes.add(f"fairness divergence: mean over the attributes of the Jensen–Shannon divergence (bits, 0–1) of "
              f"the generated shares from the reference {reference_text}, "
              "with its bootstrap 95 % interval over images.")  # fmt: skip
    table_rows.append(_model_row("unknown_rate", "unknown, any attribute (%)", columns,
                                 lambda r: _format_percent(_number(r.get("unknown_rate")))))  # fmt: skip
    return TableBlock("Fairness", table_rows)


_RATIO_LABELS = {"ratio_gender": "male / female", "ratio_race": "white / black", "ratio_age": "age 10–49 / others"}


def _ratio_order(name: str) -> tuple[int, str]:
    order = list(_RATIO_LABELS)
    return (order.index(name) if name in order else len(order), name)


def _dataset_ratio(dataset: dict[str, float], attribute: str, groups: list[str]) -> float:
    definition = STUDY_RATIO_GROUPS.get(attribute)
    if definition is None or not groups:
        return math.nan
    lower = {g.lower(): g for g in groups}
    numerator, denominator = definition
    if any(g not in lower for g in numerator) or any(g not in lower for g in denominator or ()):
        return math.nan
    bottom_groups = denominator or [g for g in lower if g not in numerator]
    values = {g: dataset.get(f"{attribute}_{lower[g]}", math.nan) for g in lower}
    top, bottom = sum(values[g] for g in numerator), sum(values[g] for g in bottom_groups)
    if math.isnan(top) or math.isnan(bottom):
        return math.nan
    if bottom == 0.0:
        return math.inf if top > 0.0 else math.nan
    return top / bottom


def _sampling_block(columns: list[ModelColumn]) -> TableBlock:
    def integer(name: str):
        return lambda r: _format_integer(_number(r.get(name)))

    rows = [
        _model_row("num_samples", "generated images", columns, integer("num_samples")),
        _model_row("sampler_steps", "DDIM steps", columns, integer("sampler_steps")),
    ]
    return TableBlock("Sampling", rows)


def _model_row(key: str, label: str, columns: list[ModelColumn], render) -> TableRow:
    """Return a row whose model cells are ``render(row)``, the dataset's not applicable."""
    return TableRow(key, label, [_model_cell(c, render) for c in columns])


def _model_cell(column: ModelColumn, render) -> str:
    if column.kind == "dataset":
        return NOT_APPLICABLE
    if column.status != STATUS_FINISHED:
        return column.status
    return render(column.row)


def _significance_note(comparisons: pd.DataFrame, columns: list[ModelColumn], alpha: float) -> str:
    text = (
        f"{SIGNIFICANCE_MARK}: the share differs from the dense model's by a two-sided pooled two-proportion "
        f"z-test with Holm–Bonferroni correction over all {len(comparisons)} share comparisons of the table, "
        f"α = {alpha:g}. Counts are share × images with a known label (num_samples × (1 − unknown_rate_<attribute>))."
    )
    dense = next(c for c in columns if c.kind == "dense")
    if dense.status != STATUS_FINISHED:
        text += f" The dense model is {dense.status}, so no share was tested."
    elif comparisons["p_value"].isna().any():
        text += " Comparisons without num_samples are not tested."
    return text


def _number(value: Any) -> float:
    if _is_missing(value) or isinstance(value, (str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _count(share: float, known: float) -> float:
    return math.nan if math.isnan(share) or math.isnan(known) else float(round(share * known))


def _format_number(value: float, digits: int = 4, ratio: bool = False) -> str:
    if math.isnan(value):
        return NOT_AVAILABLE
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if ratio:
        digits = 3
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _format_percent(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{100.0 * value:.1f}"


def _format_integer(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{int(round(value)):d}"


# --- figures -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=_FIGURE_DPI)
    return path


def _pruner_colors(pruners: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {p: palette(i % 10) for i, p in enumerate(pruners)}


def _quality_metric(rows: list[dict[str, Any]]) -> str | None:
    metrics = [r.get("quality_metric") for r in rows if r["status"] == STATUS_FINISHED and r.get("quality_metric")]
    return max(set(metrics), key=metrics.count) if metrics else None


def _quality_axis_label(metric: str) -> str:
    if metric == "fid":
        return "FID (Inception features)\nlower is better"
    return f"{metric} (Fréchet distance)\nlower is better"


def plot_quality_vs_ratio(table: StudyTable, rows: list[dict[str, Any]], path: Path) -> Path:
    """Plot the quality metric against the pruning ratio, one line per pruner, the dense model as a line."""
    metric = _quality_metric(rows) or "quality"
    figure = _figure(7.0, 4.5)
    ax = figure.subplots()
    pruned = [c for c in table.columns if c.kind == "pruned"]
    pruners = list(dict.fromkeys(c.pruner for c in pruned))
    colors = _pruner_colors(pruners)

    values = []
    for pruner in pruners:
        points = [(c.ratio, _number(c.row.get(metric))) for c in pruned
                  if c.pruner == pruner and c.status == STATUS_FINISHED and c.row.get("quality_metric") == metric]  # fmt: skip
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=colors[pruner], label=pruner)
            values.extend(ys)
        _mark_failed(ax, [c.ratio for c in pruned if c.pruner == pruner and c.status == STATUS_FAILED], colors[pruner])

    dense = _dense_row(table)
    if dense is not None and math.isfinite(_number(dense.get(metric))):
        ax.axhline(_number(dense.get(metric)), color="black", linestyle="--", label="dense")
        values.append(_number(dense.get(metric)))
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")

    ax.set_xlabel("pruning ratio (fraction of channels removed)")
    ax.set_ylabel(_quality_axis_label(metric))
    ax.set_title(f"Quality after {table.steps} fine-tuning steps")
    ax.grid(alpha=0.3)
    ax.legend(title="pruner")
    return _save(figure, path)


def plot_fairness_vs_ratio(table: StudyTable, rows: list[dict[str, Any]], path: Path) -> Path:
    """Plot ``fairness_divergence`` against the pruning ratio per pruner, with the 95 % intervals as error bars."""
    figure = _figure(7.0, 4.5)
    ax = figure.subplots()
    pruned = [c for c in table.columns if c.kind == "pruned"]
    pruners = list(dict.fromkeys(c.pruner for c in pruned))
    colors = _pruner_colors(pruners)
    offsets = {p: (i - (len(pruners) - 1) / 2) * 0.008 for i, p in enumerate(pruners)}  # keeps error bars apart
    for pruner in pruners:
        finished = [c for c in pruned if c.pruner == pruner and c.status == STATUS_FINISHED]
        xs = [c.ratio + offsets[pruner] for c in finished]
        ys = np.array([_number(c.row.get("fairness_divergence")) for c in finished])
        low = np.array([_number(c.row.get("fairness_divergence_ci_low")) for c in finished])
        high = np.array([_number(c.row.get("fairness_divergence_ci_high")) for c in finished])
        errors = np.nan_to_num(np.vstack([ys - low, high - ys]).clip(min=0.0)) if len(finished) else None
        if len(finished):
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, color=colors[pruner], label=pruner)
        _mark_failed(ax, [c.ratio for c in pruned if c.pruner == pruner and c.status == STATUS_FAILED], colors[pruner])

    dense = _dense_row(table)
    if dense is not None and math.isfinite(_number(dense.get("fairness_divergence"))):
        ax.axhline(_number(dense.get("fairness_divergence")), color="black", linestyle="--", label="dense")
        low, high = _number(dense.get("fairness_divergence_ci_low")), _number(dense.get("fairness_divergence_ci_high"))
        if math.isfinite(low) and math.isfinite(high):
            ax.axhspan(low, high, color="black", alpha=0.1, label="dense 95 % interval")

    reference = next((r.get("reference") for r in rows if r.get("reference")), "the reference")
    ax.set_xlabel("pruning ratio (fraction of channels removed)")
    ax.set_ylabel(f"fairness divergence (bits, mean JS vs {reference})")
    ax.set_title(f"Fairness divergence after {table.steps} fine-tuning steps (lower is fairer)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(title="pruner")
    return _save(figure, path)


def _mark_failed(ax, ratios: list[float], color: Any) -> None:
    for ratio in ratios:
        ax.axvline(ratio, color=color, linestyle=":", alpha=0.6)
        ax.annotate("failed", (ratio, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize="small", color=color)  # fmt: skip


def _dense_row(table: StudyTable) -> dict[str, Any] | None:
    dense = next(c for c in table.columns if c.kind == "dense")
    return dense.row if dense.status == STATUS_FINISHED else None


def plot_shares(table: StudyTable, path: Path) -> Path:
    """Plot each attribute's group shares as stacked bars, one bar per model of the table."""
    attributes = table.attributes
    labels = [c.label for c in table.columns]
    figure = _figure(max(6.5, 1.6 + 0.75 * len(labels)), 0.6 + 2.9 * max(1, len(attributes)))
    axes = figure.subplots(max(1, len(attributes)), 1, squeeze=False)[:, 0]
    x = np.arange(len(labels))
    for ax, (attribute, groups) in zip(axes, attributes.items()):
        matrix = np.full((len(groups), len(labels)), np.nan)
        for j, column in enumerate(table.columns):
            for i, group in enumerate(groups):
                if column.kind == "dataset":
                    matrix[i, j] = _cell_share(table, f"share_{attribute}_{group}", column.label)
                elif column.status == STATUS_FINISHED:
                    matrix[i, j] = 100.0 * _number(column.row.get(f"share_{attribute}_{group}"))
        bottom = np.zeros(len(labels))
        colors = _group_colors(len(groups))
        for i, group in enumerate(groups):
            heights = np.nan_to_num(matrix[i])
            ax.bar(x, heights, 0.7, bottom=bottom, label=group_label(group), color=colors[i], edgecolor="white",
                   linewidth=0.5)  # fmt: skip
            bottom += heights
        for j, column in enumerate(table.columns):
            if np.all(np.isnan(matrix[:, j])):
                text = column.status if column.kind != "dataset" else NOT_AVAILABLE
                ax.text(j, 50, text, ha="center", va="center", rotation=90, fontsize="small", color="dimgray")
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of images (%)")
        ax.set_title(f"{attribute} (among images with a known {attribute})")
        ax.legend(title=f"{attribute} group", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    axes[-1].set_xlabel(f"model (pruner and pruning ratio, after {table.steps} fine-tuning steps)")
    return _save(figure, path)


def _cell_share(table: StudyTable, key: str, column: str) -> float:
    text = table.cell(key, column).rstrip(SIGNIFICANCE_MARK)
    try:
        return float(text)
    except ValueError:
        return math.nan


def _group_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def plot_finetune_steps(table: StudyTable, rows: list[dict[str, Any]], path: Path) -> Path:
    """Plot quality and fairness divergence against the fine-tuning steps, one line per pruner × ratio."""
    metric = _quality_metric(rows) or "quality"
    figure = _figure(11.0, 4.6)
    quality_ax, fairness_ax = figure.subplots(1, 2)
    pruned = [c for c in table.columns if c.kind == "pruned"]
    pruners = list(dict.fromkeys(c.pruner for c in pruned))
    colors = _pruner_colors(pruners)
    ratios = sorted({c.ratio for c in pruned})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    finished = [r for r in rows if r["status"] == STATUS_FINISHED]

    quality_values = []
    for column in pruned:
        points = sorted((int(r["finetune_steps"]), r) for r in finished
                        if r["pruner"] == column.pruner and float(r["pruning_ratio"]) == column.ratio)  # fmt: skip
        if not points:
            continue
        index = ratios.index(column.ratio)
        style = dict(color=colors[column.pruner], linestyle=styles[index % len(styles)],
                     marker=markers[index % len(markers)], label=column.label)  # fmt: skip
        steps = [s for s, _ in points]
        quality = [_number(r.get(metric)) if r.get("quality_metric") == metric else math.nan for _, r in points]
        quality_ax.plot(steps, quality, **style)
        quality_values.extend(v for v in quality if math.isfinite(v))
        fairness_ax.plot(steps, [_number(r.get("fairness_divergence")) for _, r in points], **style)

    dense = _dense_row(table)
    if dense is not None:
        for ax, value in ((quality_ax, _number(dense.get(metric))), (fairness_ax, _number(dense.get("fairness_divergence")))):
            if math.isfinite(value):
                ax.axhline(value, color="black", linestyle="--", label="dense")
        if math.isfinite(_number(dense.get(metric))):
            quality_values.append(_number(dense.get(metric)))
    positive = [v for v in quality_values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        quality_ax.set_yscale("log")

    quality_ax.set_ylabel(_quality_axis_label(metric))
    reference = next((r.get("reference") for r in rows if r.get("reference")), "the reference")
    fairness_ax.set_ylabel(f"fairness divergence (bits, mean JS vs {reference})")
    fairness_ax.set_ylim(bottom=0.0)
    for ax, title in ((quality_ax, "Quality"), (fairness_ax, "Fairness divergence")):
        ax.set_xlabel("fine-tuning steps (optimizer steps)")
        ax.set_xticks(table.milestones)
        ax.set_title(f"{title} against fine-tuning steps")
        ax.grid(alpha=0.3)
    fairness_ax.legend(title="pruner, ratio", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return _save(figure, path)


# --- rendering -----------------------------------------------------------------------------------


def _header_lines(records: SweepRecords, table: StudyTable, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    finished = sum(r["status"] == STATUS_FINISHED for r in rows)
    failed = sum(r["status"] == STATUS_FAILED for r in rows)
    first = next((r for r in rows if r["status"] == STATUS_FINISHED), {})
    lines = [("source", records.source)]
    if records.parent_run_id:
        lines.append(("MLflow parent run", f"{records.parent_run_id} ({records.tracking_uri})"))
    labels = {"world": "world", "model": "model", "quality_metric": "quality metric", "reference": "fairness reference"}
    for key, label in labels.items():
        if first.get(key):
            lines.append((label, str(first[key])))
    if table.steps is None:
        steps = "no pruned point"
    else:
        steps = f"{table.steps} (milestones of the sweep: {', '.join(map(str, table.milestones))})"
    lines.append(("fine-tuning steps of the pruned columns", steps))
    lines.append(("points", f"{finished} finished, {failed} failed"))
    return lines


def _failures(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    failed = [r for r in rows if r["status"] == STATUS_FAILED]
    return [
        (f"{r['pruner']} {float(r['pruning_ratio']):.12g}, {int(r['finetune_steps'])} steps", _short(str(r.get("error") or "")))
        for r in failed
    ]


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(records: SweepRecords, table: StudyTable, rows: list[dict[str, Any]], figures: dict[str, Path]) -> str:
    """Return the report as Markdown; figures are linked by their file names."""
    lines = [f"# Study report: {records.name}", ""]
    lines += [f"- {label}: {_md(value)}" for label, value in _header_lines(records, table, rows)]
    lines += ["", "## Quality, cost and fairness of every model", ""]
    header = ["", *(c.label for c in table.columns)]
    lines.append("| " + " | ".join(_md(h) for h in header) + " |")
    lines.append("|" + "---|" + "---:|" * len(table.columns))
    for block in table.blocks:
        lines.append("| " + " | ".join([f"**{_md(block.title)}**", *[""] * len(table.columns)]) + " |")
        for row in block.rows:
            lines.append("| " + " | ".join(_md(v) for v in [row.label, *row.cells]) + " |")
    lines.append("")
    lines += [f"{i}. {_md(note)}" for i, note in enumerate(table.footnotes, 1)]
    failures = _failures(rows)
    if failures:
        lines += ["", "## Failed points", ""]
        lines += [f"- {_md(point)}: `{error.replace('`', chr(39))}`" for point, error in failures]
    if figures:
        lines += ["", "## Figures", ""]
        for title, path in figures.items():
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 3px 9px; border-bottom: 1px solid #ddd; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td.label { text-align: left; white-space: nowrap; }
thead th { background: #f2f2f2; position: sticky; top: 0; }
tr.block th { text-align: left; background: #fafafa; padding-top: 10px; }
td.failed { color: #b00; }
td.marked { font-weight: bold; }
.scroll { overflow-x: auto; }
ol.notes { font-size: 13px; color: #444; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dt { font-weight: 600; }
"""


def render_html(records: SweepRecords, table: StudyTable, rows: list[dict[str, Any]], figures: dict[str, Path]) -> str:
    """Return the report as one HTML page with the figures embedded as PNG data URIs."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Study report: {e(records.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Study report: {e(records.name)}</h1><dl>"]  # fmt: skip
    parts += [f"<dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in _header_lines(records, table, rows)]

    parts.append("</dl><h2>Quality, cost and fairness of every model</h2><div class=scroll><table><thead><tr><th></th>")
    parts += [f"<th>{e(c.label)}</th>" for c in table.columns]
    parts.append("</tr></thead><tbody>")
    for block in table.blocks:
        parts.append(f'<tr class=block><th colspan="{len(table.columns) + 1}">{e(block.title)}</th></tr>')
        for row in block.rows:
            parts.append(f"<tr><td class=label>{e(row.label)}</td>")
            for cell in row.cells:
                if cell in (STATUS_FAILED, NOT_RUN):
                    parts.append(f"<td class=failed>{e(cell)}</td>")
                elif cell.endswith(SIGNIFICANCE_MARK):
                    parts.append(f"<td class=marked>{e(cell)}</td>")
                else:
                    parts.append(f"<td>{e(cell)}</td>")
            parts.append("</tr>")
    parts.append("</tbody></table></div><ol class=notes>")

    parts += [f"<li>{e(note)}</li>" for note in table.footnotes]
    parts.append("</ol>")
    failures = _failures(rows)
    if failures:
        parts.append("<h2>Failed points</h2><ul>")
        parts += [f"<li>{e(point)}: <code>{e(error)}</code></li>" for point, error in failures]
        parts.append("</ul>")
    if figures:
        parts.append("<h2>Figures</h2>")
    for title, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<h3>{e(title)}</h3><img alt="{e(title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    """Files and table written by `write_report`.

    Attributes:
        output_dir: The report folder.
        files: Every file written, by name.
        table: The study table.
        parent_run_id: The MLflow run the files were logged to; None when they were not logged.
    """

    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    table: StudyTable | None = None
    parent_run_id: str | None = None

    @property
    def html(self) -> Path:
        """The HTML page of the report."""
        return self.files[HTML_FILENAME]


def write_report(
    source: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> Report:
    """Write the study report of a sweep and log it to the sweep's MLflow parent run.

    Args:
        source: A sweep's output folder, or the MLflow run id of a sweep's parent run.
        output_dir: Report folder. Default: ``<sweep folder>/report``, or
            ``outputs/reports/<run id>`` under the working directory for a run id.
        steps: Fine-tuning milestone of the pruned columns. Default: the largest milestone.
        tracking_uri: MLflow tracking store. Default: the sweep's saved ``tracking.uri``, else
            `biasprune.tracking.default_tracking_uri`.
        parent_run_id: The sweep's parent run, when the caller knows it; otherwise it is looked
            up (`find_parent_run`). A folder whose parent run is not found still gets its files,
            and a warning is logged.
        alpha: Family-wise error rate of the significance marks. Default 0.05.

    Returns:
        The folder, the files written and the table.

    Raises:
        ReportError: ``source`` is neither a sweep folder nor a sweep's parent run id, the sweep
            has no finished point, or ``steps`` is not one of its milestones.
    """
    text = str(source)
    if Path(text).expanduser().exists() or not _RUN_ID.fullmatch(text):
        if not Path(text).expanduser().exists():
            raise ReportError(
                f"{text!r} is neither a folder nor an MLflow run id (32 hexadecimal characters); pass a sweep's "
                "output folder (for example outputs/grid) or the run id of its MLflow parent run"
            )
        records = load_sweep_dir(text)
        records.tracking_uri = tracking_uri or _saved_tracking_uri(records.sweep_dir) or _default_uri()
    else:
        records = load_mlflow_run(text, tracking_uri or _default_uri())
    if parent_run_id:
        records.parent_run_id = parent_run_id
    folder = Path(output_dir) if output_dir else (
        records.sweep_dir / REPORT_DIRNAME if records.sweep_dir else Path.cwd() / "outputs" / "reports" / text)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)

    table = build_table(records.frame, steps=steps, alpha=alpha)
    rows = _checked_rows(records.frame)
    if records.sweep_dir is not None and records.parent_run_id is None:
        records.parent_run_id = _lookup_parent(records)
    if records.sweep_dir is not None and records.parent_run_id:
        records.name = _run_name(records) or records.name
    figures = _write_figures(table, rows, folder)
    files = {path.name: path for path in figures.values()}
    tests_path = folder / TESTS_FILENAME
    table.comparisons.to_csv(tests_path, index=False)
    files[TESTS_FILENAME] = tests_path
    for name, content in ((MARKDOWN_FILENAME, render_markdown(records, table, rows, figures)),
                          (HTML_FILENAME, render_html(records, table, rows, figures))):  # fmt: skip
        (folder / name).write_text(content, encoding="utf-8")
        files[name] = folder / name
    logger.info("wrote the study report of %s to %s", records.source, folder)
    report = Report(folder, files, table)
    at_last_milestone = table.steps is None or not table.milestones or table.steps == max(table.milestones)
    artifact_path = ARTIFACT_PATH if at_last_milestone else f"{ARTIFACT_PATH}-steps{table.steps}"
    report.parent_run_id = _log_to_parent(records, files, artifact_path)
    return report


def _write_figures(table: StudyTable, rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    figures: dict[str, Path] = {}
    if any(c.kind == "pruned" for c in table.columns):
        figures["Quality against pruning ratio"] = plot_quality_vs_ratio(table, rows, folder / QUALITY_FIGURE)
        figures["Fairness divergence against pruning ratio"] = plot_fairness_vs_ratio(table, rows, folder / FAIRNESS_FIGURE)
    figures["Group shares of every model"] = plot_shares(table, folder / SHARES_FIGURE)
    if len(table.milestones) > 1:
        figures["Fine-tuning steps against quality and fairness"] = plot_finetune_steps(table, rows, folder / STEPS_FIGURE)
    return figures


def _saved_tracking_uri(sweep_dir: Path | None) -> str | None:
    if sweep_dir is None:
        return None
    for path in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        try:
            from omegaconf import OmegaConf

            uri = OmegaConf.select(OmegaConf.load(path), "tracking.uri")
        except Exception as err:  # an unreadable saved config only loses the default
            logger.debug("no tracking URI in %s: %s", path, err)
            continue
        if uri:
            return str(uri)
    return None


def _default_uri() -> str:
    from biasprune.tracking import default_tracking_uri

    return default_tracking_uri(Path.cwd())  # where sweeps/grid.py puts its store


def _lookup_parent(records: SweepRecords) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        client = _client(records.tracking_uri, required=False)
        if client is None:
            logger.warning("no MLflow store at %s; the report is not logged to MLflow", records.tracking_uri)
            return None
        parent = find_parent_run(client, records)
    except (MlflowException, OSError) as err:
        logger.warning("could not search %s for the sweep's parent run (%s); the report is not logged to MLflow",
                       records.tracking_uri, err)  # fmt: skip
        return None
    if parent is None:
        logger.warning(
            "no MLflow parent run of the sweep in %s matches %s; the report is not logged to MLflow "
            "(pass --tracking-uri, or the parent run id instead of the folder)", records.tracking_uri, records.source,
        )  # fmt: skip
    return parent


def _run_name(records: SweepRecords) -> str | None:
    """Return the parent run's name (the sweep's name), or None when the store cannot be read."""
    from mlflow.exceptions import MlflowException

    try:
        client = _client(records.tracking_uri, required=False)
        return client.get_run(records.parent_run_id).info.run_name if client else None
    except (MlflowException, OSError) as err:
        logger.warning("could not read MLflow run %s (%s); the report is named after its folder", records.parent_run_id, err)
        return None


def _log_to_parent(records: SweepRecords, files: dict[str, Path], artifact_path: str = ARTIFACT_PATH) -> str | None:
    if not records.parent_run_id or not records.tracking_uri:
        return None
    from mlflow.exceptions import MlflowException

    try:
        client = _client(records.tracking_uri, required=False)
        if client is None:
            logger.warning("no MLflow store at %s; the report is not logged to MLflow", records.tracking_uri)
            return None
        for path in files.values():
            client.log_artifact(records.parent_run_id, str(path), artifact_path)
    except (MlflowException, OSError) as err:
        logger.warning("logging the report to MLflow run %s failed: %s", records.parent_run_id, err)
        return None
    logger.info("logged the report under %s/ of MLflow run %s", artifact_path, records.parent_run_id)
    return records.parent_run_id


def report_after_sweep(output_dir: str | os.PathLike, tracking_uri: str, parent_run_id: str) -> Path | None:
    """Write the report of a sweep that just ended; return its HTML page, or None when it could not be written.

    The sweep's result does not depend on the report, so every error is logged, not raised.
    """
    try:
        return write_report(output_dir, tracking_uri=tracking_uri, parent_run_id=parent_run_id).html
    except ReportError as err:
        logger.warning("no study report: %s", err)
    except Exception:  # a broken figure or file must not fail a finished sweep
        logger.exception("writing the study report of %s failed", output_dir)
    return None


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m biasprune.report",
        description="Write the study report (Markdown, HTML, figures) of a sweep and log it to its MLflow parent run.",
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_MLFLOW_RUN_ID",
                        help="a sweep's output folder (with trials.parquet) or the MLflow run id of its parent run")  # fmt: skip
    parser.add_argument("--steps", type=int, help="fine-tuning milestone of the pruned columns (default: the largest)")
    parser.add_argument("--output", help="report folder (default: <sweep folder>/report, or outputs/reports/<run id>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else $MLFLOW_TRACKING_URI or ./mlflow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = write_report(args.source, args.output, args.steps, args.tracking_uri)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Study report: {report.html}")
    print(f"Markdown: {report.files[MARKDOWN_FILENAME]}")
    if report.parent_run_id:
        print(f"Logged under {ARTIFACT_PATH}/ of MLflow run {report.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
