"""Multi-objective search of the pruning level: Optuna inside Ray Tune, tracked like the grid sweep.

Each Ray trial evaluates one point (pruner, pruning ratio, fine-tune steps) that Optuna's
sampler proposes, and reports three objectives, all minimised: the quality metric (``fid``, or
``fd_<extractor>`` when FID is off), ``macs`` and ``fairness_divergence``. The study lives in an
Optuna RDB storage (SQLite beside the MLflow store by default). Running the search again with
the same study name continues the study up to ``num_trials`` trials in total, without
repeating the trials already in it.

Recording is the grid sweep's: the driver turns each reported row into an MLflow child run and
a ``trials.parquet`` row (`biasprune.sweep.RecordingCallback`). The dense baseline is evaluated
once in the driver. At the end the driver computes the Pareto front of the study's points, its
hypervolume and the fairness-aware pruning level (`biasprune.pareto`), writes them to the
output folder and logs them on the MLflow parent run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from biasprune import pareto
from biasprune.cache import content_key
from biasprune.config import DENSE, TrialConfig, typed_config, validate_trial_config
from biasprune.sweep import ResourcesConfig, TrackingConfig

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")

OBJECTIVE_KEYS = ("quality", "macs", "fairness_divergence")
"""Keys of the objectives in the results that `biasprune.sweep.tune_trainable` reports; ``quality``
is the value of the row's quality metric."""

QUALITY_ALIAS = "quality"
"""A constraint on this name applies to the quality metric, whichever it is (``fid`` or ``fd_*``)."""

FRONT_FILENAME = "front.parquet"
PLOT_FILENAME = "pareto_front.png"
SUMMARY_FILENAME = "summary.json"
RECOMMENDATION_FILENAME = "recommendation.txt"

TAG_RECOMMENDED_RATIO = "biasprune.recommended_ratio"
TAG_RECOMMENDED_PRUNER = "biasprune.recommended_pruner"
TAG_RECOMMENDED_STEPS = "biasprune.recommended_steps"
TAG_RECOMMENDED_POINT = "biasprune.recommended_point"
TAG_RECOMMENDATION_REASON = "biasprune.recommendation_reason"

_STUDY_KEY_ATTR = "biasprune.search_key"
_MAX_TAG_CHARS = 5000


@dataclass
class ParetoConfig:
    """A multi-objective search over pruner × pruning ratio × fine-tune steps.

    Attributes:
        study_name: Optuna study name; the MLflow parent run is named after it. A re-run with
            the same name and storage continues the study.
        pruners: Pruners to choose from (categorical).
        ratio_min: Smallest pruning ratio, in (0, 1).
        ratio_max: Largest pruning ratio, in [ratio_min, 1).
        ratio_step: Grid step of the ratio; 0 (default) searches it continuously. A step lets
            repeated proposals reuse cached pruned models and checkpoints.
        finetune_steps: Fine-tune step counts to choose from (categorical). A point with more
            steps continues from the cached checkpoint of the same pruned model.
        num_trials: Trials the study should contain in total; a re-run adds only the missing ones.
        max_concurrent_trials: Trials running at once; 0 lets Ray decide by resources.
        sampler: ``tpe`` (multivariate TPE, the default), ``nsga2`` (NSGA-II with a population of
            ``startup_trials``) or ``random``.
        sampler_seed: Seed of the sampler. A re-run adds the number of trials already in the
            study to it, so that it does not propose the first run's points again.
        startup_trials: Random trials before TPE models the objectives, or NSGA-II's population size.
        constraints: Upper bounds, metric → maximum, e.g. ``{macs: 5.0e6}``; ``quality`` names the
            quality metric. Infeasible points are never on the front nor recommended. The
            sampler does not see the constraints.
        quality_tolerance: Quality loss the recommendation allows against the dense model.
        tolerance_kind: ``relative`` (quality <= dense × (1 + tolerance)) or ``absolute``
            (quality <= dense + tolerance).
        reference_point: Hypervolume reference (quality, macs, fairness_divergence); empty uses
            each objective's maximum over the feasible points × 1.1.
        storage: Optuna RDB URL; empty uses ``optuna.db`` beside a SQLite MLflow store, else
            ``./mlflow/optuna.db``.
        output_dir: Folder of trials.parquet, predictions.parquet, front.parquet, the plot and
            Ray's files.
        trial: Base settings of every trial; `pruner`, `pruning_ratio` and `finetune_steps` are
            set per point.
        resources: Resources per trial.
        tracking: MLflow settings.
        ray_address: Address of a Ray cluster to join; empty uses $RAY_ADDRESS, else a local Ray.
    """

    study_name: str = "pareto"
    pruners: list[str] = field(default_factory=lambda: ["diff-pruning", "l1", "random"])
    ratio_min: float = 0.1
    ratio_max: float = 0.75
    ratio_step: float = 0.0
    finetune_steps: list[int] = field(default_factory=lambda: [0, 200, 400])
    num_trials: int = 14
    max_concurrent_trials: int = 2
    sampler: str = "tpe"
    sampler_seed: int = 0
    startup_trials: int = 5
    constraints: dict[str, float] = field(default_factory=dict)
    quality_tolerance: float = 0.25
    tolerance_kind: str = "relative"
    reference_point: list[float] | None = None
    storage: str | None = None
    output_dir: str = "outputs/pareto"
    trial: TrialConfig = field(default_factory=TrialConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray_address: str | None = None


@dataclass
class SearchResult:
    """Outcome of a search: the study, its points, the front and the recommendation; `format_report` prints it.

    Attributes:
        study_name: The Optuna study.
        storage: The Optuna storage URL.
        trials_in_study: Trials of the study that ended (complete, failed or pruned).
        trials_run: Trials this run added.
        points: The trials.parquet rows of the study's points and of the dense baseline.
        dense_row: The dense baseline's row.
        objectives: The three minimised columns: quality metric, ``macs``, ``fairness_divergence``.
        constraints: The constraints as applied, keyed by column.
        front: The Pareto-optimal rows.
        hypervolume: Hypervolume of the front; NaN when no point is feasible.
        reference_point: The hypervolume reference, one value per objective; empty when no point is feasible.
        reference_is_default: Whether the reference is the default (maximum × 1.1).
        recommendation: The fairness-aware pruning level and its reason.
        output_dir: Where the files went.
    """

    study_name: str
    storage: str
    trials_in_study: int
    trials_run: int
    points: pd.DataFrame
    dense_row: dict[str, Any]
    objectives: list[str]
    constraints: dict[str, float]
    front: pd.DataFrame
    hypervolume: float
    reference_point: list[float]
    reference_is_default: bool
    recommendation: pareto.Recommendation
    output_dir: Path


def to_pareto_config(config: ParetoConfig | DictConfig | dict) -> ParetoConfig:
    """Build a typed ParetoConfig; an unknown key raises ValueError, a wrong type omegaconf's ValidationError."""
    if isinstance(config, ParetoConfig):
        return config
    return typed_config(ParetoConfig, config)


def validate_pareto(config: ParetoConfig) -> None:
    """Raise ValueError for a setting that cannot run, before Ray, Optuna or any model starts."""
    from biasprune.finetune import validate_milestones
    from biasprune.pruning import validate_pruning_args

    c = config
    if not c.study_name.strip():
        raise ValueError("study_name is empty; name the study, e.g. study_name=pareto")
    if not c.pruners or DENSE in c.pruners or len(set(c.pruners)) != len(c.pruners):
        raise ValueError(
            f"pruners must list distinct pruners without {DENSE!r} (the dense baseline is always evaluated), "
            f"got {list(c.pruners)}; for example pruners=[l1,random]"
        )
    if not 0 < c.ratio_min <= c.ratio_max < 1:
        raise ValueError(
            f"the pruning ratio range must satisfy 0 < ratio_min <= ratio_max < 1, got ratio_min={c.ratio_min} "
            f"and ratio_max={c.ratio_max}; for example ratio_min=0.1 ratio_max=0.75"
        )
    if c.ratio_step < 0 or (c.ratio_step > 0 and c.ratio_step > c.ratio_max - c.ratio_min + 1e-12):
        raise ValueError(
            f"ratio_step must be 0 (continuous) or in (0, ratio_max - ratio_min], got {c.ratio_step}"
        )
    for pruner in c.pruners:
        validate_pruning_args(pruner, c.ratio_max)
    if not c.finetune_steps or len(set(c.finetune_steps)) != len(c.finetune_steps):
        raise ValueError(f"finetune_steps must list distinct step counts, got {list(c.finetune_steps)}; for example finetune_steps=[0,200,400]")
    for steps in c.finetune_steps:
        validate_milestones([int(steps)])
    if c.num_trials < 1:
        raise ValueError(f"num_trials must be at least 1, got {c.num_trials}")
    if c.max_concurrent_trials < 0:
        raise ValueError(f"max_concurrent_trials must be >= 0 (0 lets Ray decide), got {c.max_concurrent_trials}")
    if c.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {c.sampler!r}")
    if c.startup_trials < (2 if c.sampler == "nsga2" else 1):
        raise ValueError(
            f"startup_trials must be >= 1 (>= 2 for nsga2, its population size), got {c.startup_trials}"
        )
    if c.tolerance_kind not in pareto.TOLERANCE_KINDS:
        raise ValueError(f"tolerance_kind must be one of {list(pareto.TOLERANCE_KINDS)}, got {c.tolerance_kind!r}")
    if not (math.isfinite(c.quality_tolerance) and c.quality_tolerance >= 0):
        raise ValueError(f"quality_tolerance must be a finite number >= 0, got {c.quality_tolerance}")
    bad = {k: v for k, v in c.constraints.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"constraints must map a metric to a finite maximum, got {bad}; e.g. constraints={{macs: 5.0e6}}")
    if c.reference_point is not None and (
        len(c.reference_point) != len(OBJECTIVE_KEYS) or not all(math.isfinite(v) for v in c.reference_point)
    ):
        raise ValueError(
            f"reference_point must be empty or 3 finite values (quality, macs, fairness_divergence), "
            f"got {list(c.reference_point)}"
        )
    r = c.resources
    if r.cpus_per_trial <= 0 or r.gpus_per_trial < 0:
        raise ValueError(
            f"resources.cpus_per_trial must be > 0 and resources.gpus_per_trial >= 0, got {r.cpus_per_trial} and {r.gpus_per_trial}"
        )
    validate_trial_config(_trial_config_for(c, DENSE, 0.0, 0))
    for pruner in c.pruners:
        validate_trial_config(_trial_config_for(c, pruner, c.ratio_max, max(c.finetune_steps)))


def search_key(config: ParetoConfig) -> str:
    """Return a key of the search space and trial settings, the things that change a point's numbers.

    The budget, sampler, constraints and rule settings are left out: a re-run may change them
    and still continue the same study and MLflow parent run.
    """
    trial = dataclasses.asdict(config.trial)
    for name in ("cache_dir", "output_dir", "device", "num_threads", "pruner", "pruning_ratio", "finetune_steps"):
        trial.pop(name, None)
    return content_key(
        "pareto", config.study_name, config.pruners, config.ratio_min, config.ratio_max, config.ratio_step,
        sorted(int(s) for s in config.finetune_steps), trial,
    )  # fmt: skip


def make_sampler(name: str, seed: int, startup_trials: int):
    """Return the Optuna sampler for a small multi-objective budget.

    NSGA-II's default population of 50 makes its first 50 trials random, so with the default
    budget of 14 trials it would never leave random search. The default is therefore
    multivariate TPE (it supports several objectives), which models the objectives after
    ``startup_trials`` random trials and models the parameters jointly, because the best ratio
    depends on the pruner and the steps. ``constant_liar`` keeps two concurrent trials from
    being proposed the same point. ``nsga2`` uses a population of ``startup_trials``.

    Args:
        name: ``tpe``, ``nsga2`` or ``random``.
        seed: The sampler's seed.
        startup_trials: Random trials before TPE models the objectives, or NSGA-II's population.
    """
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(
            multivariate=True, n_startup_trials=startup_trials, constant_liar=True, seed=seed
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=startup_trials, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")


def default_storage_url(tracking_uri: str) -> str:
    """Return the Optuna storage beside the MLflow store: ``<db folder>/optuna.db`` for SQLite.

    For another tracking URI (a server) it is ``./mlflow/optuna.db`` under the working directory.
    """
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
        return f"sqlite:///{database.parent / 'optuna.db'}"
    folder = Path.cwd() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def run_search(config: ParetoConfig | DictConfig | dict) -> SearchResult:
    """Run (or continue) the search, then write and log its front, hypervolume and recommendation.

    Returns:
        The search's result; the files are in ``output_dir``: front.parquet, pareto_front.png,
        summary.json, recommendation.txt, beside trials.parquet and predictions.parquet.

    Raises:
        ValueError, FileNotFoundError: An invalid setting, raised before Ray starts; a study of
            the same name whose search space or trial settings differ.
    """
    from biasprune import results, tracking
    from biasprune.cache import cache_root
    from biasprune.sweep import SweepRecorder
    from biasprune.trial import open_measurer

    # 1. Validate, and open the study, before any model is loaded.
    cfg = to_pareto_config(config)
    validate_pareto(cfg)
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_root(cfg.trial.cache_dir)
    cfg.trial.cache_dir = str(cache_dir)  # every worker must read the same cache
    key = search_key(cfg)
    started = time.perf_counter()

    server = tracking.LocalTrackingServer(output_dir / "mlflow") if cfg.tracking.server else None
    uri = server.__enter__().uri if server else (cfg.tracking.uri or tracking.default_tracking_uri(Path.cwd()))
    try:
        storage_url = cfg.storage or default_storage_url(uri)
        storage, study = _open_study(storage_url, cfg.study_name, key)
        logger.info(
            "search %s (%s): %d trials in total, sampler %s (seed %d), storage %s, output %s",
            cfg.study_name, key, cfg.num_trials, cfg.sampler, cfg.sampler_seed, storage_url, output_dir,
        )  # fmt: skip

        # 2. The world, the references and the dense baseline are computed once, in the driver.
        world, measurer = open_measurer(_trial_config_for(cfg, DENSE, 0.0, 0))
        references = measurer.references()
        tracker = tracking.SweepTracker(
            uri, cfg.tracking.experiment, key, cfg.study_name, OmegaConf.to_yaml(OmegaConf.structured(cfg)),
            {f"world.{k}": v for k, v in world.content_hashes.items()}
            | {"world": world.name, "model": world.model_id, "biasprune.optuna_study": cfg.study_name,
               "biasprune.optuna_storage": storage_url},
        )  # fmt: skip
        recorder = SweepRecorder(tracker, output_dir, world.groups, references, cache_dir)
        recorder.recorded |= _recorded_points(tracker, recorder.trials_path)
        dense_row = measurer.evaluate_dense()
        if results.point_key_text(dense_row) not in recorder.recorded:
            recorder.record(dense_row)
        objectives = [dense_row["quality_metric"], "macs", "fairness_divergence"]
        constraints = _resolve_constraints(cfg.constraints, dense_row)

        # 3. Trials left running by an interrupted run are settled, then the missing ones run.
        _settle_stale_trials(study, recorder.trials_path, dense_row["quality_metric"])
        done = _ended_trials(study)
        pending = max(0, cfg.num_trials - done)
        logger.info("study %s has %d ended trial(s); running %d more", cfg.study_name, done, pending)
        if pending:
            sampler = make_sampler(cfg.sampler, cfg.sampler_seed + done, cfg.startup_trials)
            _run_tune(cfg, storage, sampler, pending, recorder, output_dir)

        # 4. Front, hypervolume and recommendation over the study's points.
        points = _study_points(study, results.read_trials(recorder.trials_path))
        result = _analyse(cfg, storage_url, study, points, dense_row, objectives, constraints, pending, output_dir)
        _write_outputs(result)
        _log_parent(tracker, result)
        tracker.finish("FINISHED" if (points["status"] == "finished").all() else "FAILED")
    finally:
        if server:
            server.__exit__(None, None, None)
    logger.info("search %s finished in %.0f s", cfg.study_name, time.perf_counter() - started)
    return result


def _trial_config_for(cfg: ParetoConfig, pruner: str, ratio: float, steps: int) -> TrialConfig:
    trial = dataclasses.replace(cfg.trial, pruner=pruner, pruning_ratio=ratio, finetune_steps=[int(steps)])
    if cfg.resources.cpus_per_trial >= 1 and trial.num_threads == 0:
        trial.num_threads = int(cfg.resources.cpus_per_trial)
    return trial


# --- the Optuna study -----------------------------------------------------------------------------


def _open_study(storage_url: str, study_name: str, key: str):
    """Create or load the study; a loaded one must have three minimised objectives and the same key."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=["minimize"] * len(OBJECTIVE_KEYS), load_if_exists=True
    )
    if study.directions != [optuna.study.StudyDirection.MINIMIZE] * len(OBJECTIVE_KEYS):
        raise ValueError(
            f"study {study_name!r} in {storage_url} has directions {[d.name for d in study.directions]}, but the search "
            "needs three minimised objectives; choose another study_name"
        )
    existing = study.user_attrs.get(_STUDY_KEY_ATTR)
    if existing is None:
        study.set_user_attr(_STUDY_KEY_ATTR, key)
    elif existing != key:
        raise ValueError(
            f"study {study_name!r} in {storage_url} was run with another search space or other trial settings "
            f"(key {existing}, now {key}), so its points cannot share a front; choose another study_name, or "
            "restore the settings it was run with"
        )
    return storage, study


def _ended_trials(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _settle_stale_trials(study, trials_path: Path, quality_metric: str) -> None:
    """End trials that an interrupted run left running, so they count toward the total.

    A trial whose point already has a finished Parquet row is completed with its objectives;
    any other is marked failed. Only one driver may run a study at a time.
    """
    from optuna.trial import TrialState

    from biasprune import results

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    if not stale:
        return
    rows = _rows_by_key(results.read_trials(trials_path)) if trials_path.is_file() else {}
    for trial in stale:
        row = rows.get(_param_key(trial.params)) if trial.params else None
        values = None if row is None else [row.get(quality_metric), row.get("macs"), row.get("fairness_divergence")]
        if values is not None and all(_is_finite(v) for v in values):
            study.tell(trial.number, [float(v) for v in values], skip_if_finished=True)
            logger.warning("trial %d of study %s was left running; completed it from its recorded row", trial.number, study.study_name)
        else:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            logger.warning("trial %d of study %s was left running by an interrupted run; marked failed", trial.number, study.study_name)


def _study_points(study, frame: pd.DataFrame) -> pd.DataFrame:
    """Return the Parquet rows of the study's proposed points, and the dense row."""
    from biasprune import results

    keys = {_param_key(t.params) for t in study.get_trials(deepcopy=False) if t.params}
    row_keys = [results.point_key_text(row) for row in frame[list(results.POINT_KEY_COLUMNS)].to_dict("records")]
    keep = [k in keys or row["pruner"] == DENSE for k, row in zip(row_keys, frame.to_dict("records"))]
    return frame[keep].reset_index(drop=True)


def _param_key(params: dict[str, Any]) -> str:
    from biasprune import results

    return results.point_key_text(
        {"pruner": params["pruner"], "pruning_ratio": _ratio(params["pruning_ratio"]), "finetune_steps": int(params["finetune_steps"])}
    )


def _ratio(value: float) -> float:
    # A stepped FloatDistribution returns low + k × step with float noise (0.35000000000000003).
    return round(float(value), 10)


def _rows_by_key(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    from biasprune import results

    records = frame[frame["status"] == "finished"].to_dict("records")
    return {results.point_key_text(row): row for row in records}


def _recorded_points(tracker, trials_path: Path) -> set[str]:
    """Return the points with both a finished MLflow child run and a finished Parquet row."""
    from biasprune import results

    if not trials_path.is_file():
        return set()
    return tracker.finished_points() & set(_rows_by_key(results.read_trials(trials_path)))


def _resolve_constraints(constraints: dict[str, float], dense_row: dict[str, Any]) -> dict[str, float]:
    """Map ``quality`` to the quality metric and check that every constrained metric exists."""
    resolved = {(dense_row["quality_metric"] if k == QUALITY_ALIAS else k): float(v) for k, v in constraints.items()}
    metrics = sorted(k for k, v in dense_row.items() if _is_finite(v) and not k.startswith("share_"))
    unknown = [k for k in resolved if k not in metrics]
    if unknown:
        raise ValueError(
            f"constraints name unknown metric(s) {unknown}; the points have {metrics} "
            f"(and {QUALITY_ALIAS!r} for the quality metric, here {dense_row['quality_metric']!r})"
        )
    return resolved


# --- Ray Tune -------------------------------------------------------------------------------------


class _SearchSpace:
    """Define-by-run space: Optuna proposes (pruner, ratio, steps), and the Ray config gets the point.

    The returned ``point`` has the shape the grid sweep's trainable and recording callback read:
    ``pruner``, ``pruning_ratio``, ``finetune_steps`` (a one-element list) and the full ``trial``
    settings. A class, not a closure, because Ray pickles the searcher with its space.
    """

    def __init__(self, cfg: ParetoConfig) -> None:
        self.pruners = list(cfg.pruners)
        self.ratio_min, self.ratio_max = float(cfg.ratio_min), float(cfg.ratio_max)
        self.ratio_step = float(cfg.ratio_step) or None
        self.finetune_steps = [int(s) for s in cfg.finetune_steps]
        self.trial = OmegaConf.to_container(OmegaConf.structured(_trial_config_for(cfg, self.pruners[0], self.ratio_min, 0)))

    def __call__(self, ot_trial) -> dict[str, Any]:
        pruner = ot_trial.suggest_categorical("pruner", self.pruners)
        ratio = _ratio(ot_trial.suggest_float("pruning_ratio", self.ratio_min, self.ratio_max, step=self.ratio_step))
        steps = int(ot_trial.suggest_categorical("finetune_steps", self.finetune_steps))
        trial = {**self.trial, "pruner": pruner, "pruning_ratio": ratio, "finetune_steps": [steps]}
        return {"point": {"pruner": pruner, "pruning_ratio": ratio, "finetune_steps": [steps], "trial": trial}}


def _run_tune(cfg: ParetoConfig, storage, sampler, num_samples: int, recorder, output_dir: Path) -> None:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from biasprune.sweep import RecordingCallback, trial_resources, tune_trainable

    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    searcher = OptunaSearch(
        space=_SearchSpace(cfg), metric=list(OBJECTIVE_KEYS), mode=["min"] * len(OBJECTIVE_KEYS),
        sampler=sampler, study_name=cfg.study_name, storage=storage,
    )  # fmt: skip
    resources = trial_resources(cfg.resources, cfg.trial.device, ray.cluster_resources().get("GPU", 0))
    trainable = tune.with_resources(tune_trainable, resources)
    reporter = tune.CLIReporter(
        parameter_columns={"pruner": "pruner", "pruning_ratio": "ratio", "finetune_steps": "steps"},
        metric_columns={"quality": "quality", "fairness_divergence": "fairness_div", "macs": "macs",
                        "unknown_rate": "unknown"},
        max_report_frequency=30,
    )  # fmt: skip
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=num_samples, max_concurrent_trials=cfg.max_concurrent_trials or None
        ),
        run_config=tune.RunConfig(
            name=f"{cfg.study_name}-{int(time.time())}",
            storage_path=str(output_dir / "ray"),
            callbacks=[RecordingCallback(recorder)],
            progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    failed = sum(1 for result in grid if result.error is not None)
    if failed:
        logger.warning("%d of %d trial(s) of study %s failed; they are recorded as failed points", failed, num_samples, cfg.study_name)


# --- analysis and outputs -------------------------------------------------------------------------


def _analyse(cfg, storage_url, study, points, dense_row, objectives, constraints, trials_run, output_dir) -> SearchResult:
    pruned = points[points["pruner"] != DENSE]
    front = pareto.pareto_front(pruned, objectives, constraints)
    reference_is_default = cfg.reference_point is None
    if not reference_is_default:
        reference = np.asarray(cfg.reference_point, dtype=float)
    elif pareto.feasible_mask(pruned, objectives, constraints).any():
        reference = pareto.default_reference_point(pruned, objectives, constraints)
    else:
        reference = np.empty(0)
    volume = pareto.hypervolume(front[objectives].to_numpy(dtype=float), reference) if reference.size else math.nan
    recommendation = pareto.recommend(
        points, dense_row, quality_metric=objectives[0], quality_tolerance=cfg.quality_tolerance,
        tolerance_kind=cfg.tolerance_kind, constraints=constraints,
    )  # fmt: skip
    return SearchResult(
        study_name=cfg.study_name, storage=storage_url, trials_in_study=_ended_trials(study), trials_run=trials_run,
        points=points, dense_row=dense_row, objectives=objectives, constraints=constraints, front=front,
        hypervolume=volume, reference_point=[float(v) for v in reference], reference_is_default=reference_is_default,
        recommendation=recommendation, output_dir=output_dir,
    )  # fmt: skip


def front_table(result: SearchResult) -> pd.DataFrame:
    """Return the front's key columns: pruner, ratio, steps, the objectives and the fairness interval."""
    columns = ["pruner", "pruning_ratio", "finetune_steps", *result.objectives,
               pareto.FAIRNESS_CI_LOW, pareto.FAIRNESS_CI_HIGH, "params"]  # fmt: skip
    return result.front[[c for c in columns if c in result.front]].reset_index(drop=True)


def format_report(result: SearchResult) -> str:
    """Return the front table, the hypervolume with its reference point and the recommendation as text."""
    lines = [
        f"Study {result.study_name!r}: {result.trials_in_study} trial(s) ({result.trials_run} run now), "
        f"{int((result.points['pruner'] != DENSE).sum())} evaluated point(s); storage {result.storage}",
        "",
        f"Pareto-optimal points (all objectives minimised: {', '.join(result.objectives)}"
        + (f"; constraints {_bounds_text(result.constraints)}" if result.constraints else "") + "):",
    ]
    table = front_table(result)
    lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4g}") if not table.empty else "(empty: no feasible finished point)")
    lines.append("")
    if result.reference_point:
        source = "default: maximum over the feasible points × 1.1" if result.reference_is_default else "configured"
        reference = ", ".join(f"{n}={v:.4g}" for n, v in zip(result.objectives, result.reference_point))
        lines.append(f"Hypervolume: {result.hypervolume:.6g} (reference point {reference}; {source})")
    else:
        lines.append("Hypervolume: undefined (no feasible finished point to set a reference point)")
    lines.append("")
    rec = result.recommendation
    if rec.row is None:
        lines.append(f"Recommendation: none; {rec.reason}")
    else:
        lines.append(f"Recommended fairness-aware pruning level: {rec.pruning_ratio:.4g} ({rec.row['pruner']}, "
                     f"{rec.row['finetune_steps']} fine-tuning steps)")  # fmt: skip
        lines.append(f"Why: {rec.reason}")
    lines.append(f"\nFiles: {result.output_dir / FRONT_FILENAME}, {result.output_dir / PLOT_FILENAME}")
    return "\n".join(lines)


def plot_front(result: SearchResult, path: Path) -> Path:
    """Draw the front in quality–fairness space, MACs as colour, the dense model and the recommendation marked."""
    from matplotlib.figure import Figure

    quality = result.objectives[0]
    points = result.points[result.points["pruner"] != DENSE]
    feasible = points[pareto.feasible_mask(points, result.objectives, result.constraints)]
    front = result.front
    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(feasible[quality], feasible["fairness_divergence"], s=18, color="0.75", label="feasible points", zorder=1)
    infeasible = points[(points["status"] == "finished") & ~points.index.isin(feasible.index)]
    if not infeasible.empty:
        axes.scatter(infeasible[quality], infeasible["fairness_divergence"], s=18, marker="x", color="0.6",
                     label="points breaking a constraint", zorder=1)  # fmt: skip
    if not front.empty:
        low = front["fairness_divergence"] - front[pareto.FAIRNESS_CI_LOW]
        high = front[pareto.FAIRNESS_CI_HIGH] - front["fairness_divergence"]
        axes.errorbar(front[quality], front["fairness_divergence"], yerr=[low, high], fmt="none", ecolor="0.4",
                      elinewidth=0.8, capsize=2, zorder=2)  # fmt: skip
        colours = axes.scatter(front[quality], front["fairness_divergence"], c=front["macs"] / 1e6, cmap="viridis",
                               s=60, edgecolors="black", linewidths=0.5, label="Pareto front (95 % interval)", zorder=3)  # fmt: skip
        figure.colorbar(colours, ax=axes, label="MACs per image (millions)")
        for _, row in front.iterrows():
            axes.annotate(f"{row['pruner']} r{row['pruning_ratio']:.2f} s{row['finetune_steps']}",
                          (row[quality], row["fairness_divergence"]), fontsize=7, xytext=(4, 4), textcoords="offset points")  # fmt: skip
    dense = result.dense_row
    axes.scatter([dense[quality]], [dense["fairness_divergence"]], marker="*", s=220, color="crimson",
                 edgecolors="black", label="dense model", zorder=4)  # fmt: skip
    rec = result.recommendation.row
    if rec is not None:
        axes.scatter([rec[quality]], [rec["fairness_divergence"]], s=260, facecolors="none", edgecolors="crimson",
                     linewidths=2, label=f"recommended (ratio {rec['pruning_ratio']:.2f})", zorder=5)  # fmt: skip
    axes.set_xlabel(_quality_label(quality))
    axes.set_ylabel("fairness divergence\nmean Jensen–Shannon divergence, bits (0 = reference)")
    axes.set_title(
        f"Study {result.study_name}: {len(front)} Pareto-optimal of {len(feasible)} feasible point(s), {len(points)} evaluated"
    )
    axes.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _quality_label(metric: str) -> str:
    if metric == "fid":
        return "FID (Inception pool3 Fréchet distance)\nsquared feature units, lower is better"
    return f"{metric} (Fréchet distance on the world's features)\nsquared feature units, lower is better"


def _write_outputs(result: SearchResult) -> None:
    out = result.output_dir
    front_table(result).to_parquet(out / FRONT_FILENAME, index=False)
    plot_front(result, out / PLOT_FILENAME)
    (out / RECOMMENDATION_FILENAME).write_text(result.recommendation.reason + "\n")
    rec = result.recommendation
    summary = {
        "study_name": result.study_name,
        "storage": result.storage,
        "trials_in_study": result.trials_in_study,
        "objectives": result.objectives,
        "constraints": result.constraints,
        "front_size": len(result.front),
        "hypervolume": None if math.isnan(result.hypervolume) else result.hypervolume,
        "reference_point": result.reference_point,
        "reference_point_source": "default (maximum over the feasible points x 1.1)" if result.reference_is_default else "configured",
        "recommendation": {
            "pruner": None if rec.row is None else rec.row["pruner"],
            "pruning_ratio": rec.pruning_ratio,
            "finetune_steps": None if rec.row is None else int(rec.row["finetune_steps"]),
            "quality_metric": rec.quality_metric,
            "quality_tolerance": rec.quality_tolerance,
            "tolerance_kind": rec.tolerance_kind,
            "quality_limit": rec.quality_limit,
            "dense_quality": rec.dense_quality,
            "dense_interval": list(rec.dense_interval),
            "candidates": rec.candidates,
            "eliminated": rec.eliminated,
            "qualified": rec.qualified,
            "reason": rec.reason,
        },
    }
    (out / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")


def _log_parent(tracker, result: SearchResult) -> None:
    """Log the front, the plot, the summary and the recommendation on the MLflow parent run."""
    from biasprune import results

    client, run_id = tracker.client, tracker.parent_run_id
    for name in (FRONT_FILENAME, PLOT_FILENAME, SUMMARY_FILENAME, RECOMMENDATION_FILENAME):
        client.log_artifact(run_id, str(result.output_dir / name))
    rec = result.recommendation
    tags = {
        TAG_RECOMMENDED_RATIO: "none" if rec.row is None else f"{rec.pruning_ratio:.12g}",
        TAG_RECOMMENDED_PRUNER: "none" if rec.row is None else str(rec.row["pruner"]),
        TAG_RECOMMENDED_STEPS: "none" if rec.row is None else str(int(rec.row["finetune_steps"])),
        TAG_RECOMMENDED_POINT: "none" if rec.row is None else results.point_key_text(rec.row),
        TAG_RECOMMENDATION_REASON: rec.reason[:_MAX_TAG_CHARS],
        "biasprune.hypervolume_reference": ",".join(f"{v:.6g}" for v in result.reference_point) or "none",
        "biasprune.objectives": ",".join(result.objectives),
    }
    for name, value in tags.items():
        client.set_tag(run_id, name, value)
    if not math.isnan(result.hypervolume):
        client.log_metric(run_id, "hypervolume", result.hypervolume)
    client.log_metric(run_id, "front_size", len(result.front))
    client.log_metric(run_id, "trials_in_study", result.trials_in_study)


def _bounds_text(constraints: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v:.4g}" for k, v in constraints.items())


def _is_finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


__all__ = [
    "ParetoConfig",
    "SearchResult",
    "format_report",
    "front_table",
    "make_sampler",
    "plot_front",
    "run_search",
    "search_key",
    "to_pareto_config",
    "validate_pareto",
]
