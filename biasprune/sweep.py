"""The grid sweep: pruner × pruning ratio × fine-tune steps on Ray Tune, tracked in MLflow and Parquet.

Each Ray trial is one (pruner, pruning ratio) pair; it fine-tunes through every step
milestone and reports one result per milestone. All tracking happens in the driver: a Tune
callback turns each reported result into an MLflow child run and a Parquet row, so trials
running in parallel never write to the tracking store themselves.

A re-run of the same sweep skips the points that already have a finished MLflow run and a
Parquet row. The trials it does launch read pruned models, checkpoints and evaluations from
the cache, so only unfinished work is computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray import tune

from biasprune.cache import content_key
from biasprune.config import DENSE, TrialConfig, typed_config, validate_trial_config

logger = logging.getLogger(__name__)

POINT_KEY_FIELDS = ("pruner", "pruning_ratio", "finetune_steps")


@dataclass
class ResourcesConfig:
    """Resources Ray reserves for each trial.

    Attributes:
        cpus_per_trial: CPUs per trial; torch in the trial uses this many threads. Default 1.
        gpus_per_trial: GPUs per trial; fractions share a GPU between trials. Default 0: one GPU
            per trial when the Ray cluster has GPUs and `trial.device` is not `cpu`, else none.
    """

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass
class TrackingConfig:
    """MLflow tracking settings.

    Attributes:
        uri: MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI, else the SQLite store
            under ./mlflow/.
        experiment: MLflow experiment name.
        server: Start a local MLflow tracking server on 127.0.0.1 for the sweep and stop it
            after, for stores that several processes write to at once.
    """

    uri: str | None = None
    experiment: str = "biasprune"
    server: bool = False


@dataclass
class GridConfig:
    """A grid sweep.

    Attributes:
        name: Sweep name; the output folder and the MLflow parent run are named after it.
        pruners: Pruners to sweep.
        ratios: Pruning ratios to sweep, each in (0, 1).
        finetune_steps: Step milestones at which every pruned model is measured.
        include_dense: Also evaluate the unpruned model as a baseline point.
        trial: Base settings of every trial; `pruner`, `pruning_ratio` and
            `finetune_steps` are set per point.
        resources: Resources per trial.
        tracking: MLflow settings.
        output_dir: Folder of trials.parquet, predictions.parquet, artifacts and Ray's files.
        max_concurrent_trials: Upper bound of trials running at once; 0 lets Ray decide by resources.
        ray_address: Address of a Ray cluster to join; empty uses $RAY_ADDRESS, else a local Ray.
    """

    name: str = "grid"
    pruners: list[str] = field(default_factory=lambda: ["diff-pruning", "l1", "random"])
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    finetune_steps: list[int] = field(default_factory=lambda: [0, 200, 400])
    include_dense: bool = True
    trial: TrialConfig = field(default_factory=TrialConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "outputs/grid"
    max_concurrent_trials: int = 0
    ray_address: str | None = None


def point_key(pruner: str, pruning_ratio: float, finetune_steps: int) -> str:
    """Return the identity of an evaluated point, as stored in MLflow tags and Parquet rows."""
    from biasprune.results import point_key_text

    return point_key_text({"pruner": pruner, "pruning_ratio": pruning_ratio, "finetune_steps": finetune_steps})


def expand_grid(config: GridConfig) -> list[dict[str, Any]]:
    """Return one trial spec per (pruner, ratio), plus the dense baseline first.

    Each spec carries `pruner`, `pruning_ratio` and `finetune_steps` (the sorted milestones).
    """
    milestones = sorted({int(s) for s in config.finetune_steps})
    trials = [{"pruner": DENSE, "pruning_ratio": 0.0, "finetune_steps": [0]}] if config.include_dense else []
    for pruner in config.pruners:
        for ratio in config.ratios:
            trials.append({"pruner": pruner, "pruning_ratio": float(ratio), "finetune_steps": milestones})
    return trials


def trial_points(spec: dict[str, Any]) -> list[str]:
    """Return the point keys a trial spec evaluates."""
    return [point_key(spec["pruner"], spec["pruning_ratio"], s) for s in spec["finetune_steps"]]


def trial_config_for(config: GridConfig, spec: dict[str, Any]) -> TrialConfig:
    """Return the base trial settings with the spec's pruner, ratio and milestones."""
    trial = dataclasses.replace(
        config.trial,
        pruner=spec["pruner"],
        pruning_ratio=spec["pruning_ratio"],
        finetune_steps=list(spec["finetune_steps"]),
    )
    if config.resources.cpus_per_trial >= 1 and trial.num_threads == 0:
        trial.num_threads = int(config.resources.cpus_per_trial)
    return trial


def validate_grid(config: GridConfig) -> list[dict[str, Any]]:
    """Validate every point of the grid before any work; return the trial specs."""
    if not config.pruners and not config.include_dense:
        raise ValueError("pruners is empty and include_dense is false, so the sweep has no point; add a pruner")
    if not config.ratios and config.pruners:
        raise ValueError("ratios is empty; give at least one pruning ratio in (0, 1), for example ratios=[0.5]")
    duplicates = {r for r in config.ratios if config.ratios.count(r) > 1} | {
        p for p in config.pruners if config.pruners.count(p) > 1
    }
    if duplicates:
        raise ValueError(f"pruners and ratios must not repeat a value, got repeated {sorted(map(str, duplicates))}")
    r = config.resources
    if r.cpus_per_trial <= 0 or r.gpus_per_trial < 0:
        raise ValueError(
            f"resources.cpus_per_trial must be > 0 and resources.gpus_per_trial >= 0, got {r.cpus_per_trial} and {r.gpus_per_trial}"
        )
    specs = expand_grid(config)
    for spec in specs:
        validate_trial_config(trial_config_for(config, spec))
    return specs


def sweep_key(config: GridConfig) -> str:
    """Return a key of everything that changes the sweep's numbers (not where or how it runs)."""
    trial = dataclasses.asdict(config.trial)
    for name in ("cache_dir", "output_dir", "device", "num_threads"):
        trial.pop(name, None)
    return content_key(config.name, config.pruners, config.ratios, sorted(config.finetune_steps), config.include_dense, trial)


def to_grid_config(config: GridConfig | DictConfig | dict) -> GridConfig:
    """Build a typed GridConfig; an unknown key raises ValueError, a wrong type omegaconf's ValidationError."""
    if isinstance(config, GridConfig):
        return config
    return typed_config(GridConfig, config)


def row_from_result(result: dict[str, Any]) -> dict[str, Any]:
    """Recover the trial's result row from what Ray reported."""
    return json.loads(result["row_json"])


def point_label(spec: dict[str, Any]) -> str:
    """Return the short name of a trial spec shown in Ray's live table, for example `l1@0.5`."""
    return f"{spec['pruner']}@{float(spec['pruning_ratio']):.12g}"


def resolve_point(point: str | dict[str, Any], points: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Return the spec of a trial: `point` itself, or the entry of `points` it labels."""
    return point if isinstance(point, dict) else points[point]


def tune_trainable(config: dict[str, Any], points: dict[str, dict[str, Any]] | None = None) -> None:
    """Ray Tune function trainable: run one trial and report each milestone's row.

    `config["point"]` is the trial's spec with its settings under `trial`, or a label that
    `points` maps to one.
    """
    import ray
    from ray import tune

    from biasprune.trial import run_trial

    trial_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrialConfig), resolve_point(config["point"], points)["trial"]))
    node_id = ray.get_runtime_context().get_node_id()

    def report(row: dict[str, Any]) -> None:
        summary = {k: row[k] for k in POINT_KEY_FIELDS}
        summary["quality"] = row.get(row.get("quality_metric", ""), math.nan)
        for name in ("fairness_divergence", "macs", "unknown_rate"):
            summary[name] = row.get(name, math.nan)
        tune.report({**summary, "node_id": node_id, "row_json": json.dumps(row)})

    run_trial(trial_config, on_result=report)


def _format_duration(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class SweepRecorder:
    """Writes each finished or failed point to MLflow and to the sweep's Parquet tables.

    Only the driver uses it, so the tracking store has a single writer however many trials
    run at once.
    """

    def __init__(
        self,
        tracker,
        output_dir: Path,
        groups: dict[str, list[str]],
        references,
        cache_dir: Path,
        config_yaml: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self.tracker = tracker
        self.config_yaml = config_yaml
        self.output_dir = output_dir
        self.groups = groups
        self.references = references
        self.cache_dir = cache_dir
        self.trials_path = output_dir / "trials.parquet"
        self.predictions_path = output_dir / "predictions.parquet"
        self.recorded: set[str] = set()

    def record(self, row: dict[str, Any], node_id: str = "") -> None:
        """Log a finished point: MLflow child run with artifacts, a trials row and its predictions.

        `node_id` is the Ray node that ran the trial; it goes to the Parquet row only.
        """
        import pyarrow.parquet as pq

        from biasprune import artifacts, results

        key = point_key(row["pruner"], row["pruning_ratio"], row["finetune_steps"])
        point_dir = self.output_dir / "points" / results.point_name(row)
        evaluation_dir = self.cache_dir / "evaluations" / row["evaluation_key"]
        files = artifacts.write_point_artifacts(evaluation_dir, row, self.groups, self.references, point_dir)
        self.tracker.log_point(row, files, config_yaml=self.config_yaml(row) if self.config_yaml else None)
        table = pq.read_table(files[artifacts.PREDICTIONS_TABLE_FILENAME])
        results.upsert_trials(self.trials_path, [{**row, "node_id": node_id, "status": "finished", "error": ""}])
        results.upsert_predictions(self.predictions_path, table)
        self.recorded.add(key)

    def record_failure(self, spec: dict[str, Any], error: str) -> None:
        """Log every unfinished point of a failed trial as failed, with its error."""
        from biasprune import results

        rows = []
        for steps in spec["finetune_steps"]:
            key = point_key(spec["pruner"], spec["pruning_ratio"], steps)
            if key in self.recorded:
                continue
            row = {"pruner": spec["pruner"], "pruning_ratio": spec["pruning_ratio"], "finetune_steps": steps}
            self.tracker.log_point(row, None, status="FAILED", error=error)
            rows.append({**row, "status": "failed", "error": error})
        if rows:
            results.upsert_trials(self.trials_path, rows)
        logger.warning("trial %s ratio %s failed: %s", spec["pruner"], spec["pruning_ratio"], error)


class RecordingCallback(tune.Callback):
    """Records results in the driver as Ray reports them.

    Ray Tune pickles its callbacks with the experiment state. A recorder holds a lock and a
    database client, so it is left out of the pickled state.
    """

    def __init__(self, recorder: SweepRecorder, points: dict[str, dict[str, Any]] | None = None) -> None:
        self.recorder = recorder
        self.points = points

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        try:
            self.recorder.record(row_from_result(result), result.get("node_id", ""))
        except Exception:  # a tracking failure must not stop the other trials
            logger.exception("recording the result of trial %s failed", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            self.recorder.record_failure(resolve_point(trial.config["point"], self.points), _trial_error(trial))
        except Exception:  # a tracking failure must not stop the other trials
            logger.exception("recording the failure of trial %s failed", trial.trial_id)


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        text = Path(path).read_text().strip().splitlines()
        # The last line of Ray's error file is the exception of the trial function.
        return text[-1] if text else "unknown error"
    return "unknown error (Ray wrote no error file)"


def run_grid(
    config: GridConfig | DictConfig | dict,
    after_sweep: Callable[[Path, str, str], Path | None] | None = None,
):
    """Run the grid sweep and return its summary table (pandas DataFrame, one row per point).

    Args:
        config: The sweep's settings (see `GridConfig`).
        after_sweep: Called with (output folder, tracking URI, parent run id) once every point is
            recorded, while the tracking store is still up; `sweeps/grid.py` writes the study report
            with it (`biasprune.report.report_after_sweep`). Its return value, a path or None,
            is kept as ``table.attrs["report"]``.

    Raises:
        ValueError, FileNotFoundError: An invalid setting, raised before Ray starts.
    """
    from biasprune import results, tracking
    from biasprune.cache import cache_root
    from biasprune.trial import open_measurer

    cfg = to_grid_config(config)
    specs = validate_grid(cfg)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_root(cfg.trial.cache_dir)
    cfg.trial.cache_dir = str(cache_dir)  # every worker must read the same cache
    key = sweep_key(cfg)
    started = time.perf_counter()
    logger.info("sweep %s (%s): %d trials, milestones %s, output %s", cfg.name, key, len(specs), cfg.finetune_steps, output_dir)

    # 1. The world and the dense reference are built once here, not by each trial in parallel.
    world, measurer = open_measurer(trial_config_for(cfg, specs[0]))
    references = measurer.references()

    server = tracking.LocalTrackingServer(output_dir / "mlflow") if cfg.tracking.server else None
    uri = server.__enter__().uri if server else (cfg.tracking.uri or tracking.default_tracking_uri(Path.cwd()))
    try:
        tracker = tracking.SweepTracker(
            uri, cfg.tracking.experiment, key, cfg.name, OmegaConf.to_yaml(OmegaConf.structured(cfg)),
            {f"world.{k}": v for k, v in world.content_hashes.items()} | {"world": world.name, "model": world.model_id},
        )  # fmt: skip
        recorder = SweepRecorder(
            tracker, output_dir, world.groups, references, cache_dir, lambda row: _resolved_trial_yaml(cfg, row)
        )

        # 2. Points that already have a finished run and a Parquet row are not run again.
        done = tracker.finished_points() & _finished_rows(results, recorder.trials_path)
        recorder.recorded |= done
        pending = [s for s in specs if not set(trial_points(s)) <= done]
        logger.info("%d of %d trials already finished; running %d", len(specs) - len(pending), len(specs), len(pending))

        failed = 0
        if pending:
            failed = _run_tune(cfg, pending, recorder, output_dir)
        tracker.finish("FINISHED" if not failed else "FAILED")
        report = after_sweep(output_dir, uri, tracker.parent_run_id) if after_sweep else None
    finally:
        if server:
            server.__exit__(None, None, None)

    table = summary_table(results.read_trials(recorder.trials_path), cfg)
    table.attrs["report"] = str(report) if report else ""  # the study report's HTML page, for the CLI
    logger.info("sweep %s finished in %s", cfg.name, _format_duration(time.perf_counter() - started))
    return table


def _resolved_trial_yaml(cfg: GridConfig, row: dict[str, Any]) -> str:
    """Return the resolved settings of the trial that measured `row`, as YAML."""
    steps = [0] if row["pruner"] == DENSE else sorted({int(s) for s in cfg.finetune_steps})
    spec = {"pruner": row["pruner"], "pruning_ratio": row["pruning_ratio"], "finetune_steps": steps}
    return OmegaConf.to_yaml(OmegaConf.structured(trial_config_for(cfg, spec)))


def _finished_rows(results, path: Path) -> set[str]:
    if not path.is_file():
        return set()
    frame = results.read_trials(path)
    frame = frame[frame["status"] == "finished"]
    return {point_key(p, r, s) for p, r, s in zip(frame["pruner"], frame["pruning_ratio"], frame["finetune_steps"])}


def trial_resources(resources: ResourcesConfig, device: str, cluster_gpus: float) -> dict[str, float]:
    """Return what Ray reserves per trial; 0 GPUs means one GPU each when the cluster has GPUs and the trial may use one."""
    gpus = resources.gpus_per_trial
    if gpus == 0 and cluster_gpus > 0 and device != "cpu":
        logger.info("the Ray cluster has %g GPU(s): each trial gets one (set resources.gpus_per_trial to change)", cluster_gpus)
        gpus = 1.0
    return {"cpu": resources.cpus_per_trial, "gpu": gpus}


def _run_tune(cfg: GridConfig, pending: list[dict[str, Any]], recorder: SweepRecorder, output_dir: Path) -> int:
    import ray
    from ray import tune

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=False)  # fmt: skip
    # Ray's live table shows the grid value, so it is a short label and the settings travel separately.
    points = {
        point_label(spec): {**spec, "trial": OmegaConf.to_container(OmegaConf.structured(trial_config_for(cfg, spec)))}
        for spec in pending
    }
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, points=points),
        trial_resources(cfg.resources, cfg.trial.device, ray.cluster_resources().get("GPU", 0)),
    )
    param_space = {"point": tune.grid_search(list(points))}
    reporter = tune.CLIReporter(
        parameter_columns={"point": "point"},
        metric_columns={"finetune_steps": "steps", "quality": "quality", "fairness_divergence": "fairness_div",
                        "macs": "macs", "unknown_rate": "unknown"},
        max_report_frequency=30,
    )  # fmt: skip
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials or None),
        run_config=tune.RunConfig(
            name=f"{cfg.name}-{int(time.time())}",
            storage_path=str(output_dir / "ray"),
            callbacks=[RecordingCallback(recorder, points)],
            progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    return sum(1 for result in grid if result.error is not None)


def summary_table(frame, cfg: GridConfig | None = None):
    """Sort result rows like the study's table: dense first, then by pruner, ratio and steps."""
    order = {DENSE: -1}
    if cfg is not None:
        order |= {p: i for i, p in enumerate(cfg.pruners)}
    frame = frame.copy()
    frame["_order"] = frame["pruner"].map(lambda p: order.get(p, len(order)))
    frame = frame.sort_values(["_order", "pruner", "pruning_ratio", "finetune_steps"]).drop(columns="_order")
    return frame.reset_index(drop=True)


SUMMARY_COLUMNS = (
    "pruner", "pruning_ratio", "finetune_steps", "status", "quality_metric", "params", "macs",
    "fairness_divergence", "fairness_divergence_ci_low", "fairness_divergence_ci_high",
    "ratio_gender", "ratio_race", "ratio_age", "unknown_rate", "error",
)  # fmt: skip


def format_summary(frame) -> str:
    """Return the summary table as fixed-width text with the quality metric in its own column."""
    frame = frame.copy()
    if "quality_metric" in frame:
        frame["quality"] = [
            row.get(metric) if isinstance(metric, str) and metric in row else math.nan
            for metric, row in zip(frame["quality_metric"], frame.to_dict("records"))
        ]
    columns = [c for c in SUMMARY_COLUMNS if c in frame] + (["quality"] if "quality" in frame else [])
    return frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}")
