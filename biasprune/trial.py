"""One trial: prune a dense DDPM, fine-tune it to each step milestone, sample and measure.

`run_trial(config)` is what the sweeps call. Every expensive product is cached by content
key: the pruned model, fine-tuning checkpoints, reference statistics and each evaluated point.
Running the same trial again recomputes nothing. A trial that needs more steps continues from
the latest cached checkpoint of the same pruned model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from omegaconf import DictConfig

from biasprune import fairness, fid, pruning
from biasprune.cache import cache_root, cached_dir, content_key, hash_file
from biasprune.classifier import Predictions, check_groups
from biasprune.config import DENSE, TrialConfig, fid_weights_path, to_trial_config, validate_trial_config
from biasprune.data import save_png, to_model_range
from biasprune.finetune import Finetuner, FinetuneSettings
from biasprune.sampling import sample_ddim
from biasprune.worlds import World

logger = logging.getLogger(__name__)

# Keys of a result row that identify the point and record how its metrics were computed.
# Every other key is a metric. Trackers log these as run params.
POINT_PARAM_KEYS = (
    "world", "model", "pruner", "pruning_ratio", "finetune_steps", "seed", "num_samples",
    "sampler_steps", "eta", "reference", "quality_metric", "fid_extractor",
    "fd_extractor", "fid_reference", "classifier", "precision", "device", "evaluation_key",
    "bootstrap_samples", "kl_smoothing", "num_images",
)  # fmt: skip

REFERENCE_SHARE_PREFIX = "reference_share_"
"""Rows carry each reference's shares as `reference_share_<reference>_<attribute>_<group>`."""
_PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_FD_EXTRACTOR = "classifier penultimate features"
_FID_EXTRACTOR = "pytorch-fid InceptionV3 pool3 (2048-d, FID weights)"


def run_trial(
    config: TrialConfig | DictConfig | dict,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run one trial and return one result row per fine-tune step milestone.

    Args:
        config: The trial's settings (see `biasprune.config.TrialConfig`).
        on_result: Called with each row as soon as it is measured (sweeps report from it).

    Returns:
        A list of flat dicts, one per milestone. Keys in `POINT_PARAM_KEYS` identify the point.
        The other keys are metrics: `fd_<extractor>`, `fid` when available, `params`, `macs`,
        `model_size_mb`, `images_per_s` and those of `biasprune.fairness.fairness_metrics`.

    Raises:
        ValueError, FileNotFoundError: An invalid setting, raised before any model is loaded.
        FloatingPointError: The fine-tuning loss became non-finite.
    """
    cfg = to_trial_config(config)
    validate_trial_config(cfg)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    started = time.perf_counter()

    world, measurer = open_measurer(cfg)
    device = measurer.device

    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        logger.info("%s", format_row(row))
        if on_result is not None:
            on_result(row)

    if cfg.pruner == DENSE:
        report(measurer.evaluate_dense())
        return rows

    pruned, prune_key = prune_cached(world, cfg, device)
    cost = model_cost(pruned)
    settings = FinetuneSettings(
        **dataclasses.asdict(cfg.finetune), seed=cfg.seed
    )
    checkpoint_dir = cache_root(cfg.cache_dir) / "finetune" / content_key(prune_key, dataclasses.asdict(settings))
    trainer = Finetuner(pruned, world.scheduler_config, world.images, settings, checkpoint_dir, device)

    def on_milestone(step: int, ema: UNet2DModel) -> None:
        point = {"pruner": cfg.pruner, "pruning_ratio": cfg.pruning_ratio, "finetune_steps": step}
        report(measurer.evaluate(ema, point, model_key=f"{checkpoint_dir.name}-{step}", cost=cost))

    trainer.run(list(cfg.finetune_steps), on_milestone)
    logger.info("trial %s ratio %s finished in %.1f s", cfg.pruner, cfg.pruning_ratio, time.perf_counter() - started)
    return rows


def open_measurer(cfg: TrialConfig) -> tuple[World, Measurer]:
    """Load the world on the trial's device and return it with its Measurer.

    Sweeps call this in the driver too, so that the references and the dense evaluation they
    compute there use the same device, precision and cache keys as the trials.
    """
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.sampling.precision, device)
    world = load_world(cfg, device, _PRECISION_DTYPES[precision])
    check_groups(world.classifier.groups, world.groups)
    return world, Measurer(world, cfg, device, precision)


def resolve_device(device: str) -> torch.device:
    """Map `auto` to CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; set device=cpu or device=auto")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map `auto` to bf16 on CUDA and fp32 elsewhere; reject half precision on the CPU."""
    if precision == "auto":
        # NOTE: bf16 was checked against fp32 on the CPU only (bench/precision.py); the same
        # script with --device cuda checks it on a GPU.
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"sampling.precision=fp16 needs a CUDA device, got {device}; use fp32 or bf16")
    return precision


def load_world(cfg: TrialConfig, device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> World:
    """Load the configured world (built and cached on first use)."""
    if cfg.world.name == "toyfaces":
        from biasprune.worlds import toyfaces

        return toyfaces.load_world(cfg.world.toyfaces, cfg.cache_dir)
    if cfg.world.name == "fairface64":
        from biasprune.worlds import fairface64

        return fairface64.load_world(cfg.world.fairface64, cfg.cache_dir, device or torch.device("cpu"), autocast_dtype)
    raise ValueError(f"unknown world {cfg.world.name!r}")


def prune_cached(world: World, cfg: TrialConfig, device: torch.device) -> tuple[UNet2DModel, str]:
    """Return the pruned model for (model, pruner, ratio, seed, calibration settings), from cache if present."""
    key = content_key(world.model_id, cfg.pruner, cfg.pruning_ratio, cfg.seed, dataclasses.asdict(cfg.prune))
    path = cache_root(cfg.cache_dir) / "pruned" / key

    def build(directory: Path) -> None:
        calibration = None
        if cfg.pruner in pruning.GRADIENT_PRUNERS:
            generator = torch.Generator().manual_seed(cfg.seed)
            count = min(cfg.prune.calibration_images, len(world.images))
            index = torch.randperm(len(world.images), generator=generator)[:count]
            calibration = to_model_range(world.images[index])
        pruned = pruning.prune_unet(
            world.unet,
            cfg.pruner,
            cfg.pruning_ratio,
            scheduler=_ddpm_scheduler(world),
            calibration_images=calibration,
            thr=cfg.prune.thr,
            calibration_batch_size=cfg.prune.calibration_batch_size,
            seed=cfg.seed,
        )
        pruning.save_pruned(pruned, directory / "unet", metadata={"model": world.model_id, "pruner": cfg.pruner,
                                                                  "pruning_ratio": cfg.pruning_ratio, "seed": cfg.seed})

    cached_dir(path, build)
    return pruning.load_pruned(path / "unet").to(device), key


def _ddpm_scheduler(world: World):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(world.scheduler_config)


def model_cost(unet: UNet2DModel) -> dict[str, float]:
    """Return params, MACs (batch 1 at the model's resolution) and the saved size in MB."""
    import tempfile

    params, macs = pruning.count_params_macs(unet)
    with tempfile.TemporaryDirectory() as tmp:
        pruning.save_pruned(unet, Path(tmp) / "unet")
        size = pruning.model_size_mb(Path(tmp) / "unet")
    return {"params": int(params), "macs": int(macs), "model_size_mb": float(size)}


class Measurer:
    """Samples a model and measures quality and fairness against the world's references."""

    def __init__(self, world: World, cfg: TrialConfig, device: torch.device, precision: str = "fp32") -> None:
        self.world = world
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.cache = cache_root(cfg.cache_dir)
        self.settings_key = content_key(
            world.model_id, world.content_hashes, dataclasses.asdict(cfg.sampling), dataclasses.asdict(cfg.measure),
            precision,
            # The content of given FID statistics, so that replacing the file at the same path counts.
            hash_file(cfg.measure.fid_reference_stats) if cfg.measure.fid_reference_stats else "",
        )
        self._inception = None
        self._references: dict[str, dict[str, np.ndarray]] | None = None

    # -- references --------------------------------------------------------------------

    def references(self) -> dict[str, dict[str, np.ndarray]]:
        """Return the reference share vectors of every configured reference that is available."""
        if self._references is None:
            refs: dict[str, dict[str, np.ndarray]] = {}
            requested = set(self.cfg.measure.references) | {self.cfg.measure.reference}
            if "data_predicted" in requested:
                refs["data_predicted"] = fairness.shares_from_labels(self._data_predictions(), self.world.groups)
            if "data_labels" in requested and self.world.labels is not None:
                refs["data_labels"] = fairness.shares_from_labels(self.world.labels, self.world.groups)
            if "dense" in requested:
                dense = self._evaluate_cached(self.world.unet, "dense")
                refs["dense"] = fairness.shares_from_labels(dense["predictions"].labels, self.world.groups)
            self._references = {name: _defined_shares(name, shares) for name, shares in refs.items()}
        return self._references

    def _data_predictions(self) -> dict[str, np.ndarray]:
        """Return the classifier's labels of the world's images, computed once per world and classifier."""
        key = content_key("data_predicted", self.world.model_id, self.world.content_hashes, self.precision)
        path = self.cache / "data_predictions" / key

        def build(directory: Path) -> None:
            logger.info("classifying the %d images of world %s (cached afterwards)", len(self.world.images), self.world.name)
            predicted = self.world.classifier.predict(self.world.images)
            np.savez(directory / "labels.npz", **predicted.labels)

        cached_dir(path, build)
        with np.load(path / "labels.npz") as data:
            return {a: data[a] for a in self.world.groups}

    # -- evaluation --------------------------------------------------------------------

    def evaluate_dense(self) -> dict[str, Any]:
        cost = model_cost(self.world.unet)
        return self.evaluate(self.world.unet, {"pruner": DENSE, "pruning_ratio": 0.0, "finetune_steps": 0}, "dense", cost)

    def evaluate(self, unet: UNet2DModel, point: dict[str, Any], model_key: str, cost: dict[str, float]) -> dict[str, Any]:
        """Sample `unet`, measure it and return the result row of `point`."""
        evaluation = self._evaluate_cached(unet, model_key)
        predictions: Predictions = evaluation["predictions"]
        m = self.cfg.measure
        metrics = fairness.fairness_metrics(
            predictions,
            self.world.groups,
            self.references(),
            default_reference=m.reference,
            weights=m.attribute_weights or None,
            ratios=self.world.study_ratios,
            bootstrap_samples=m.bootstrap_samples,
            confidence=m.confidence,
            seed=self.cfg.seed,
            unknown_warn_rate=m.unknown_warn_rate,
        )
        row = {**self._point_params(point, evaluation["key"]), **cost, **evaluation["metrics"], **metrics}
        row |= self._reference_shares()
        # One key for the quality metric whatever the world, beside its own name (fid, fd_<name>).
        row["quality"] = row.get(row["quality_metric"], float("nan"))
        if self.cfg.output_dir:
            row["artifact_dir"] = str(self._write_artifacts(point, evaluation))
        return row

    def _reference_shares(self) -> dict[str, float]:
        """Return each data reference's shares as `reference_share_<reference>_<attribute>_<group>` columns."""
        columns = {}
        for reference in ("data_labels", "data_predicted"):
            shares = self.references().get(reference)
            if shares is None:
                continue
            for attribute, vector in shares.items():
                for group, value in zip(self.world.groups[attribute], vector, strict=True):
                    token = f"{fairness.metric_token(attribute)}_{fairness.metric_token(group)}"
                    columns[f"{REFERENCE_SHARE_PREFIX}{reference}_{token}"] = float(value)
        return columns

    def _point_params(self, point: dict[str, Any], key: str) -> dict[str, Any]:
        s = self.cfg.sampling
        quality = "fid" if self._fid_enabled() or self.world.features is None else f"fd_{self.world.features_name}"
        return {
            "world": self.world.name,
            "model": self.world.model_id,
            **point,
            "seed": self.cfg.seed,
            "num_samples": s.num_samples,
            "sampler_steps": s.sampler_steps,
            "eta": s.eta,
            "reference": self.cfg.measure.reference,
            "quality_metric": quality,
            "fid_extractor": _FID_EXTRACTOR if self._fid_enabled() else "",
            "fd_extractor": f"{self.world.features_name} {_FD_EXTRACTOR}" if self.world.features else "",
            "fid_reference": self._fid_reference_description(),
            "classifier": getattr(self.world.classifier, "description", type(self.world.classifier).__name__),
            "precision": self.precision,
            "device": str(self.device),
            "evaluation_key": key,
        }

    def _fid_reference_description(self) -> str:
        stats = self.cfg.measure.fid_reference_stats
        if stats and self._fid_enabled():
            return f"pytorch-fid statistics {stats} (sha256 {hash_file(stats)})"
        return (
            f"{self.world.name} training images ({len(self.world.images)}, sha256 "
            f"{self.world.content_hashes.get('images_sha256', '?')})"
        )

    def _evaluate_cached(self, unet: UNet2DModel, model_key: str) -> dict[str, Any]:
        """Sample and measure quality once per (model, settings); later calls read the cache."""
        key = content_key(model_key, self.settings_key)
        path = self.cache / "evaluations" / key

        def build(directory: Path) -> None:
            s = self.cfg.sampling
            result = sample_ddim(
                unet, self.world.scheduler_config, s.num_samples, num_inference_steps=s.sampler_steps,
                eta=s.eta, batch_size=s.batch_size, seed=s.seed, device=self.device,
                autocast_dtype=_PRECISION_DTYPES[self.precision],
            )  # fmt: skip
            predictions = self.world.classifier.predict(result.images)
            metrics = {"images_per_s": result.images_per_s, **self._quality(result.images)}
            (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
            arrays = {f"label_{a}": v for a, v in predictions.labels.items()}
            arrays |= {f"confidence_{a}": v for a, v in predictions.confidence.items()}
            np.savez(directory / "predictions.npz", **arrays)
            save_png(result.images[:64], directory / "grid_images")
            if s.save_images:
                save_png(result.images, directory / "samples")

        cached_dir(path, build)
        metrics = json.loads((path / "metrics.json").read_text())
        with np.load(path / "predictions.npz") as data:
            labels = {a: data[f"label_{a}"] for a in self.world.groups}
            confidence = {a: data[f"confidence_{a}"] for a in self.world.groups}
        return {"key": key, "metrics": metrics, "predictions": Predictions(labels, confidence), "path": path}

    def _fid_enabled(self) -> bool:
        m = self.cfg.measure
        if m.fid == "off":
            return False
        available = fid.inception_available(fid_weights_path(m))
        if m.fid == "on" and not available:
            raise FileNotFoundError(
                f"measure.fid=on but pytorch-fid's Inception weights ({fid.FID_WEIGHTS_FILENAME}) are not available "
                f"offline; download them from {fid.FID_WEIGHTS_URL} and set measure.fid_weights, or set measure.fid=auto"
            )
        return available

    def _quality(self, images: torch.Tensor) -> dict[str, float]:
        metrics: dict[str, float] = {}
        dataset_key = f"{self.world.name}-{self.world.content_hashes.get('images_sha256', 'unknown')}"
        if self.world.features is not None:
            name = self.world.features_name
            mu, sigma, _ = fid.cached_reference_statistics(
                self.world.images, f"{name}-{self.world.model_id}", self.world.features, self.cfg.cache_dir, dataset_key
            )
            metrics |= fid.fid_from_features(self.world.features(images), mu, sigma, name=f"fd_{name}")
        if self._fid_enabled():
            if self._inception is None:
                self._inception = fid.load_inception(fid_weights_path(self.cfg.measure), device=self.device)
            m = self.cfg.measure

            def inception_features(x: torch.Tensor) -> np.ndarray:
                return fid.extract_features(x, self._inception, batch_size=m.fid_batch_size, device=self.device)

            if m.fid_reference_stats:
                mu, sigma = fid.load_statistics(m.fid_reference_stats)
            else:
                mu, sigma, _ = fid.cached_reference_statistics(
                    self.world.images, "inception", inception_features, self.cfg.cache_dir, dataset_key
                )
            metrics |= fid.fid_from_features(inception_features(images), mu, sigma, name="fid")
        return metrics

    def _write_artifacts(self, point: dict[str, Any], evaluation: dict[str, Any]) -> Path:
        name = f"{point['pruner']}-r{point['pruning_ratio']:g}-s{point['finetune_steps']}"
        directory = Path(self.cfg.output_dir) / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "evaluation_key.txt").write_text(evaluation["key"] + "\n")
        if self.cfg.sampling.save_images:
            shutil.copytree(evaluation["path"] / "samples", directory / "samples", dirs_exist_ok=True)
        return directory


def _defined_shares(reference: str, shares: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop attributes whose reference shares are undefined (no image had a known label)."""
    defined = {}
    for attribute, vector in shares.items():
        if np.all(np.isfinite(vector)):
            defined[attribute] = vector
        else:
            logger.warning(
                "reference %r has no image with a known %s label, so divergences from it skip %s", reference, attribute, attribute
            )
    return defined


def format_row(row: dict[str, Any]) -> str:
    """Return a one-line summary of a result row for logs."""
    quality = row.get(row.get("quality_metric", ""), float("nan"))
    return (
        f"{row['pruner']} ratio={row['pruning_ratio']:g} steps={row['finetune_steps']} "
        f"{row.get('quality_metric')}={quality:.3f} macs={row.get('macs', 0) / 1e6:.2f}M "
        f"params={row.get('params', 0) / 1e6:.3f}M fairness_divergence={row['fairness_divergence']:.4f} "
        f"[{row['fairness_divergence_ci_low']:.4f}, {row['fairness_divergence_ci_high']:.4f}] "
        f"unknown_rate={row['unknown_rate']:.3f}"
    )
