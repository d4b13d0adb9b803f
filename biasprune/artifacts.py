"""Files that show one evaluated point: a grid of its samples, its attribute shares, its predictions.

Each function reads a cached evaluation folder (``<cache>/evaluations/<evaluation_key>/``, see
`biasprune.trial.Measurer`) or a result row, and writes one file a tracker logs as an artifact:

- `sample_grid`: the first generated images (``grid_images/sample_*.png``) as one PNG,
  enlarged with nearest-neighbour so that small samples stay readable;
- `share_plot`: per attribute, the share of generated images in each group beside the
  reference shares;
- `predictions_table`: one row per generated image with its predicted group and confidence
  per attribute, for ``predictions.parquet``.

Share keys are read as ``share_<attribute>_<group>`` with the names sanitized as
`biasprune.fairness` writes them ("+" becomes "plus", other characters outside
``[A-Za-z0-9_.-]`` become "_").
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from biasprune.classifier import UNKNOWN
from biasprune.fairness import metric_token
from biasprune.results import POINT_KEY_COLUMNS, point_key

logger = logging.getLogger(__name__)

GRID_IMAGES_DIRNAME = "grid_images"
"""Folder of an evaluation that contains the first generated images as ``sample_<index>.png``."""

PREDICTIONS_FILENAME = "predictions.npz"
"""File of an evaluation with ``label_<attribute>`` (int, -1 unknown) and ``confidence_<attribute>``."""

UNKNOWN_GROUP = "unknown"
"""Group name written for an image whose label is unknown."""

SAMPLE_GRID_FILENAME = "sample_grid.png"
SHARE_PLOT_FILENAME = "shares.png"
PREDICTIONS_TABLE_FILENAME = "predictions.parquet"


def sample_grid(
    evaluation_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    columns: int = 8,
    min_tile_px: int = 64,
    padding_px: int = 2,
) -> Path:
    """Write the cached sample images of an evaluation as one PNG grid.

    Each image is enlarged by the smallest whole factor that makes its shorter side at least
    ``min_tile_px`` pixels, with nearest-neighbour so pixels stay sharp. Tiles are separated
    and framed by ``padding_px`` white pixels, so the grid is
    ``columns·tile + (columns + 1)·padding_px`` wide (``columns`` capped at the image count).

    Args:
        evaluation_dir: The evaluation folder holding ``grid_images/sample_*.png``.
        out_png: Destination PNG; its folder is created if missing.
        columns: Tiles per row. Default 8.
        min_tile_px: Minimum tile side in pixels. Default 64.
        padding_px: White gap between and around tiles, in pixels. Default 2.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: The evaluation has no sample images.
        ValueError: A size argument is not positive (``padding_px`` may be 0), or the images
            differ in size.
    """
    _check_positive(columns=columns, min_tile_px=min_tile_px)
    if padding_px < 0:
        raise ValueError(f"padding_px must be >= 0, got {padding_px}")
    tiles = _enlarged_tiles(_sample_files(Path(evaluation_dir)), min_tile_px)
    grid = _paste_grid(tiles, min(columns, len(tiles)), padding_px)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    logger.debug("wrote a %dx%d sample grid of %d images to %s", *grid.size, len(tiles), out_png)
    return out_png


def share_plot(
    row: dict[str, Any],
    groups: dict[str, list[str]],
    references: dict[str, dict[str, np.ndarray]] | None,
    out_png: str | os.PathLike,
) -> Path:
    """Plot the generated group shares of a point beside reference shares, one panel per attribute.

    Args:
        row: The point's result row: ``pruner``, ``pruning_ratio``, ``finetune_steps`` and the
            ``share_<attribute>_<group>`` metrics (``unknown_rate_<attribute>`` is shown when
            present).
        groups: Ordered group names per attribute, as the classifier reads them.
        references: Reference share vectors by reference name, then attribute (in the order of
            ``groups``); None or empty plots the generated shares alone. An attribute a
            reference lacks is left out of that reference's bars.
        out_png: Destination PNG; its folder is created if missing.

    Returns:
        The path written.

    Raises:
        ValueError: ``groups`` is empty, the row has no share of some attribute, or a
            reference vector's length differs from the attribute's group count.
    """
    if not groups:
        raise ValueError("groups is empty; pass the attribute groups, e.g. {'gender': ['male', 'female']}")
    references = references or {}
    figure = Figure(figsize=(1.2 + 3.4 * len(groups), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, (attribute, names) in zip(axes, groups.items()):
        bars = {"generated": _row_shares(row, attribute, names)}
        for name, shares in references.items():
            if attribute in shares:
                bars[name] = _reference_shares(name, shares, attribute, names)
        _draw_panel(ax, attribute, names, bars, row.get(f"unknown_rate_{metric_token(attribute)}"))
    figure.suptitle(_point_title(row))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png


def predictions_table(
    evaluation_dir: str | os.PathLike, groups: dict[str, list[str]], point: dict[str, Any]
) -> pa.Table:
    """Return the per-image predictions of an evaluation as a table, one row per generated image.

    Columns: ``pruner`` (string), ``pruning_ratio`` (float64), ``finetune_steps`` (int64),
    ``image_id`` (int64, the image's index in sampling order), then per attribute ``<attribute>``
    (the group name, or ``"unknown"``) and ``<attribute>_confidence`` (float64, the classifier's
    probability of that group).

    Args:
        evaluation_dir: The evaluation folder holding ``predictions.npz``.
        groups: Ordered group names per attribute; label i means ``groups[attribute][i]``.
        point: The point the evaluation belongs to (a result row works).

    Raises:
        FileNotFoundError: No ``predictions.npz`` in ``evaluation_dir``.
        ValueError: An attribute's arrays are missing, their lengths differ, or a label is
            outside ``[-1, number of groups)``.
    """
    pruner, ratio, steps = point_key(point)
    arrays = _load_predictions(Path(evaluation_dir) / PREDICTIONS_FILENAME, groups)
    count = len(next(iter(arrays.values())))
    columns: dict[str, pa.Array] = {
        "pruner": pa.array([pruner] * count, pa.string()),
        "pruning_ratio": pa.array([ratio] * count, pa.float64()),
        "finetune_steps": pa.array([steps] * count, pa.int64()),
        "image_id": pa.array(np.arange(count, dtype=np.int64)),
    }
    for attribute, names in groups.items():
        columns[attribute] = pa.array(_group_names(arrays[f"label_{attribute}"], names, attribute), pa.string())
        columns[f"{attribute}_confidence"] = pa.array(arrays[f"confidence_{attribute}"].astype(np.float64))
    return pa.table(columns)


def write_point_artifacts(
    evaluation_dir: str | os.PathLike,
    row: dict[str, Any],
    groups: dict[str, list[str]],
    references: dict[str, dict[str, np.ndarray]] | None,
    out_dir: str | os.PathLike,
) -> dict[str, Path]:
    """Write the sample grid, share plot and predictions table of a point into one folder.

    Args:
        evaluation_dir: The point's cached evaluation folder.
        row: The point's result row.
        groups: Ordered group names per attribute.
        references: Reference share vectors (see `share_plot`), or None.
        out_dir: Destination folder; created if missing.

    Returns:
        The files by artifact name (`SAMPLE_GRID_FILENAME`, `SHARE_PLOT_FILENAME`,
        `PREDICTIONS_TABLE_FILENAME`), ready for `biasprune.tracking.SweepTracker.log_point`.
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / PREDICTIONS_TABLE_FILENAME
    pq.write_table(predictions_table(evaluation_dir, groups, row), table_path)
    return {
        SAMPLE_GRID_FILENAME: sample_grid(evaluation_dir, out_dir / SAMPLE_GRID_FILENAME),
        SHARE_PLOT_FILENAME: share_plot(row, groups, references, out_dir / SHARE_PLOT_FILENAME),
        PREDICTIONS_TABLE_FILENAME: table_path,
    }


# --- sample grid ---------------------------------------------------------------------------------


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _sample_files(evaluation_dir: Path) -> list[Path]:
    files = sorted((evaluation_dir / GRID_IMAGES_DIRNAME).glob("sample_*.png"))
    if not files:
        raise FileNotFoundError(
            f"no sample images in {evaluation_dir / GRID_IMAGES_DIRNAME}; pass an evaluation folder "
            "written by biasprune.trial (it contains grid_images/sample_000000.png ...)"
        )
    return files


def _enlarged_tiles(files: list[Path], min_tile_px: int) -> list[Image.Image]:
    images = [Image.open(f).convert("RGB") for f in files]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"sample images differ in size ({sorted(sizes)}) in {files[0].parent}; expected one size")
    width, height = images[0].size
    scale = max(1, math.ceil(min_tile_px / min(width, height)))
    return [image.resize((width * scale, height * scale), Image.Resampling.NEAREST) for image in images]


def _paste_grid(tiles: list[Image.Image], columns: int, padding_px: int) -> Image.Image:
    tile_w, tile_h = tiles[0].size
    rows = math.ceil(len(tiles) / columns)
    size = (columns * tile_w + (columns + 1) * padding_px, rows * tile_h + (rows + 1) * padding_px)
    grid = Image.new("RGB", size, "white")
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid.paste(tile, (padding_px + column * (tile_w + padding_px), padding_px + row * (tile_h + padding_px)))
    return grid


# --- share plot ----------------------------------------------------------------------------------


def _row_shares(row: dict[str, Any], attribute: str, names: list[str]) -> np.ndarray:
    keys = [f"share_{metric_token(attribute)}_{metric_token(name)}" for name in names]
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(
            f"row of point {_point_title(row)!r} has no {missing}; plot a finished point whose row "
            "contains the share_<attribute>_<group> metrics of every configured group"
        )
    return np.array([float(row[k]) for k in keys])


def _reference_shares(reference: str, shares: dict[str, np.ndarray], attribute: str, names: list[str]) -> np.ndarray:
    vector = np.asarray(shares[attribute], dtype=float)
    if vector.shape != (len(names),):
        raise ValueError(
            f"reference {reference!r} has {vector.shape} shares for {attribute!r} but it has "
            f"{len(names)} groups {names}; pass one share per group, in the same order"
        )
    return vector


def _draw_panel(ax: Any, attribute: str, names: list[str], bars: dict[str, np.ndarray], unknown: Any) -> None:
    x = np.arange(len(names))
    width = 0.8 / len(bars)
    for index, (label, shares) in enumerate(bars.items()):
        ax.bar(x + (index - (len(bars) - 1) / 2) * width, shares, width, label=label)
    ax.set_xticks(x, names)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(f"{attribute} group")
    ax.set_ylabel("share of images")
    title = attribute if unknown is None else f"{attribute} (unknown {100 * float(unknown):.1f} %)"
    ax.set_title(title)
    ax.legend(fontsize="small")


def _point_title(row: dict[str, Any]) -> str:
    pruner, ratio, steps = (row.get(k, "?") for k in POINT_KEY_COLUMNS)
    ratio_text = f"{ratio:g}" if isinstance(ratio, (int, float)) else str(ratio)
    return f"{pruner}, pruning ratio {ratio_text}, {steps} fine-tuning steps"


# --- predictions ---------------------------------------------------------------------------------


def _load_predictions(path: Path, groups: dict[str, list[str]]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"no {PREDICTIONS_FILENAME} at {path}; pass an evaluation folder written by biasprune.trial")
    with np.load(path) as data:
        expected = [f"{kind}_{a}" for a in groups for kind in ("label", "confidence")]
        missing = [k for k in expected if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing} (it has {sorted(data.files)}); the groups passed do not match it")
        arrays = {k: np.asarray(data[k]) for k in expected}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays in {path} differ in length: {lengths}; the evaluation folder is corrupt, delete it to recompute")
    return arrays


def _group_names(labels: np.ndarray, names: list[str], attribute: str) -> list[str]:
    labels = labels.astype(np.int64)
    bad = labels[(labels < UNKNOWN) | (labels >= len(names))]
    if bad.size:
        raise ValueError(
            f"labels of {attribute!r} include {sorted(set(bad.tolist()))[:5]}, outside -1..{len(names) - 1} "
            f"for groups {names}; pass the groups the evaluation was classified with"
        )
    lookup = np.array([*names, UNKNOWN_GROUP], dtype=object)
    return lookup[np.where(labels == UNKNOWN, len(names), labels)].tolist()
