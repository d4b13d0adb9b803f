"""Structured channel pruning of diffusers ``UNet2DModel`` networks with torch-pruning.

Four channel importance criteria are available (``PRUNERS``):

- ``"diff-pruning"``: Fang, Ma and Wang, "Structural Pruning for Diffusion Models",
  NeurIPS 2023 (https://arxiv.org/abs/2305.10924). First-order Taylor importance
  ``sum |w * dL/dw|`` with the gradient of the noise-prediction loss accumulated over the
  timesteps ``t = 0, 1, 2, ...`` (least noisy first) until the loss at ``t`` falls below
  ``thr`` times the largest loss seen so far.
- ``"taylor"``: first-order Taylor importance ``|sum w * dL/dw|`` (Molchanov et al., CVPR 2019)
  with the loss at one uniformly drawn timestep per calibration image.
- ``"l1"``: L1 norm of the weights of each channel group.
- ``"random"``: uniform random scores from a seeded generator.

Every prunable group loses the same fraction of its channels (one pruning step). The last
convolution ``conv_out`` is never pruned, so the model's input and output channels stay as they
are. GroupNorm layers and attention heads keep their counts: each norm group and each head
loses the same number of channels. Diffusers modules that cache channel counts as attributes
(``Attention``, ``Downsample2D``, ``Upsample2D``, ``ResnetBlock2D``) are updated after pruning.

A pruned model is saved as safetensors weights plus a JSON file. The JSON file contains the
dense diffusers config and the pruned shape of every layer, so ``load_pruned`` rebuilds the
model without unpickling anything.

Example::

    from diffusers import DDPMPipeline
    from biasprune.pruning import prune_unet, save_pruned, load_pruned

    pipe = DDPMPipeline.from_pretrained("path/to/ddpm")
    small = prune_unet(pipe.unet, "l1", 0.5)
    save_pruned(small, "run/pruned-l1-0.5")
    same = load_pruned("run/pruned-l1-0.5")
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "GRADIENT_PRUNERS",
    "PRUNERS",
    "count_params_macs",
    "load_pruned",
    "model_size_mb",
    "prune_unet",
    "save_pruned",
    "validate_pruning_args",
]

PRUNERS: tuple[str, ...] = ("diff-pruning", "taylor", "l1", "random")
GRADIENT_PRUNERS: tuple[str, ...] = ("diff-pruning", "taylor")

WEIGHTS_NAME = "pruned_unet.safetensors"
CONFIG_NAME = "pruned_unet.json"
_FORMAT_VERSION = 1
# Modules whose parameters torch-pruning resizes through a registered layer pruner.
_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
# Images outside [-1, 1] by more than this are taken as a wrong value range (e.g. 0..255).
_IMAGE_RANGE_SLACK = 1e-3


def validate_pruning_args(pruner: str, pruning_ratio: float) -> None:
    """Check a pruner name and a channel pruning ratio before any work is done.

    Args:
        pruner: Importance criterion, one of ``PRUNERS``.
        pruning_ratio: Fraction of the channels of every prunable group to remove, in (0, 1).

    Raises:
        ValueError: If the pruner is unknown or the ratio is not strictly between 0 and 1.
    """
    if pruner not in PRUNERS:
        raise ValueError(
            f"invalid pruner={pruner!r}; choose one of {', '.join(PRUNERS)}."
        )
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, (int, float)):
        raise ValueError(
            f"pruning_ratio={pruning_ratio!r} must be a number in (0, 1), e.g. 0.5 to remove half "
            "of the channels."
        )
    if not 0.0 < pruning_ratio < 1.0:
        raise ValueError(
            f"pruning_ratio={pruning_ratio} is outside (0, 1), both ends excluded; pass the "
            "fraction of channels to remove, e.g. 0.25, 0.5 or 0.75."
        )


def prune_unet(
    unet: UNet2DModel,
    pruner: str,
    pruning_ratio: float,
    *,
    scheduler: Any | None = None,
    calibration_images: torch.Tensor | None = None,
    thr: float = 0.05,
    calibration_batch_size: int = 32,
    seed: int = 0,
) -> UNet2DModel:
    """Return a channel-pruned deep copy of a UNet; the input model is left untouched.

    Args:
        unet: The dense model. Any ``UNet2DModel`` layout, attention blocks included.
        pruner: Importance criterion, one of ``PRUNERS`` (see the module docstring).
        pruning_ratio: Fraction of channels removed from every prunable group, in (0, 1).
            Parameter counts shrink by about ``(1 - pruning_ratio) ** 2``.
        scheduler: Noise scheduler of the model (``DDPMScheduler`` or one with ``add_noise``
            and ``config.num_train_timesteps``). Required by the gradient pruners.
        calibration_images: Clean images, float in [-1, 1], shape (N, C, H, W) with C the
            model's ``in_channels``. Required by the gradient pruners.
        thr: Diff-Pruning stopping threshold, in [0, 1): gradients are accumulated until the
            loss falls below ``thr`` times the largest loss seen. Default 0.05, the value of
            Fang et al. (2023).
        calibration_batch_size: Images per forward pass when computing gradients. Default 32.
        seed: Seed for the calibration noise and timesteps and for ``"random"``. Default 0.

    Returns:
        The pruned copy, in eval mode, on the device and dtype of ``unet``, without gradients.

    Raises:
        ValueError: On an unknown pruner, a ratio outside (0, 1), a ratio that would empty
            a norm group or attention head, missing or malformed calibration inputs, or an
            unsupported layout (``Skip*`` blocks with FIR resampling, ``class_embed_type``).
        RuntimeError: If the pruned model fails its check forward pass.

    .. warning::
        The gradient pruners back-propagate through the whole model once per calibration
        batch and, for ``"diff-pruning"``, once per visited timestep (up to
        ``num_train_timesteps``): with N images that is up to N * T image passes.
    """
    # 1. Validate everything before copying or tracing the model.
    validate_pruning_args(pruner, pruning_ratio)
    if pruner in GRADIENT_PRUNERS:
        _validate_gradient_args(pruner, unet, scheduler, calibration_images, thr,
                                calibration_batch_size)
    _check_supported_layout(unet)
    _check_ratio_fits_groups(unet, pruning_ratio)

    # 2. Work on a copy so that the caller's model keeps its weights and attributes.
    model = copy.deepcopy(unet).eval().requires_grad_(True)
    params_before, macs_before = count_params_macs(model)
    channel_pruner = _build_pruner(model, pruner, pruning_ratio, seed)

    # 3. Gradient pruners: accumulate dL/dw on the calibration images.
    if pruner in GRADIENT_PRUNERS:
        generator = torch.Generator().manual_seed(seed)
        images = calibration_images.to(_device_of(model), _dtype_of(model))
        model.zero_grad(set_to_none=True)
        if pruner == "diff-pruning":
            _accumulate_diff_pruning_gradients(model, scheduler, images, thr,
                                               calibration_batch_size, generator)
        else:
            _accumulate_taylor_gradients(model, scheduler, images, calibration_batch_size,
                                         generator)

    # 4. Remove the channels, then refresh the attributes diffusers caches from the old shapes.
    channel_pruner.step()
    model.zero_grad(set_to_none=True)
    _sync_module_attributes(model)
    _check_structure(model)

    # 5. Check that the pruned model runs, and log its cost.
    try:
        params_after, macs_after = count_params_macs(model)
    except RuntimeError as error:
        raise RuntimeError(
            f"the UNet pruned with {pruner} at ratio {pruning_ratio} no longer runs ({error}); "
            "torch-pruning did not trace one of its blocks. Please report the model config."
        ) from error
    logger.info(
        "pruned UNet with %s at ratio %.3f: params %d -> %d, MACs %d -> %d",
        pruner, pruning_ratio, params_before, params_after, macs_before, macs_after,
    )
    return model.eval()


def count_params_macs(unet: UNet2DModel) -> tuple[int, int]:
    """Count parameters and multiply-accumulates of one forward pass with torch-pruning.

    The forward pass uses batch 1 at the model's ``sample_size`` and timestep 1.

    Args:
        unet: The model to measure (dense or pruned).

    Returns:
        ``(params, macs)`` as integers.
    """
    # torch-pruning's counter prints a notice when a module is called with keywords only.
    notices = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(notices):
        macs, params = tp.utils.count_ops_and_params(unet, _example_inputs(unet))
    if notices.getvalue().strip():
        logger.debug("op counter notice: %s", notices.getvalue().strip())
    return int(params), int(macs)


def save_pruned(
    unet: UNet2DModel, directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a (pruned) UNet as safetensors weights plus a JSON description.

    The JSON file contains the model's diffusers config (the dense layout), the shape of every
    convolution, linear, GroupNorm, embedding and attention module, and ``metadata``.

    Args:
        unet: The model to save.
        directory: Output folder, created if absent; existing files of the same names are
            replaced.
        metadata: JSON-serializable information stored alongside (e.g. pruner and ratio).
            Default: none.

    Returns:
        The output folder.

    Raises:
        ValueError: If ``metadata`` cannot be written as JSON.
    """
    payload = {
        "format_version": _FORMAT_VERSION,
        "config": json.loads(unet.to_json_string()),
        "shapes": _module_shapes(unet),
        "metadata": metadata or {},
    }
    try:
        text = json.dumps(payload, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(
            f"metadata={metadata!r} cannot be written as JSON ({error}); pass only strings, "
            "numbers, booleans, lists and dicts."
        ) from error

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in unet.state_dict().items()}
    _write_atomically(directory / WEIGHTS_NAME,
                      lambda path: safetensors.torch.save_file(state, str(path), {"format": "pt"}))
    _write_atomically(directory / CONFIG_NAME, lambda path: path.write_text(text))
    logger.debug("saved pruned UNet to %s", directory)
    return directory


def load_pruned(directory: str | os.PathLike) -> UNet2DModel:
    """Rebuild a UNet written by ``save_pruned``, on the CPU and in eval mode.

    The dense model is built from the stored diffusers config, every layer is resized to its
    stored shape and the weights are loaded strictly. Nothing is unpickled.

    Args:
        directory: Folder written by ``save_pruned``.

    Returns:
        The model, with the same outputs as the one that was saved.

    Raises:
        FileNotFoundError: If the folder or one of its two files is missing.
        ValueError: If the files do not describe the same model.
    """
    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; pass a folder written by save_pruned (it contains "
                f"{CONFIG_NAME} and {WEIGHTS_NAME})."
            )
    payload = json.loads((directory / CONFIG_NAME).read_text())
    if payload.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_NAME} has format_version={payload.get('format_version')!r}; "
            f"this version reads {_FORMAT_VERSION}. Save the model again with this version."
        )

    unet = UNet2DModel.from_config(payload["config"])
    _resize_modules(unet, payload["shapes"])
    state = safetensors.torch.load_file(str(directory / WEIGHTS_NAME))
    if state:
        unet.to(next(iter(state.values())).dtype)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {directory / WEIGHTS_NAME} do not fit the shapes in "
            f"{directory / CONFIG_NAME}: {error}. Save the model again with save_pruned."
        ) from error
    _sync_module_attributes(unet)
    return unet.eval()


def model_size_mb(directory_or_file: str | os.PathLike) -> float:
    """Size of a saved weights file in MiB (bytes / 2**20).

    Args:
        directory_or_file: A folder written by ``save_pruned`` or a weights file.

    Returns:
        The file size in MiB.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a folder written by save_pruned or a weights file."
        )
    return path.stat().st_size / 2**20


# --------------------------------------------------------------------------- validation


def _validate_gradient_args(
    pruner: str,
    unet: UNet2DModel,
    scheduler: Any | None,
    images: torch.Tensor | None,
    thr: float,
    batch_size: int,
) -> None:
    """Raise ValueError if a gradient pruner lacks a usable scheduler, images or settings."""
    if scheduler is None or not hasattr(scheduler, "add_noise"):
        raise ValueError(
            f"pruner={pruner!r} needs the model's noise scheduler, got scheduler={scheduler!r}; "
            "pass scheduler=pipeline.scheduler (a DDPMScheduler), or use 'l1' or 'random'."
        )
    if images is None:
        raise ValueError(
            f"pruner={pruner!r} needs calibration_images, got None; pass clean training "
            "images as a float tensor (N, C, H, W) in [-1, 1], or use 'l1' or 'random'."
        )
    if unet.config.num_class_embeds is not None:
        raise ValueError(
            f"pruner={pruner!r} computes the loss without class labels, but the UNet is "
            f"class-conditional (num_class_embeds={unet.config.num_class_embeds}); use 'l1' or "
            "'random' for it."
        )
    channels = unet.config.in_channels
    if not (torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == channels
            and images.is_floating_point() and images.shape[0] > 0):
        raise ValueError(
            f"calibration_images has shape {tuple(getattr(images, 'shape', ()))} and dtype "
            f"{getattr(images, 'dtype', type(images))}; expected a non-empty float tensor "
            f"(N, {channels}, H, W) in [-1, 1]."
        )
    low, high = images.min().item(), images.max().item()
    if low < -1 - _IMAGE_RANGE_SLACK or high > 1 + _IMAGE_RANGE_SLACK:
        raise ValueError(
            f"calibration_images range from {low:.3g} to {high:.3g}; expected [-1, 1]. "
            "Map 8-bit images with x / 127.5 - 1."
        )
    if not 0.0 <= thr < 1.0:
        raise ValueError(
            f"thr={thr} is outside [0, 1); Diff-Pruning (Fang et al., 2023) uses 0.05."
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"calibration_batch_size={batch_size} must be a positive integer.")


def _check_supported_layout(unet: UNet2DModel) -> None:
    """Raise ValueError for UNet2DModel options whose pruned model would not run."""
    config = unet.config
    skip_blocks = [b for b in (*config.down_block_types, *config.up_block_types) if "Skip" in b]
    if skip_blocks:
        raise ValueError(
            f"the UNet has blocks {skip_blocks}; their FIR resampling folds channels into the "
            "batch axis, which torch-pruning cannot follow, so the pruned model would not run. "
            "Prune a UNet2DModel built from the other block types."
        )
    if config.class_embed_type is not None:
        raise ValueError(
            f"the UNet has class_embed_type={config.class_embed_type!r}; only unconditional "
            "models and models with num_class_embeds can be pruned."
        )


def _check_ratio_fits_groups(unet: UNet2DModel, pruning_ratio: float) -> None:
    """Raise ValueError if the ratio would leave a norm group or attention head empty.

    torch-pruning keeps ``int(k * (1 - pruning_ratio))`` channels out of each group of ``k``
    (norm group or head), so that product must be at least 1.
    """
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm):
            size, what = module.num_channels // module.num_groups, f"GroupNorm {name!r}"
        elif isinstance(module, Attention):
            size, what = module.inner_dim // module.heads, f"attention heads of {name!r}"
        else:
            continue
        if int(size * (1 - pruning_ratio)) < 1:
            raise ValueError(
                f"pruning_ratio={pruning_ratio} would remove every channel from the "
                f"{size}-channel groups of {what}; use pruning_ratio <= {1 - 1 / size:.4g}."
            )


# --------------------------------------------------------------------------- pruner set-up


def _build_pruner(model: UNet2DModel, pruner: str, pruning_ratio: float,
                  seed: int) -> tp.pruner.BasePruner:
    """Trace the model and configure a one-step, uniform-ratio torch-pruning pruner."""
    # Each head of every attention module keeps the same number of channels, so the
    # attention processors can keep splitting the projections into ``attn.heads`` heads.
    num_heads = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for projection in (module.to_q, module.to_k, module.to_v):
                if projection is not None:
                    num_heads[projection] = module.heads
    logger.debug("pruner %s: %d attention projections pruned per head; conv_out ignored",
                 pruner, len(num_heads))
    # Bare parameters outside layers (the Fourier time projection's frequencies) stay whole.
    bare = [p for m in model.modules() if not isinstance(m, _LAYER_TYPES)
            for p in m.parameters(recurse=False)]
    # GroupNorm layers need no setting: torch-pruning reads their num_groups and removes the
    # same positions from every norm group.
    return tp.pruner.BasePruner(
        model,
        _example_inputs(model),
        importance=_build_importance(pruner, seed),
        pruning_ratio=pruning_ratio,
        iterative_steps=1,
        ignored_layers=[model.conv_out, *bare],
        unwrapped_parameters=[(p, p.dim() - 1) for p in bare],
        num_heads=num_heads,
        prune_num_heads=False,
        prune_head_dims=True,
    )


def _build_importance(pruner: str, seed: int) -> tp.importance.Importance:
    """Map a pruner name to a torch-pruning importance criterion."""
    if pruner == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if pruner == "random":
        return _SeededRandomImportance(seed)
    # Diff-Pruning sums |w * g| over the weights of a channel, the accumulated error of
    # removing each weight. Classic Taylor takes |sum w * g| over the channel.
    return tp.importance.GroupTaylorImportance(multivariable=pruner == "taylor")


class _SeededRandomImportance(tp.importance.Importance):
    """Uniform random channel scores drawn from a private, seeded generator."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> torch.Tensor:
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self._generator)


# --------------------------------------------------------------------------- gradients


def _accumulate_diff_pruning_gradients(
    model: UNet2DModel,
    scheduler: Any,
    images: torch.Tensor,
    thr: float,
    batch_size: int,
    generator: torch.Generator,
) -> list[float]:
    """Accumulate gradients over timesteps in increasing order until the loss gets small.

    One noise tensor is drawn for all timesteps. At ``t = 0, 1, 2, ...`` every calibration
    image is noised to ``t`` and the mean noise-prediction loss ``L_t`` is back-propagated
    (gradients add up). After each step the running maximum ``L_max`` is updated, and the
    loop stops at the first ``t`` with ``L_t < thr * L_max``; that step's gradient is kept.
    This follows the reference implementation of Fang et al. (NeurIPS 2023): late, noisy
    timesteps with a small loss carry little information about the content.

    Returns:
        The loss at each visited timestep, in order.
    """
    noise = torch.randn(images.shape, generator=generator).to(images)
    losses: list[float] = []
    for t in range(scheduler.config.num_train_timesteps):
        timesteps = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
        losses.append(_backward_noise_loss(model, scheduler, images, noise, timesteps,
                                           batch_size))
        if losses[-1] < thr * max(losses):
            break
    logger.debug("diff-pruning: %d timesteps visited, loss %.4g -> %.4g (max %.4g)",
                 len(losses), losses[0], losses[-1], max(losses))
    return losses


def _accumulate_taylor_gradients(
    model: UNet2DModel,
    scheduler: Any,
    images: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """Accumulate the gradient of the loss at one uniform random timestep per image.

    Returns:
        The mean loss over the calibration images.
    """
    noise = torch.randn(images.shape, generator=generator).to(images)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],),
                              generator=generator).to(images.device)
    loss = _backward_noise_loss(model, scheduler, images, noise, timesteps, batch_size)
    logger.debug("taylor: loss %.4g on %d images", loss, images.shape[0])
    return loss


def _backward_noise_loss(
    model: UNet2DModel,
    scheduler: Any,
    images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    batch_size: int,
) -> float:
    """Back-propagate the mean DDPM loss over all images, in batches; return its value.

    Each batch's loss is weighted by its share of the images, so the accumulated gradient
    equals the gradient of the mean over the whole set.
    """
    total = 0.0
    count = images.shape[0]
    for start in range(0, count, batch_size):
        batch = slice(start, start + batch_size)
        clean, eps, t = images[batch], noise[batch], timesteps[batch]
        prediction = model(scheduler.add_noise(clean, eps, t), t).sample
        # Learned-variance models append variance channels, so only the noise channels count.
        prediction = prediction[:, : clean.shape[1]]
        loss = F.mse_loss(prediction, _training_target(scheduler, clean, eps, t))
        share = clean.shape[0] / count
        (loss * share).backward()
        total += loss.item() * share
    return total


def _training_target(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """Return the quantity the model was trained to predict (the scheduler's prediction_type)."""
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    return noise


# --------------------------------------------------------------------------- structure


def _sync_module_attributes(unet: UNet2DModel) -> None:
    """Refresh the channel counts diffusers modules cache as plain attributes."""
    for module in unet.modules():
        if isinstance(module, Attention):
            _sync_attention(module)
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
    _sync_resample_channels(unet)


def _sync_attention(attn: Attention) -> None:
    """Make an Attention module's dimension attributes match its (pruned) projections."""
    attn.query_dim = attn.to_q.in_features
    attn.inner_dim = attn.to_q.out_features
    if attn.to_k is not None:
        attn.cross_attention_dim = attn.to_k.in_features
        attn.inner_kv_dim = attn.to_k.out_features
    if attn.to_out is not None:
        attn.out_dim = attn.to_out[0].out_features
    if attn.to_add_out is None:
        attn.out_context_dim = attn.query_dim
    else:
        attn.out_context_dim = attn.to_add_out.out_features
    # ``heads`` stays as it is, because every head lost the same number of channels.
    # attn.scale becomes 1 / sqrt(pruned head size). The default AttnProcessor2_0 does not read
    # attn.scale, because scaled_dot_product_attention derives that same factor from the
    # query's last axis. Processors that read attn.scale (AttnProcessor, sliced attention)
    # then compute the same attention as the default one.
    if attn.scale_qk:
        attn.scale = (attn.inner_dim // attn.heads) ** -0.5


def _sync_resample_channels(unet: UNet2DModel) -> None:
    """Set ``channels``/``out_channels`` of Downsample2D/Upsample2D (checked in forward)."""
    without_conv = []
    for module in unet.modules():
        if not isinstance(module, (Downsample2D, Upsample2D)):
            continue
        conv = _resample_conv(module)
        if conv is None:
            without_conv.append(module)
        else:
            module.channels, module.out_channels = conv.in_channels, conv.out_channels
    if without_conv:
        _sync_channels_from_inputs(unet, without_conv)


def _resample_conv(module: nn.Module) -> nn.Module | None:
    """Return the convolution of a resampling module, or None for pooling or interpolation."""
    for name in ("conv", "Conv2d_0"):
        conv = getattr(module, name, None)
        if isinstance(conv, nn.modules.conv._ConvNd):
            return conv
    return None


def _sync_channels_from_inputs(unet: UNet2DModel, modules: list[nn.Module]) -> None:
    """Read the channel count of parameter-free resampling modules from one forward pass."""

    def record(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        module.channels = module.out_channels = hidden_states.shape[1]

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            unet(**_example_inputs(unet))
    finally:
        for handle in handles:
            handle.remove()


def _check_structure(unet: UNet2DModel) -> None:
    """Raise RuntimeError if pruning left a norm or attention module inconsistent."""
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise RuntimeError(
                f"GroupNorm {name!r} has {module.num_channels} channels, not divisible by its "
                f"{module.num_groups} groups; pruning with these settings is not supported."
            )
        if isinstance(module, Attention) and (module.inner_dim % module.heads
                                              or module.inner_kv_dim % module.heads):
            raise RuntimeError(
                f"attention {name!r} has inner_dim {module.inner_dim} for {module.heads} "
                "heads; pruning with these settings is not supported."
            )


def _example_inputs(unet: UNet2DModel, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Build fixed forward inputs at the model's sample size, leaving the global RNG alone."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, height, width)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    device = _device_of(unet)
    inputs = {
        "sample": sample.to(device, _dtype_of(unet)),
        "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
    }
    if unet.config.num_class_embeds is not None:
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    return inputs


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------- serialization


def _module_shapes(unet: UNet2DModel) -> dict[str, dict[str, Any]]:
    """Record the shape of every resizable module, keyed by its name in the model."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            shapes[name] = {"kind": "conv", "in_channels": module.in_channels,
                            "out_channels": module.out_channels}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"kind": "linear", "in_features": module.in_features,
                            "out_features": module.out_features}
        elif isinstance(module, nn.GroupNorm):
            shapes[name] = {"kind": "group_norm", "num_channels": module.num_channels,
                            "num_groups": module.num_groups}
        elif isinstance(module, nn.Embedding):
            shapes[name] = {"kind": "embedding", "embedding_dim": module.embedding_dim}
        elif isinstance(module, Attention):
            shapes[name] = {"kind": "attention", "heads": module.heads}
    return shapes


def _resize_modules(unet: UNet2DModel, shapes: dict[str, dict[str, Any]]) -> None:
    """Give each module of a freshly built model the stored (pruned) shape, uninitialised."""
    modules = dict(unet.named_modules())
    for name, spec in shapes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"the stored shapes name a module {name!r} that the stored config does not "
                "build; the files were not written together. Save the model again."
            )
        kind = spec["kind"]
        if kind == "conv":
            _resize_conv(module, spec["in_channels"], spec["out_channels"])
        elif kind == "linear":
            module.in_features, module.out_features = spec["in_features"], spec["out_features"]
            _replace_parameters(module, weight=(module.out_features, module.in_features),
                                bias=(module.out_features,))
        elif kind == "group_norm":
            module.num_channels, module.num_groups = spec["num_channels"], spec["num_groups"]
            _replace_parameters(module, weight=(module.num_channels,),
                                bias=(module.num_channels,))
        elif kind == "embedding":
            module.embedding_dim = spec["embedding_dim"]
            _replace_parameters(module, weight=(module.num_embeddings, module.embedding_dim))
        elif kind == "attention" and module.heads != spec["heads"]:
            raise ValueError(f"attention {name!r} has {module.heads} heads in the config but "
                             f"{spec['heads']} in the stored shapes; save the model again.")


def _resize_conv(conv: nn.modules.conv._ConvNd, in_channels: int, out_channels: int) -> None:
    """Resize a (transposed) convolution to new channel counts."""
    conv.in_channels, conv.out_channels = in_channels, out_channels
    if conv.transposed:
        weight = (in_channels, out_channels // conv.groups, *conv.kernel_size)
    else:
        weight = (out_channels, in_channels // conv.groups, *conv.kernel_size)
    _replace_parameters(conv, weight=weight, bias=(out_channels,))


def _replace_parameters(module: nn.Module, **shapes: tuple[int, ...]) -> None:
    """Swap the named parameters of a module for uninitialised ones of the given shapes."""
    for name, shape in shapes.items():
        old = getattr(module, name, None)
        if isinstance(old, nn.Parameter):
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
