"""Fréchet distance between feature distributions: FID on Inception-v3 pool3, FD on others.

``fid`` is computed exactly as pytorch-fid computes it: its TF-ported FID Inception-v3, inputs
bilinearly resized to 299×299 and scaled to [-1, 1], 2048-d pool3 features, mean and covariance
with ``np.cov(rowvar=False)``, and its ``calculate_frechet_distance``. Reference statistics use
pytorch-fid's ``.npz`` format (keys ``mu`` and ``sigma``), so files from either tool can be read by
the other.

The same distance on any other extractor's features is reported as ``fd_<extractor>``, for
example ``fd_toyfaces`` on the toyfaces classifier's embedding. It is never logged as ``fid``.

Example:
    >>> model = load_inception("pt_inception-2015-12-05-6726825d.pth")  # doctest: +SKIP
    >>> ref_mu, ref_sigma = load_statistics("celeba_64.npz")  # doctest: +SKIP
    >>> fid_from_features(extract_features(images, model), ref_mu, ref_sigma)  # doctest: +SKIP
    {'fid': 12.3, 'fid_num_samples': 10000}
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import LinAlgWarning
import torch
import torch.nn.functional as F
from pytorch_fid import inception as _pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance

from biasprune.cache import cache_root
from biasprune.data import to_unit_range

logger = logging.getLogger(__name__)

FID_FEATURE_DIM = 2048
FID_WEIGHTS_URL = _pf_inception.FID_WEIGHTS_URL
FID_WEIGHTS_FILENAME = FID_WEIGHTS_URL.rsplit("/", 1)[-1]

_STATS_SUBDIR = "fid_stats"
_CACHE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# pytorch-fid's loader is a module global, so every build through it is serialised: a thread
# building from pytorch-fid's download must not see another thread's local-file replacement.
_LOADER_PATCH_LOCK = threading.Lock()


def load_inception(
    weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Build pytorch-fid's FID Inception-v3, returning 2048-d pool3 features, in eval mode.

    The model is ``pytorch_fid.inception.InceptionV3`` with the pool3 block only,
    ``resize_input=True`` (bilinear to 299×299) and ``normalize_input=True`` (inputs in [0, 1]).

    With a local weights file, the model is built by pytorch-fid's own ``fid_inception_v3`` while
    its download function (``pytorch_fid.inception.load_state_dict_from_url``) is replaced, for
    the duration of the build only, by one that returns the file's state dict. The architecture,
    the strict ``load_state_dict`` and the wrapper therefore stay pytorch-fid's code; only where
    the weights come from changes, and nothing touches the network.

    Args:
        weights_path: Local copy of pytorch-fid's FID Inception state dict
            (``pt_inception-2015-12-05-6726825d.pth``), read with ``torch.load(weights_only=True)``;
            this is the config key ``fid_weights``. None (default) uses pytorch-fid's own path,
            which downloads the file once from ``FID_WEIGHTS_URL`` into the torch hub cache.
        device: Device the model is moved to. Default ``"cpu"``.

    Returns:
        The model; ``model(x)[0]`` has shape (N, 2048, 1, 1) for ``x`` of shape (N, 3, H, W).

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ValueError: The file is not a state dict of the FID Inception architecture.
    """
    if weights_path is None:
        logger.info(
            "Building the FID Inception through pytorch-fid; it downloads %s into %s "
            "unless that folder already contains it",
            FID_WEIGHTS_URL,
            _hub_weights_path().parent,
        )
        with _LOADER_PATCH_LOCK:  # so a concurrent local-file build cannot serve this one
            model = _new_fid_inception()
    else:
        model = _fid_inception_from_file(Path(weights_path))
    return model.to(device).eval()


def inception_available(weights_path: str | os.PathLike | None = None) -> bool:
    """Check whether ``load_inception(weights_path)`` can run offline, without downloading.

    Args:
        weights_path: Local weights file, as for ``load_inception``. When given, the check is
            whether that file exists. None (default) checks whether the torch hub cache already
            contains pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.

    Returns:
        True when the weights are on disk.
    """
    if weights_path is not None:
        return Path(weights_path).is_file()
    return _hub_weights_path().is_file()


def extract_features(
    images: torch.Tensor | Iterable[torch.Tensor],
    model: torch.nn.Module,
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Run images through a feature extractor and return one feature row per image.

    Mirrors pytorch-fid's ``get_activations``: ``model(batch)[0]`` (or the model's tensor output),
    global average pooling when the map is not 1×1, squeezed to (N, D), stored as float64.
    A uint8 image is divided by 255 exactly as ``torchvision.transforms.ToTensor`` does.

    Args:
        images: Either one tensor (N, 3, H, W), or an iterable of such batches (for example a
            generator that samples them), each uint8 in [0, 255] or float in [0, 1].
        model: The extractor, for example from ``load_inception``; it is put in eval mode.
        batch_size: Images per forward pass when ``images`` is one tensor. Default 50;
            an iterable's batches are used as they come.
        device: Device the batches are moved to. None (default) uses the device of the model's
            first parameter.

    Returns:
        Array (N, D) of float64; D is 2048 for the FID Inception.

    Raises:
        ValueError: ``batch_size`` is not a positive integer, or a batch is not (N, 3, H, W)
            uint8 or float in [0, 1]; raised before that batch's forward pass.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer, got {batch_size!r}; pass for example 50."
        )
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
        raise ValueError("images is empty (N = 0); pass at least one image.")
    if device is None:
        device = _model_device(model)
    model.eval()
    rows = [_features_of_batch(batch, model, device) for batch in _batches(images, batch_size)]
    if not rows:
        raise ValueError("images yielded no batches; pass at least one image.")
    return np.concatenate(rows, axis=0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the mean and covariance of features as pytorch-fid's statistics functions do.

    Args:
        features: Array (N, D), one row per image.

    Returns:
        ``mu`` (D,) from ``np.mean(axis=0)`` and ``sigma`` (D, D) from ``np.cov(rowvar=False)``.

    Raises:
        ValueError: ``features`` is not 2-D or has fewer than 2 rows.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"features must be an array (N, D) with N >= 2 rows, got shape {features.shape}; "
            "a covariance needs at least two samples."
        )
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Compute the Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed by
    ``pytorch_fid.fid_score.calculate_frechet_distance``, which adds 1e-6 to the diagonals when
    the product is singular. FID is this distance on Inception pool3 features (Heusel et al.,
    "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017,
    https://arxiv.org/abs/1706.08500).

    Args:
        mu1: Mean (D,) of the first distribution.
        sigma1: Covariance (D, D) of the first distribution.
        mu2: Mean (D,) of the second distribution.
        sigma2: Covariance (D, D) of the second distribution.

    Returns:
        The squared distance d², as pytorch-fid reports it.

    Raises:
        ValueError: The shapes do not describe two D-dimensional Gaussians of the same D >= 2.
    """
    mu1, sigma1 = _checked_gaussian(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _checked_gaussian(mu2, sigma2, "mu2", "sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 and mu2 must have the same dimension, got {mu1.shape} and {mu2.shape}; "
            "compare statistics from the same feature extractor."
        )
    if mu1.shape[0] < 2:
        # NOTE: SciPy 1.17's sqrtm(..., disp=False) returns a bare array for a 1x1 matrix, which
        # pytorch-fid 0.3.0 fails to unpack. One-dimensional features are rejected until it can.
        raise ValueError(
            f"frechet_distance needs at least 2 feature dimensions, got {mu1.shape[0]}; "
            "use an extractor with a feature vector."
        )
    # NOTE: pytorch-fid 0.3.0 passes `disp=False` to scipy.linalg.sqrtm, which SciPy 1.17
    # deprecates. The filter can go once pytorch-fid stops passing it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings(
            "ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning
        )
        warnings.simplefilter("always", LinAlgWarning)
        distance = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    for warning in caught:
        if issubclass(warning.category, LinAlgWarning):
            # Rank-deficient covariances (fewer samples than dimensions, or features that never
            # vary) make the product singular on every call. pytorch-fid uses sqrtm's result as it
            # is (it offsets the diagonals only when that result is not finite), so the value is
            # pytorch-fid's and a warning on every point would only alarm.
            logger.debug("Fréchet distance: %s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return distance


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write statistics in pytorch-fid's ``.npz`` format (keys ``mu`` and ``sigma``).

    The file is written under a temporary name and renamed into place, so a reader never sees a
    half-written file.

    Args:
        path: Destination file; ``.npz`` is the expected suffix. Parent folders are created.
        mu: Mean (D,).
        sigma: Covariance (D, D).

    Returns:
        The path written.

    Raises:
        ValueError: ``mu`` is not (D,) or ``sigma`` is not (D, D).
    """
    mu, sigma = _checked_gaussian(mu, sigma, "mu", "sigma")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            np.savez(tmp_file, mu=mu, sigma=sigma)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read statistics from a pytorch-fid ``.npz`` file (for example one from ``--save-stats``).

    Args:
        path: The ``.npz`` file.

    Returns:
        ``mu`` (D,) and ``sigma`` (D, D).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``mu`` or ``sigma`` is missing from the file, or their shapes do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics file {str(path)!r} does not exist; compute it with "
            "save_statistics or `python -m pytorch_fid --save-stats IMAGES OUT.npz`."
        )
    with np.load(path) as stats:
        missing = sorted({"mu", "sigma"} - set(stats.files))
        if missing:
            raise ValueError(
                f"FID statistics file {str(path)!r} is missing the key(s) {missing}; found "
                f"{sorted(stats.files)}, expected 'mu' (D,) and 'sigma' (D, D) as pytorch-fid "
                "writes them. Recompute the file with save_statistics."
            )
        mu, sigma = stats["mu"][:], stats["sigma"][:]
    try:
        return _checked_gaussian(mu, sigma, "mu", "sigma")
    except ValueError as err:
        raise ValueError(f"FID statistics file {str(path)!r}: {err}") from err


def cached_reference_statistics(
    images: Any,
    extractor_name: str,
    compute_features: Callable[[Any], np.ndarray],
    cache_dir: str | os.PathLike | None,
    dataset_key: str,
) -> tuple[np.ndarray, np.ndarray, Path]:
    """Return reference statistics, computed once per (dataset content, extractor), then read.

    The file is ``<cache_dir>/fid_stats/<dataset_key>-<extractor_name>.npz`` in pytorch-fid's
    format. When it exists, ``images`` is not touched and ``compute_features`` is not called.

    Args:
        images: The reference images, passed unchanged to ``compute_features``. A lazy handle
            such as a folder path avoids loading them when the cache already contains the file.
        extractor_name: Name of the feature extractor, for example ``"inception"`` or
            ``"toyfaces"``; letters, digits, ``.``, ``_`` and ``-``.
        compute_features: Function mapping ``images`` to features (N, D).
        cache_dir: Cache root; None uses ``$BIASPRUNE_CACHE`` or ``~/.cache/biasprune``.
        dataset_key: Key that changes whenever the reference images change (for example a
            content hash); same characters as ``extractor_name``.

    Returns:
        ``mu`` (D,), ``sigma`` (D, D) and the path of the ``.npz`` file.

    Raises:
        ValueError: ``extractor_name`` or ``dataset_key`` is empty or contains other characters.
    """
    _check_cache_name(extractor_name, "extractor_name")
    _check_cache_name(dataset_key, "dataset_key")
    path = cache_root(cache_dir) / _STATS_SUBDIR / f"{dataset_key}-{extractor_name}.npz"
    if path.is_file():
        logger.debug("Reading reference statistics from %s", path)
        mu, sigma = load_statistics(path)
        return mu, sigma, path
    features = np.asarray(compute_features(images))
    mu, sigma = feature_statistics(features)
    save_statistics(path, mu, sigma)
    logger.info(
        "Computed %s reference statistics on %d images of dataset %s; cached at %s",
        extractor_name,
        features.shape[0],
        dataset_key,
        path,
    )
    return mu, sigma, path


def fid_from_features(
    features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *, name: str = "fid"
) -> dict[str, float]:
    """Compute the Fréchet distance of generated features to reference statistics.

    Args:
        features: Features (N, D) of the generated images.
        ref_mu: Reference mean (D,).
        ref_sigma: Reference covariance (D, D).
        name: Metric name. ``"fid"`` (default) is reserved for 2048-d Inception pool3 features;
            use ``"fd_<extractor>"`` (for example ``"fd_toyfaces"``) for any other extractor.

    Returns:
        ``{name: distance, f"{name}_num_samples": N}``.

    Raises:
        ValueError: ``name`` is ``"fid"`` but the features are not 2048-d, or the dimensions of
            ``features`` and the reference differ.

    Warning:
        With fewer samples than feature dimensions (2,048 for FID) the sample covariance is
        rank-deficient and the distance is biased upwards: it is comparable only with values
        computed on the same number of samples, not with full-size FID. A WARNING is logged.
    """
    features = np.asarray(features)
    dim = features.shape[-1] if features.ndim == 2 else None
    if name == "fid" and dim != FID_FEATURE_DIM:
        raise ValueError(
            f"name='fid' is reserved for {FID_FEATURE_DIM}-d Inception pool3 features, got "
            f"features of shape {features.shape}; pass name='fd_<extractor>' for another extractor."
        )
    mu, sigma = feature_statistics(features)
    num_samples = features.shape[0]
    if num_samples < dim:
        logger.warning(
            "%s on %d samples of %d-d features: the covariance is rank-deficient below %d "
            "samples, so this value is not comparable with one computed on a full-size sample "
            "set; compare it only with %s values at the same %s_num_samples.",
            name, num_samples, dim, dim, name, name,
        )
    distance = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    return {name: distance, f"{name}_num_samples": num_samples}


def _hub_weights_path() -> Path:
    """Return where pytorch-fid's download stores the FID weights (torch hub checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def _new_fid_inception() -> torch.nn.Module:
    """Build pytorch-fid's FID Inception with only the 2048-d pool3 block."""
    return _pf_inception.InceptionV3(
        [_pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FID_FEATURE_DIM]],
        resize_input=True,
        normalize_input=True,
    )


def _fid_inception_from_file(path: Path) -> torch.nn.Module:
    """Build the FID Inception with pytorch-fid's code and the state dict stored at ``path``."""
    state_dict = _read_state_dict(path)
    with _local_weights(state_dict, path):
        try:
            return _new_fid_inception()
        except RuntimeError as err:
            raise ValueError(
                f"fid_weights={str(path)!r} does not fit pytorch-fid's FID Inception: {err}. "
                f"Point fid_weights at a copy of {FID_WEIGHTS_URL}."
            ) from err


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``, raising errors that name the fix."""
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights file {str(path)!r} (config key fid_weights) does not exist. "
            f"Download {FID_WEIGHTS_URL} on a machine with internet access, copy it here, or set "
            "fid_weights to where it lies; fid_weights unset lets pytorch-fid download it."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(
            f"fid_weights={str(path)!r} could not be read as a torch state dict ({err}); "
            f"replace it with a fresh copy of {FID_WEIGHTS_URL}."
        ) from err
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"fid_weights={str(path)!r} contains a {type(state_dict).__name__}, not a state dict; "
            f"point it at a copy of {FID_WEIGHTS_URL}."
        )
    return state_dict


@contextlib.contextmanager
def _local_weights(state_dict: Mapping[str, torch.Tensor], path: Path) -> Iterator[None]:
    """Make pytorch-fid's download function return ``state_dict`` while the block runs."""

    def _serve_local(url: str, *args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        logger.debug("Serving %s from %s instead of downloading it", url, path)
        return state_dict

    with _LOADER_PATCH_LOCK:
        original = _pf_inception.load_state_dict_from_url
        _pf_inception.load_state_dict_from_url = _serve_local
        try:
            yield
        finally:
            _pf_inception.load_state_dict_from_url = original


def _model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter, or CPU for a parameterless model."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(
    images: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    """Split one tensor into batches, or pass an iterable's batches through."""
    if not isinstance(images, torch.Tensor):
        yield from images
    elif images.ndim == 4:
        yield from torch.split(images, batch_size)
    else:
        yield images  # rejected with its shape by _checked_unit_batch


def _features_of_batch(
    batch: torch.Tensor, model: torch.nn.Module, device: str | torch.device
) -> np.ndarray:
    """Compute features (B, D) of one checked batch, pooled and squeezed as pytorch-fid does."""
    batch = _checked_unit_batch(batch).to(device)
    with torch.no_grad():
        output = model(batch)
    pred = output[0] if isinstance(output, (list, tuple)) else output
    if pred.ndim == 4 and (pred.size(2) != 1 or pred.size(3) != 1):
        pred = F.adaptive_avg_pool2d(pred, output_size=(1, 1))
    if pred.ndim == 4:
        pred = pred.squeeze(3).squeeze(2)
    return pred.cpu().numpy().astype(np.float64)


def _checked_unit_batch(batch: torch.Tensor) -> torch.Tensor:
    """Return the batch as float in [0, 1], or raise naming what is wrong."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(
            f"images must be tensors (N, 3, H, W), got {shape}; convert grayscale or RGBA "
            "images to RGB first (load_image_folder does)."
        )
    if batch.dtype == torch.uint8:
        return to_unit_range(batch)
    if not batch.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got dtype {batch.dtype}.")
    low, high = batch.min().item(), batch.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "convert model outputs in [-1, 1] with from_model_range or (x + 1) / 2."
        )
    return batch


def _checked_gaussian(
    mu: Any, sigma: Any, mu_name: str, sigma_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return mu (D,) and sigma (D, D) as arrays, or raise naming the bad shape."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{mu_name} must have shape (D,) and {sigma_name} shape (D, D), got {mu.shape} and "
            f"{sigma.shape}; pass the outputs of feature_statistics."
        )
    return mu, sigma


def _check_cache_name(value: Any, arg_name: str) -> None:
    """Raise unless ``value`` is safe to use in a cache file name."""
    if not isinstance(value, str) or not _CACHE_NAME_PATTERN.match(value):
        raise ValueError(
            f"{arg_name} must be a non-empty string of letters, digits, '.', '_' and '-' that "
            f"starts with a letter or digit, got {value!r}."
        )
