"""Pareto search: Optuna multi-objective search of the fairness-aware pruning level on Ray Tune.

Objectives, all minimised: the quality metric (FID, or fd_<extractor> when FID is off), MACs
and the fairness divergence. Commands to paste (from the project root):

    python sweeps/pareto.py                                   # 14 trials on the toyfaces world
    python sweeps/pareto.py num_trials=20                     # continue the same study to 20 trials
    python sweeps/pareto.py study_name=nsga sampler=nsga2 startup_trials=6
    python sweeps/pareto.py '+constraints={macs: 2.0e6}' quality_tolerance=0.1   # '+' adds keys to a dict
    python sweeps/pareto.py --cfg job                         # print the resolved config and exit

Results go to `output_dir` (front.parquet, pareto_front.png, summary.json, recommendation.txt,
trials.parquet, predictions.parquet), to the MLflow store (./mlflow by default) and to the
Optuna study (./mlflow/optuna.db by default).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from biasprune.search import ParetoConfig, format_report, run_search

ConfigStore.instance().store(name="pareto_schema", node=ParetoConfig)


@hydra.main(config_path="../conf", config_name="pareto", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        result = run_search(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print()
    print(format_report(result))
    failed = int((result.points["status"] == "failed").sum())
    if failed:
        print(f"\n{failed} point(s) failed; their errors are in trials.parquet and in MLflow.")


if __name__ == "__main__":
    main()
