"""Grid sweep: pruner × pruning ratio × fine-tune steps on Ray Tune, tracked in MLflow and Parquet.

Commands to paste (from the project root):

    python sweeps/grid.py                                   # the default study on the toyfaces world
    python sweeps/grid.py pruners=[l1] ratios=[0.3] finetune_steps=[0,100]
    python sweeps/grid.py --cfg job                         # print the resolved config and exit
    python sweeps/grid.py resources.cpus_per_trial=2 resources.gpus_per_trial=0.5
    RAY_ADDRESS=ray://head:10001 python sweeps/grid.py tracking.uri=http://mlflow:5000

Results go to `output_dir` (trials.parquet, predictions.parquet, per-point artifacts) and to
the MLflow store (./mlflow by default; browse it with the `mlflow ui` command in the README).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from biasprune.report import report_after_sweep
from biasprune.sweep import GridConfig, format_summary, run_grid

ConfigStore.instance().store(name="grid_schema", node=GridConfig)


@hydra.main(config_path="../conf", config_name="grid", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        table = run_grid(config, after_sweep=report_after_sweep)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\nSweep summary (dense first, then by pruner, ratio and steps):")
    print(format_summary(table))
    failed = int((table["status"] == "failed").sum()) if "status" in table else 0
    if failed:
        print(f"\n{failed} point(s) failed; their errors are in the table above and in MLflow.")
    if table.attrs.get("report"):
        print(f"\nStudy report: {table.attrs['report']}")


if __name__ == "__main__":
    main()
