"""Tests of the Parquet tables of a sweep: column types, failed rows, upserts and predictions."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biasprune import results


def _row(pruner: str, ratio: float, steps: int, **metrics) -> dict:
    row = {"world": "toyfaces", "pruner": pruner, "pruning_ratio": ratio, "finetune_steps": steps, "seed": 0,
           "num_samples": 32, "eta": 0.0, "params": 1000, "macs": 250_000}  # fmt: skip
    row.update(metrics)
    return row


def _predictions(pruner: str, ratio: float, steps: int, genders: list[str]) -> pa.Table:
    count = len(genders)
    return pa.table({
        "pruner": [pruner] * count, "pruning_ratio": [ratio] * count, "finetune_steps": [steps] * count,
        "image_id": list(range(count)), "gender": genders, "gender_confidence": [0.9] * count,
    })  # fmt: skip


def test_point_key_text_and_name():
    row = _row("l1", 0.5, 200)
    assert results.point_key(row) == ("l1", 0.5, 200)
    assert results.point_key_text(row) == "l1|0.5|200"
    assert results.point_name(row) == "l1-r0.5-s200"
    assert results.point_key_text(_row("dense", 0, 0)) == "dense|0|0"
    assert results.point_key_text(_row("l1", 0.41234567, 0)) == "l1|0.41234567|0"


def test_point_key_invalid():
    with pytest.raises(ValueError, match="finetune_steps"):
        results.point_key({"pruner": "l1", "pruning_ratio": 0.5})
    with pytest.raises(ValueError, match="finetune_steps must be an integer"):
        results.point_key({"pruner": "l1", "pruning_ratio": 0.5, "finetune_steps": 2.5})


def test_write_trials_column_types(tmp_path):
    path = tmp_path / "out" / results.TRIALS_FILENAME
    rows = [_row("dense", 0.0, 0, fd_toyfaces=1.5, ratio_gender=math.inf, artifact_dir="/o/dense"),
            _row("l1", 0.5, 200, fd_toyfaces=3.25, ratio_gender=1.5, fd_toyfaces_num_samples=32)]  # fmt: skip
    results.write_trials(rows, path)

    schema = pq.read_schema(path)
    assert schema.names[:8] == ["pruner", "pruning_ratio", "finetune_steps", "world", "seed", "num_samples", "eta",
                                "status"]  # fmt: skip
    types = {name: str(schema.field(name).type) for name in schema.names}
    assert types == {
        "pruner": "string", "pruning_ratio": "double", "finetune_steps": "int64", "world": "string",
        "seed": "int64", "num_samples": "int64", "eta": "double", "status": "string", "error": "string",
        "params": "int64", "macs": "int64", "fd_toyfaces": "double", "ratio_gender": "double",
        "artifact_dir": "string", "fd_toyfaces_num_samples": "int64",
    }  # fmt: skip

    frame = results.read_trials(path)
    assert list(frame["status"]) == ["finished", "finished"]
    assert list(frame["error"]) == ["", ""]
    assert frame["ratio_gender"].iloc[0] == math.inf
    assert frame["fd_toyfaces"].tolist() == [1.5, 3.25]
    assert str(frame["fd_toyfaces_num_samples"].dtype) == "Int64"
    assert pd.isna(frame["fd_toyfaces_num_samples"].iloc[0])
    assert frame["fd_toyfaces_num_samples"].iloc[1] == 32
    assert frame["macs"].tolist() == [250_000, 250_000]


def test_write_trials_failed_row(tmp_path):
    path = tmp_path / results.TRIALS_FILENAME
    failed = {"pruner": "random", "pruning_ratio": 0.75, "finetune_steps": 400, "seed": 0, "status": "failed",
              "error": "FloatingPointError: loss is nan"}  # fmt: skip
    results.write_trials([_row("l1", 0.5, 200, fd_toyfaces=3.0), failed], path)

    frame = results.read_trials(path).set_index("pruner")
    assert frame.loc["random", "status"] == "failed"
    assert frame.loc["random", "error"] == "FloatingPointError: loss is nan"
    assert math.isnan(frame.loc["random", "fd_toyfaces"])
    assert pd.isna(frame.loc["random", "macs"])
    assert frame.loc["random", "finetune_steps"] == 400
    assert frame.loc["l1", "macs"] == 250_000
    assert str(frame["macs"].dtype) == "Int64"


def test_write_trials_round_trip(tmp_path):
    path = tmp_path / results.TRIALS_FILENAME
    rows = [_row("l1", 0.25, 0, js_gender=0.0625, js_age=math.nan), _row("random", 0.5, 100, js_gender=0.125)]
    results.write_trials(rows, path)
    frame = results.read_trials(path)
    back = frame.drop(columns=["status", "error"]).to_dict("records")
    assert back[1]["js_gender"] == 0.125
    assert back[1]["pruner"] == "random"
    assert back[1]["finetune_steps"] == 100
    assert math.isnan(back[0]["js_age"])
    assert math.isnan(back[1]["js_age"])
    assert back[0]["pruning_ratio"] == 0.25


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"pruner": "l1", "pruning_ratio": 0.5}], "finetune_steps"),
        ([_row("l1", 0.5, 0), _row("l1", 0.5, 0)], "more than one row"),
        ([_row("l1", 0.5, 0, status="done")], "status"),
        ([_row("l1", 0.5, 0, status="failed")], "no error"),
        ([_row("l1", 0.5, 0, fid=1.0), _row("l1", 0.25, 0, fid="bad")], "mixes text and numbers"),
        ([_row("l1", 0.5, 0, macs=2.5)], "is an integer column"),
        ([], "empty"),
    ],
)
def test_write_trials_invalid(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        results.write_trials(rows, tmp_path / results.TRIALS_FILENAME)
    assert not (tmp_path / results.TRIALS_FILENAME).exists()


def test_upsert_trials_replaces_by_point_key(tmp_path):
    path = tmp_path / results.TRIALS_FILENAME
    failed = {"pruner": "l1", "pruning_ratio": 0.5, "finetune_steps": 200, "status": "failed", "error": "killed"}
    results.upsert_trials(path, [_row("dense", 0.0, 0, fd_toyfaces=1.0), failed])
    results.upsert_trials(path, [_row("l1", 0.5, 200, fd_toyfaces=3.0), _row("l1", 0.5, 400, fd_toyfaces=2.0)])

    frame = results.read_trials(path)
    keys = sorted(zip(frame["pruner"], frame["pruning_ratio"], frame["finetune_steps"]))
    assert keys == [("dense", 0.0, 0), ("l1", 0.5, 200), ("l1", 0.5, 400)]
    l1 = frame[(frame["pruner"] == "l1") & (frame["finetune_steps"] == 200)].iloc[0]
    assert (l1["status"], l1["error"], l1["fd_toyfaces"]) == ("finished", "", 3.0)
    assert frame[frame["pruner"] == "dense"]["fd_toyfaces"].tolist() == [1.0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_upsert_predictions_replaces_by_point_key(tmp_path):
    path = tmp_path / results.PREDICTIONS_FILENAME
    results.write_predictions([_predictions("dense", 0.0, 0, ["male", "female"]),
                               _predictions("l1", 0.5, 200, ["male", "unknown", "male"])], path)  # fmt: skip
    results.upsert_predictions(path, _predictions("l1", 0.5, 200, ["female"]))

    frame = results.read_predictions(path)
    assert len(frame) == 3
    l1 = frame[frame["pruner"] == "l1"]
    assert l1["gender"].tolist() == ["female"]
    assert frame[frame["pruner"] == "dense"]["gender"].tolist() == ["male", "female"]
    assert str(frame["image_id"].dtype) == "Int64"


def test_upsert_predictions_creates_file(tmp_path):
    path = tmp_path / results.PREDICTIONS_FILENAME
    results.upsert_predictions(path, _predictions("random", 0.25, 0, ["male"]))
    assert results.read_predictions(path)["pruner"].tolist() == ["random"]


def test_write_predictions_invalid(tmp_path):
    table = _predictions("l1", 0.5, 0, ["male"])
    with pytest.raises(ValueError, match="more than one predictions table"):
        results.write_predictions([table, table], tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="point key column"):
        results.write_predictions(table.drop_columns(["pruner"]), tmp_path / "p.parquet")


def test_read_trials_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_trials"):
        results.read_trials(tmp_path / "none.parquet")
