"""Parquet tables of a sweep's output folder: one row per evaluated point, one per generated image.

``trials.parquet`` contains one row per evaluated point, keyed by (``pruner``, ``pruning_ratio``,
``finetune_steps``); the dense baseline is the point (``dense``, 0.0, 0). Its columns are the
union of the keys of the rows written:

- the run params of `biasprune.trial.POINT_PARAM_KEYS`, first, typed by their values
  (``string``, ``int64`` or ``float64``);
- ``status`` (``"finished"`` or ``"failed"``) and ``error`` (the exception text, empty when
  finished). A failed trial is thus a row with its params, its error and null metrics;
- every metric, ``float64``, except the counts in `INTEGER_COLUMNS` (``params``, ``macs``, ...),
  which are ``int64``;
- any other text column, such as ``artifact_dir``, as ``string``.

A key missing from a row is null there. ``predictions.parquet`` contains one row per generated
image (see `biasprune.artifacts.predictions_table`), keyed by the same point columns.

Every write goes to a temporary file that then replaces the table, so a reader never sees a
half-written file. The upserts read, merge and rewrite the whole table: they are meant for the
single sweep driver, not for several processes writing the same file at once.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

TRIALS_FILENAME = "trials.parquet"
"""File name of the per-point table in a sweep's output folder."""

PREDICTIONS_FILENAME = "predictions.parquet"
"""File name of the per-image table in a sweep's output folder."""

POINT_KEY_COLUMNS = ("pruner", "pruning_ratio", "finetune_steps")
"""Columns that identify an evaluated point."""

STATUS_FINISHED = "finished"
STATUS_FAILED = "failed"
STATUSES = (STATUS_FINISHED, STATUS_FAILED)

INTEGER_COLUMNS = frozenset(
    {"params", "macs", "finetune_steps", "num_samples", "seed", "sampler_steps", "num_images",
     "bootstrap_samples", "image_id"}
)  # fmt: skip
"""Columns stored as int64, with every ``*_num_samples`` column (sample counts of FID and
``fd_<extractor>``). Other metrics are float64; other numeric run params are int64 when all
their values are integers, else float64."""

_FIXED_TYPES = {
    "pruner": pa.string(),
    "pruning_ratio": pa.float64(),
    "finetune_steps": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "artifact_dir": pa.string(),
}

PointKey = tuple[str, float, int]


def point_key(row: dict[str, Any]) -> PointKey:
    """Return the (pruner, pruning_ratio, finetune_steps) key of a result row.

    Args:
        row: A result row; must contain the three key columns.

    Returns:
        The key with the pruner as str, the ratio as float and the steps as int.

    Raises:
        ValueError: A key column is missing or has a value of the wrong kind.
    """
    missing = [k for k in POINT_KEY_COLUMNS if row.get(k) is None]
    if missing:
        raise ValueError(
            f"row is missing the point key column(s) {missing}; every row needs "
            f"{list(POINT_KEY_COLUMNS)} (the dense baseline is 'dense', 0.0, 0). Got keys {sorted(row)[:20]}"
        )
    ratio, steps = row["pruning_ratio"], row["finetune_steps"]
    if not _is_number(ratio) or not math.isfinite(float(ratio)):
        raise ValueError(f"pruning_ratio must be a finite number, got {ratio!r}")
    if not _is_integral(steps):
        raise ValueError(f"finetune_steps must be an integer, got {steps!r}")
    return str(row["pruner"]), float(ratio), int(steps)


def point_key_text(row: dict[str, Any]) -> str:
    """Return the point key as text, ``"<pruner>|<ratio>|<steps>"``, e.g. ``l1|0.5|200`` or ``dense|0|0``.

    The ratio is written with up to 12 significant digits (format ``.12g``): grid ratios read
    as with ``:g``, and continuous ratios from a search stay distinct.

    Args:
        row: A result row; must contain the three key columns.
    """
    pruner, ratio, steps = point_key(row)
    return f"{pruner}|{ratio:.12g}|{steps}"


def point_name(row: dict[str, Any]) -> str:
    """Return a short readable name of the point, ``"<pruner>-r<ratio>-s<steps>"``, e.g. ``l1-r0.5-s200``.

    Args:
        row: A result row; must contain the three key columns.
    """
    pruner, ratio, steps = point_key(row)
    return f"{pruner}-r{ratio:g}-s{steps}"


# --- trials.parquet ------------------------------------------------------------------------------


def write_trials(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write result rows as a trials table, replacing the file atomically.

    Args:
        rows: One dict per evaluated point, as `biasprune.trial.run_trial` returns them. A row
            may carry ``status`` (default ``"finished"``) and ``error`` (default empty; required
            when the status is ``"failed"``).
        path: Destination ``.parquet`` file; its folder is created if missing.

    Returns:
        The path written.

    Raises:
        ValueError: A row lacks the point key, two rows share a point, a status is not one of
            `STATUSES`, a failed row has no error, or a column mixes text and numbers.
    """
    table = _trials_table(rows)
    return _write_atomically(table, Path(path))


def read_trials(path: str | os.PathLike) -> pd.DataFrame:
    """Read a trials table into a DataFrame.

    Integer columns come back as pandas' nullable ``Int64``, so their dtype does not depend on
    whether a failed row left them null. Metrics are ``float64`` and text columns are strings.

    Args:
        path: A file written by `write_trials` or `upsert_trials`.

    Raises:
        FileNotFoundError: No file at ``path``.
    """
    return _read_table(Path(path)).to_pandas(types_mapper=_pandas_type)


def upsert_trials(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Add rows to a trials table, replacing the rows of the same points and keeping the rest.

    Used when a resumed sweep adds or re-evaluates points. Creates the table if it is missing.

    Args:
        path: The trials table.
        rows: New rows; see `write_trials`.

    Returns:
        The path written.
    """
    path = Path(path)
    new_keys = {point_key(row) for row in rows}
    unchanged: list[dict[str, Any]] = []
    if path.exists():
        unchanged = [r for r in _read_table(path).to_pylist() if point_key(r) not in new_keys]
    logger.debug("upserting %d row(s) into %s, keeping %d", len(rows), path, len(unchanged))
    return write_trials([*unchanged, *rows], path)


# --- predictions.parquet -------------------------------------------------------------------------


def write_predictions(tables: pa.Table | Iterable[pa.Table], path: str | os.PathLike) -> Path:
    """Write per-image prediction tables of one or more points as one file, atomically.

    Args:
        tables: Tables from `biasprune.artifacts.predictions_table`, one per point. Their
            attribute columns may differ; missing ones are null.
        path: Destination ``.parquet`` file; its folder is created if missing.

    Returns:
        The path written.

    Raises:
        ValueError: No table given, a table lacks the point key columns, or two tables hold
            the same point.
    """
    tables = [tables] if isinstance(tables, pa.Table) else list(tables)
    if not tables:
        raise ValueError("tables is empty; pass at least one predictions table")
    seen: set[PointKey] = set()
    for table in tables:
        for key in _table_point_keys(table):
            if key in seen:
                raise ValueError(f"point {key} appears in more than one predictions table; pass each point once")
            seen.add(key)
    combined = pa.concat_tables(tables, promote_options="permissive")
    return _write_atomically(combined, Path(path))


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read a predictions table into a DataFrame (integer columns as nullable ``Int64``).

    Args:
        path: A file written by `write_predictions` or `upsert_predictions`.
    """
    return _read_table(Path(path)).to_pandas(types_mapper=_pandas_type)


def upsert_predictions(path: str | os.PathLike, table: pa.Table) -> Path:
    """Add one or more points' predictions, replacing existing rows of the same points.

    Args:
        path: The predictions table; created if missing.
        table: Predictions of the points to add (see `write_predictions`).

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.exists():
        return write_predictions([table], path)
    existing = _read_table(path)
    keep = pc.invert(_rows_of_points(existing, _table_point_keys(table)))
    return write_predictions([existing.filter(keep), table], path)


# --- helpers -------------------------------------------------------------------------------------


def _trials_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    if not rows:
        raise ValueError("rows is empty; pass at least one result row")
    rows = [_with_status(row) for row in rows]
    _check_unique_points(rows)
    columns = _column_order(rows)
    arrays = {name: _column_array(name, [row.get(name) for row in rows]) for name in columns}
    return pa.table(arrays)


def _with_status(row: dict[str, Any]) -> dict[str, Any]:
    status = row.get("status") or STATUS_FINISHED
    error = row.get("error") or ""
    if status not in STATUSES:
        raise ValueError(f"status of point {point_key(row)} is {status!r}; use one of {list(STATUSES)}")
    if status == STATUS_FAILED and not error:
        raise ValueError(f"point {point_key(row)} has status 'failed' but no error; pass the exception text as 'error'")
    return {**row, "status": status, "error": str(error)}


def _check_unique_points(rows: list[dict[str, Any]]) -> None:
    seen: set[PointKey] = set()
    for row in rows:
        key = point_key(row)
        if key in seen:
            raise ValueError(f"point {key} appears in more than one row; pass each point once")
        seen.add(key)


def _column_order(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    leading = [k for k in (*POINT_KEY_COLUMNS, *_point_param_keys(), "status", "error") if k in seen]
    return leading + [k for k in seen if k not in leading]


def _point_param_keys() -> tuple[str, ...]:
    # Imported here because biasprune.trial loads torch and diffusers, which tables do not need.
    from biasprune.trial import POINT_PARAM_KEYS

    return POINT_PARAM_KEYS


def _column_array(name: str, values: list[Any]) -> pa.Array:
    present = [v for v in values if v is not None]
    kind = _FIXED_TYPES.get(name) or _inferred_type(name, present)
    if pa.types.is_string(kind):
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    if pa.types.is_int64(kind):
        return pa.array([_as_int(name, v) for v in values], pa.int64())
    return pa.array([None if v is None else float(v) for v in values], pa.float64())


def _inferred_type(name: str, present: list[Any]) -> pa.DataType:
    if present and all(isinstance(v, str) for v in present):
        return pa.string()
    bad = [v for v in present if not _is_number(v)]
    if bad:
        raise ValueError(
            f"column {name!r} mixes text and numbers (e.g. {bad[0]!r}); a column must contain only "
            "strings or only numbers, so convert the values in the rows first"
        )
    if _is_integer_column(name):
        return pa.int64()
    if name in _point_param_keys() and present and all(_is_integral(v) for v in present):
        return pa.int64()
    return pa.float64()


def _is_integer_column(name: str) -> bool:
    return name in INTEGER_COLUMNS or name.endswith("_num_samples")


def _as_int(name: str, value: Any) -> int | None:
    if value is None or (_is_number(value) and math.isnan(float(value))):
        return None
    if not _is_number(value) or not float(value).is_integer():
        raise ValueError(f"column {name!r} is an integer column, got {value!r}; pass a whole number or None")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _table_point_keys(table: pa.Table) -> set[PointKey]:
    missing = [c for c in POINT_KEY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"predictions table lacks the point key column(s) {missing}; build it with "
            "biasprune.artifacts.predictions_table"
        )
    points = table.select(list(POINT_KEY_COLUMNS)).group_by(list(POINT_KEY_COLUMNS)).aggregate([])
    return {point_key(row) for row in points.to_pylist()}


def _rows_of_points(table: pa.Table, keys: set[PointKey]) -> pa.ChunkedArray:
    mask = pa.chunked_array([pa.array([False] * table.num_rows, pa.bool_())])
    for pruner, ratio, steps in keys:
        match = pc.and_(
            pc.and_(pc.equal(table["pruner"], pruner), pc.equal(table["pruning_ratio"], ratio)),
            pc.equal(table["finetune_steps"], steps),
        )
        mask = pc.or_(mask, pc.fill_null(match, False))
    return mask


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"no table at {path}; write it first with write_trials or write_predictions")
    return pq.read_table(path)


def _write_atomically(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.debug("wrote %d row(s) to %s", table.num_rows, path)
    return path


def _pandas_type(arrow_type: pa.DataType) -> Any:
    if pa.types.is_int64(arrow_type):
        return pd.Int64Dtype()
    return None
