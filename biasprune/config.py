"""Typed configuration of a trial; the YAML files under conf/ compose into these dataclasses.

Unknown keys and wrong types fail when the config is built, and `validate_trial_config`
rejects impossible values before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from biasprune.pruning import PRUNERS, validate_pruning_args
from biasprune.sampling import validate_sampling_args
from biasprune.worlds.fairface64 import FairFace64Config
from biasprune.worlds.fairface64 import validate_config as validate_fairface64
from biasprune.worlds.toyfaces import ToyFacesConfig
from biasprune.worlds.toyfaces import validate_config as validate_toyfaces

DENSE = "dense"
"""Pruner name of the unpruned baseline point."""

REFERENCES = ("data_predicted", "data_labels", "dense", "uniform")
WORLDS = ("toyfaces", "fairface64")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class WorldConfig:
    """The world the study runs against, and its settings."""

    name: str = "toyfaces"
    toyfaces: ToyFacesConfig = field(default_factory=ToyFacesConfig)
    fairface64: FairFace64Config = field(default_factory=FairFace64Config)


@dataclass
class PruneConfig:
    """Calibration settings of the gradient-based pruners (`diff-pruning`, `taylor`).

    Attributes:
        thr: Diff-Pruning stops accumulating gradients once the loss falls below
            thr × its maximum. Default 0.05, the value of the Diff-Pruning paper.
        calibration_images: Training images used for the gradients. Default 256.
        calibration_batch_size: Images per gradient pass. Default 32.
    """

    thr: float = 0.05
    calibration_images: int = 256
    calibration_batch_size: int = 32


@dataclass
class FinetuneConfig:
    """Fine-tuning settings after pruning (see `biasprune.finetune.FinetuneSettings`)."""

    batch_size: int = 64
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    # The toy models fine-tune for hundreds of steps, so a 0.9999 EMA would barely move.
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 100


@dataclass
class SamplingConfig:
    """DDIM sampling settings of every evaluated model.

    Attributes:
        num_samples: Images generated per evaluated point. Default 1000.
        sampler_steps: DDIM steps with a uniform skip. Default 50.
        eta: DDIM eta; 0 is deterministic. Default 0.
        batch_size: Images per forward pass. Default 500.
        seed: Seed of the sampling noise, the same for every model so that they are compared on equal noise.
        save_images: Also write every sample as a PNG next to the trial's artifacts. Default false.
        precision: Mixed precision of the UNet and the attribute classifier: `auto` (bf16 autocast
            on CUDA, fp32 on CPU), `fp32`, `bf16` or `fp16`. FID features are always fp32.
            The resolved setting is recorded as the run param `precision`.
    """

    num_samples: int = 1000
    sampler_steps: int = 50
    eta: float = 0.0
    batch_size: int = 500
    seed: int = 0
    save_images: bool = False
    precision: str = "auto"


@dataclass
class MeasureConfig:
    """Settings of the quality and fairness measurements.

    Attributes:
        reference: The reference distribution behind `fairness_divergence` and `js_*`.
        references: Every reference to also report against (`*_vs_<reference>`).
        attribute_weights: Weight of each attribute in `fairness_divergence`; empty means equal.
        bootstrap_samples: Bootstrap draws of the 95 % interval of `fairness_divergence`.
        confidence: Level of that interval.
        unknown_warn_rate: Unknown rate above which a warning is logged.
        fid: `auto` computes pytorch-fid's FID when its Inception weights are available
            offline, `on` requires them, `off` skips FID.
        fid_weights: Path of pytorch-fid's Inception weights file (pt_inception-2015-12-05-6726825d.pth);
            empty uses $BIASPRUNE_FID_WEIGHTS, else pytorch-fid's own download location.
        fid_batch_size: Images per Inception forward pass.
        fid_reference_stats: An existing pytorch-fid `.npz` (keys mu, sigma) to compare against;
            empty computes the statistics of the world's images once and caches them in that format.
    """

    reference: str = "data_predicted"
    references: list[str] = field(default_factory=lambda: list(REFERENCES))
    attribute_weights: dict[str, float] = field(default_factory=dict)
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    unknown_warn_rate: float = 0.1
    fid: str = "auto"
    fid_weights: str | None = None
    fid_batch_size: int = 50
    fid_reference_stats: str | None = None


@dataclass
class TrialConfig:
    """One trial: a pruner at a pruning ratio, fine-tuned to each step milestone and measured.

    Attributes:
        pruner: One of `diff-pruning`, `taylor`, `l1`, `random`, or `dense` for the unpruned baseline.
        pruning_ratio: Fraction of channels removed from every prunable layer, in (0, 1); ignored for `dense`.
        finetune_steps: Step milestones; the model is measured at each one.
        seed: Seed of pruning (calibration batches, random importance) and fine-tuning.
        cache_dir: Cache of worlds, pruned models, checkpoints and statistics;
            empty uses $BIASPRUNE_CACHE or ~/.cache/biasprune.
        output_dir: Where the trial writes its artifacts (sample grid, predictions); empty writes none.
        device: `auto` (CUDA when available), `cpu` or `cuda[:N]`.
        num_threads: torch CPU threads; 0 leaves torch's default.
    """

    pruner: str = "l1"
    pruning_ratio: float = 0.5
    finetune_steps: list[int] = field(default_factory=lambda: [0, 200])
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    cache_dir: str | None = None
    output_dir: str | None = None
    device: str = "auto"
    num_threads: int = 0


FID_WEIGHTS_ENV = "BIASPRUNE_FID_WEIGHTS"


def fid_weights_path(measure: MeasureConfig) -> str | None:
    """Return `measure.fid_weights`, else $BIASPRUNE_FID_WEIGHTS, else None (pytorch-fid's own download)."""
    return measure.fid_weights or os.environ.get(FID_WEIGHTS_ENV) or None


def to_trial_config(config: TrialConfig | DictConfig | dict) -> TrialConfig:
    """Build a typed TrialConfig from a dataclass, an OmegaConf config or a plain dict.

    Raises:
        omegaconf.errors.ValidationError: A value has the wrong type.
        ValueError: A key is not part of the schema; the message suggests the closest key.
    """
    if isinstance(config, TrialConfig):
        return config
    return typed_config(TrialConfig, config)


def typed_config(schema: type, config: DictConfig | dict):
    """Merge `config` into the dataclass `schema` and return the dataclass instance.

    A Hydra config is turned into plain containers first: merged as it is, a key that Hydra's
    `+key=value` added would be dropped silently instead of rejected.

    Raises:
        omegaconf.errors.ValidationError: A value has the wrong type.
        ValueError: A key is not part of the schema; the message suggests the closest key.
    """
    import difflib

    from omegaconf.errors import ConfigKeyError

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    structured = OmegaConf.structured(schema)
    try:
        return OmegaConf.to_object(OmegaConf.merge(structured, config))
    except ConfigKeyError as err:
        full_key = str(err.full_key or err.key or "")
        parent_path, _, name = full_key.rpartition(".")
        parent = OmegaConf.select(structured, parent_path) if parent_path else structured
        candidates = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [parent_path, close[0]]))!r}?)" if close else ""
        raise ValueError(f"unknown config key {full_key!r}{hint}; `--cfg job` prints every valid key") from err


def validate_trial_config(config: TrialConfig) -> None:
    """Raise ValueError or FileNotFoundError for a setting that cannot run, naming the key and the fix."""
    if config.pruner != DENSE:
        validate_pruning_args(config.pruner, config.pruning_ratio)
    if config.world.name not in WORLDS:
        raise ValueError(f"unknown world {config.world.name!r}; choose one of {list(WORLDS)}")
    if config.world.name == "toyfaces":
        validate_toyfaces(config.world.toyfaces)
    if config.world.name == "fairface64":
        validate_fairface64(config.world.fairface64)
        if config.measure.fid == "off":
            raise ValueError(
                "world fairface64 measures quality with FID only; set trial.measure.fid=on and "
                "provide pytorch-fid's Inception weights (trial.measure.fid_weights)"
            )
        from biasprune import fid

        weights = fid_weights_path(config.measure)
        if not fid.inception_available(weights):
            where = f"file {weights!r} not found" if weights else "they are not in pytorch-fid's download folder"
            raise FileNotFoundError(
                f"world fairface64 measures FID but pytorch-fid's Inception weights are missing ({where}); download "
                f"{fid.FID_WEIGHTS_URL} and set trial.measure.fid_weights or ${FID_WEIGHTS_ENV} to the file (or place it in the torch hub "
                "checkpoints folder, where pytorch-fid looks)"
            )
    from biasprune.finetune import validate_milestones

    validate_milestones(list(config.finetune_steps))
    s = config.sampling
    validate_sampling_args(s.num_samples, s.sampler_steps, s.eta, s.batch_size)
    if s.precision not in PRECISIONS:
        raise ValueError(f"sampling.precision must be one of {list(PRECISIONS)}, got {s.precision!r}")
    _validate_measure(config.measure)
    if config.finetune.learning_rate <= 0 or config.finetune.batch_size < 1:
        raise ValueError(
            f"finetune.learning_rate must be > 0 and finetune.batch_size >= 1, "
            f"got {config.finetune.learning_rate} and {config.finetune.batch_size}"
        )
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {config.device!r}")


def _validate_measure(measure: MeasureConfig) -> None:
    unknown = [r for r in [measure.reference, *measure.references] if r not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown fairness reference(s) {unknown}; choose from {list(REFERENCES)}")
    if measure.fid not in ("auto", "on", "off"):
        raise ValueError(f"measure.fid must be 'auto', 'on' or 'off', got {measure.fid!r}")
    weights = fid_weights_path(measure)
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"measure.fid_weights (or ${FID_WEIGHTS_ENV}) file {weights!r} not found; download pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth and set measure.fid_weights to its path, or leave it empty"
        )
    if measure.fid_reference_stats and not os.path.isfile(measure.fid_reference_stats):
        raise FileNotFoundError(
            f"measure.fid_reference_stats file {measure.fid_reference_stats!r} not found; give a pytorch-fid "
            ".npz (python -m pytorch_fid --save-stats IMAGES OUT.npz) or leave it empty to compute it"
        )
    if not 0 < measure.confidence < 1:
        raise ValueError(f"measure.confidence must be in (0, 1), got {measure.confidence}")
    if measure.bootstrap_samples < 1:
        raise ValueError(f"measure.bootstrap_samples must be at least 1, got {measure.bootstrap_samples}")


__all__ = ["PRUNERS", "DENSE", "REFERENCES", "TrialConfig", "to_trial_config", "validate_trial_config"]
