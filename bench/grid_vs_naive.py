"""Benchmark: the cached grid sweep against a naive loop that computes every point from scratch.

    python bench/grid_vs_naive.py                       # pruners l1 random, ratio 0.5, steps 0 200 400
    python bench/grid_vs_naive.py --pruners l1 --ratios 0.25 0.5 --steps 0 200 400 --num-samples 500

Both runs start from the same built toyfaces world and an otherwise empty cache. The default
world ships with the package, and building any other world is left out of both timings. The sweep runs on Ray with one CPU per trial, fine-tunes each pruned model once
through all milestones and measures the dense reference once. The naive loop runs each
(pruner, ratio, steps) point alone with a fresh cache: it prunes again, fine-tunes from step 0
and measures the dense reference again. The script checks that both give the same metrics and
prints the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from biasprune.cache import cache_root
from biasprune.config import TrialConfig
from biasprune.sweep import GridConfig, run_grid
from biasprune.trial import load_world, run_trial

_COMPARED = ("fairness_divergence", "macs", "params", "unknown_rate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruners", nargs="+", default=["l1", "random"], help="pruners of the grid")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5], help="pruning ratios of the grid")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 200, 400], help="fine-tune step milestones")
    parser.add_argument("--num-samples", type=int, default=300, help="images sampled per evaluated point")
    parser.add_argument("--sampler-steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--cache-dir", default=None, help="cache holding the built world (default: the usual cache)")
    return parser.parse_args(argv)


def base_trial(args: argparse.Namespace, cache_dir: Path) -> TrialConfig:
    trial = TrialConfig(cache_dir=str(cache_dir), device="cpu", num_threads=1)
    trial.sampling.num_samples = args.num_samples
    trial.sampling.sampler_steps = args.sampler_steps
    trial.sampling.batch_size = 250
    trial.measure.fid = "off"
    return trial


def fresh_cache(world_cache: Path, parent: Path) -> Path:
    """Return a new cache holding only the built worlds (none when the world ships with the package)."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=parent))
    if (world_cache / "worlds").is_dir():
        shutil.copytree(world_cache / "worlds", cache / "worlds")
    return cache


def run_sweep(args: argparse.Namespace, world_cache: Path, workdir: Path) -> tuple[float, dict]:
    cache = fresh_cache(world_cache, workdir)
    config = GridConfig(
        name="bench", pruners=args.pruners, ratios=args.ratios, finetune_steps=args.steps, include_dense=False,
        trial=base_trial(args, cache), output_dir=str(workdir / "sweep"),
    )  # fmt: skip
    config.tracking.uri = f"sqlite:///{workdir / 'mlflow.db'}"
    started = time.perf_counter()
    table = run_grid(OmegaConf.structured(config))
    elapsed = time.perf_counter() - started
    rows = {(r["pruner"], r["pruning_ratio"], r["finetune_steps"]): r for r in table.to_dict("records")}
    return elapsed, rows


def run_naive(args: argparse.Namespace, world_cache: Path, workdir: Path) -> tuple[float, dict]:
    rows = {}
    started = time.perf_counter()
    for pruner in args.pruners:
        for ratio in args.ratios:
            for steps in args.steps:
                trial = base_trial(args, fresh_cache(world_cache, workdir))
                trial.pruner, trial.pruning_ratio, trial.finetune_steps = pruner, ratio, [steps]
                trial.num_threads = 2
                rows[(pruner, ratio, steps)] = run_trial(trial)[0]
    return time.perf_counter() - started, rows


def compare(sweep_rows: dict, naive_rows: dict) -> list[str]:
    """Return the metrics that differ between the two runs (beyond float noise)."""
    problems = []
    for point, naive in naive_rows.items():
        swept = sweep_rows.get(point)
        if swept is None:
            problems.append(f"{point}: missing from the sweep")
            continue
        for name in (*_COMPARED, naive["quality_metric"]):
            a, b = float(swept[name]), float(naive[name])
            if not (math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4) or (math.isnan(a) and math.isnan(b))):
                problems.append(f"{point} {name}: sweep {a:.6g} vs naive {b:.6g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    world_cache = cache_root(args.cache_dir)
    load_world(base_trial(args, world_cache))  # built once, outside both timings
    with tempfile.TemporaryDirectory(prefix="biasprune-bench-") as tmp:
        workdir = Path(tmp)
        sweep_s, sweep_rows = run_sweep(args, world_cache, workdir)
        naive_s, naive_rows = run_naive(args, world_cache, workdir)
    problems = compare(sweep_rows, naive_rows)
    points = len(args.pruners) * len(args.ratios) * len(args.steps)
    print(f"grid: pruners {args.pruners} x ratios {args.ratios} x steps {args.steps} = {points} points, "
          f"{args.num_samples} samples, {args.sampler_steps} DDIM steps")  # fmt: skip
    print(f"sweep: {sweep_s:.1f} s   naive: {naive_s:.1f} s   sweep/naive: {sweep_s / naive_s:.2f}")
    if problems:
        print("metrics differ:\n  " + "\n  ".join(problems))
        return 1
    print(f"metrics agree on all {points} points ({', '.join(_COMPARED)} and the quality metric)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
