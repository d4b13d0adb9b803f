"""Tests of the per-point artifacts: sample grid, share plot and per-image predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from biasprune import artifacts
from biasprune.data import save_png

GROUPS = {"gender": ["male", "female"], "age": ["0-9", "10-49", "50+"]}
POINT = {"pruner": "l1", "pruning_ratio": 0.5, "finetune_steps": 200}


@pytest.fixture
def evaluation_dir(tmp_path):
    """A fake cached evaluation: ten 16x16 samples and the predictions of five images."""
    directory = tmp_path / "evaluations" / "abc"
    images = torch.zeros(10, 3, 16, 16, dtype=torch.uint8)
    images[0, 0] = 255  # first sample red, so its tile can be checked
    save_png(images, directory / "grid_images")
    np.savez(
        directory / "predictions.npz",
        label_gender=np.array([0, 1, -1, 0, 1]),
        confidence_gender=np.array([0.9, 0.8, 0.3, 0.7, 0.6], dtype=np.float32),
        label_age=np.array([1, 1, 2, -1, 0]),
        confidence_age=np.array([0.5, 0.6, 0.7, 0.2, 0.9], dtype=np.float32),
    )
    return directory


def _row(**shares) -> dict:
    return {**POINT, "share_gender_male": 0.6, "share_gender_female": 0.4, "share_age_0-9": 0.1,
            "share_age_10-49": 0.7, "share_age_50plus": 0.2, "unknown_rate_gender": 0.05, **shares}  # fmt: skip


def test_sample_grid_size_in_pixels(evaluation_dir, tmp_path):
    out = artifacts.sample_grid(evaluation_dir, tmp_path / "grid.png", columns=4)
    with Image.open(out) as grid:
        # 16 px samples enlarged 4x to 64 px; 4 columns x 3 rows with 2 px gaps and frame.
        assert grid.size == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)
        assert grid.getpixel((2, 2)) == (255, 0, 0)
        assert grid.getpixel((65, 65)) == (255, 0, 0)
        assert grid.getpixel((66, 66)) == (255, 255, 255)
        assert grid.getpixel((68, 2)) == (0, 0, 0)


def test_sample_grid_columns_capped_and_no_enlargement(evaluation_dir, tmp_path):
    out = artifacts.sample_grid(evaluation_dir, tmp_path / "grid.png", columns=16, min_tile_px=16, padding_px=0)
    with Image.open(out) as grid:
        assert grid.size == (10 * 16, 16)


def test_sample_grid_invalid(tmp_path, evaluation_dir):
    with pytest.raises(FileNotFoundError, match="no sample images"):
        artifacts.sample_grid(tmp_path, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="columns must be a positive integer, got 0"):
        artifacts.sample_grid(evaluation_dir, tmp_path / "grid.png", columns=0)


def test_share_plot_written(tmp_path):
    references = {"data_predicted": {"gender": np.array([0.5, 0.5]), "age": np.array([0.2, 0.5, 0.3])},
                  "uniform": {"gender": np.array([0.5, 0.5])}}  # fmt: skip
    out = artifacts.share_plot(_row(), GROUPS, references, tmp_path / "plots" / "shares.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert (width, height) == (int(100 * (1.2 + 3.4 * 2)), 380)
    assert out.stat().st_size > 10_000


def test_share_plot_without_references(tmp_path):
    out = artifacts.share_plot(_row(), GROUPS, None, tmp_path / "shares.png")
    assert out.stat().st_size > 5_000


def test_share_plot_invalid(tmp_path):
    row = _row()
    del row["share_age_50plus"]
    with pytest.raises(ValueError, match="share_age_50plus"):
        artifacts.share_plot(row, GROUPS, None, tmp_path / "shares.png")
    with pytest.raises(ValueError, match="2 groups"):
        artifacts.share_plot(_row(), GROUPS, {"dense": {"gender": np.array([1.0])}}, tmp_path / "shares.png")


def test_predictions_table_values(evaluation_dir):
    table = artifacts.predictions_table(evaluation_dir, GROUPS, POINT)
    assert table.column_names == ["pruner", "pruning_ratio", "finetune_steps", "image_id", "gender",
                                  "gender_confidence", "age", "age_confidence"]  # fmt: skip
    columns = table.to_pydict()
    assert columns["image_id"] == [0, 1, 2, 3, 4]
    assert columns["gender"] == ["male", "female", "unknown", "male", "female"]
    assert columns["age"] == ["10-49", "10-49", "50+", "unknown", "0-9"]
    assert columns["gender_confidence"] == pytest.approx([0.9, 0.8, 0.3, 0.7, 0.6])
    assert set(columns["pruner"]) == {"l1"}
    assert set(columns["finetune_steps"]) == {200}
    assert str(table.schema.field("age_confidence").type) == "double"


def test_predictions_table_invalid(evaluation_dir):
    with pytest.raises(ValueError, match="outside -1..1"):
        artifacts.predictions_table(evaluation_dir, {"age": ["young", "old"]}, POINT)
    with pytest.raises(ValueError, match="label_race"):
        artifacts.predictions_table(evaluation_dir, {"race": ["white", "black"]}, POINT)


def test_write_point_artifacts_files(evaluation_dir, tmp_path):
    files = artifacts.write_point_artifacts(evaluation_dir, _row(), GROUPS, None, tmp_path / "l1-r0.5-s200")
    assert sorted(files) == ["predictions.parquet", "sample_grid.png", "shares.png"]
    assert all(path.stat().st_size > 0 for path in files.values())
