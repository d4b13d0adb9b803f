"""Image folders to uint8 tensors and back, and conversions between pixel ranges.

Images travel as uint8 tensors (N, 3, H, W). Diffusion models work in [-1, 1]
(``to_model_range`` / ``from_model_range``); feature extractors such as pytorch-fid's Inception
take [0, 1] (``to_unit_range``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_INDEX_DIGITS = 6


def load_image_folder(
    path: str | os.PathLike,
    *,
    resolution: int | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[torch.Tensor, list[str]]:
    """Load every image of a folder (not its subfolders) as one uint8 tensor.

    Files are read in sorted name order. Grayscale, palette and RGBA images are converted to RGB
    (alpha is dropped, not composited). All headers are read, and sizes checked, before any
    pixels are decoded.

    Args:
        path: The folder.
        resolution: Side length in pixels to resize every image to, with PIL's antialiased
            bicubic filter. None (default) keeps the stored size, which must then be the same
            for all images.
        extensions: File suffixes to read, case-insensitive. Default ``(".png", ".jpg", ".jpeg")``.

    Returns:
        Images (N, 3, H, W) uint8 and their file names, in the same order.

    Raises:
        FileNotFoundError: ``path`` is not an existing folder.
        ValueError: No file matches ``extensions``; a file cannot be read as an image; or sizes
            differ while ``resolution`` is None.

    Warning:
        Resizing does not keep the aspect ratio: a non-square image is stretched to
        ``resolution`` × ``resolution``. Crop such images beforehand.
    """
    _check_resolution(resolution)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(folder)!r} does not exist or is not a folder; pass the folder "
            "that holds the images."
        )
    files = _image_files(folder, extensions)
    sizes = [_image_size(file) for file in files]
    if resolution is None:
        _check_same_size(files, sizes)
        width, height = sizes[0]
    else:
        height = width = resolution
    images = torch.empty((len(files), 3, height, width), dtype=torch.uint8)
    for index, file in enumerate(files):
        images[index] = _read_rgb(file, resolution)
    logger.debug("Loaded %d images of %dx%d from %s", len(files), width, height, folder)
    return images, [file.name for file in files]


def save_png(
    images: torch.Tensor,
    folder: str | os.PathLike,
    prefix: str = "sample",
    start_index: int = 0,
) -> list[Path]:
    """Write images as lossless PNG files ``<prefix>_<index>.png``, index zero-padded to 6 digits.

    Existing files of the same name are overwritten.

    Args:
        images: uint8 tensor (N, 3, H, W).
        folder: Destination folder; created if missing.
        prefix: File name prefix. Default ``"sample"``.
        start_index: Index of the first image, so that batches can be written one after another.
            Default 0.

    Returns:
        The paths written, in image order.

    Raises:
        ValueError: ``images`` is not uint8 (N, 3, H, W), ``prefix`` contains a path separator, or
            ``start_index`` is negative.
    """
    _check_uint8_images(images, "images")
    if not prefix or os.sep in prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty file name part without '/', got {prefix!r}.")
    if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be an integer >= 0, got {start_index!r}.")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for offset, array in enumerate(pixels):
        file = out / f"{prefix}_{start_index + offset:0{_INDEX_DIGITS}d}.png"
        Image.fromarray(array).save(file, format="PNG")
        paths.append(file)
    return paths


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels [0, 255] to float32 [-1, 1] (x / 127.5 - 1), the range DDPMs work in.

    Args:
        images_uint8: uint8 tensor of any shape.

    Returns:
        float32 tensor of the same shape.

    Raises:
        ValueError: The tensor is not uint8.
    """
    _check_dtype(images_uint8, torch.uint8, "images_uint8")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels [0, 255] to float32 [0, 1] (x / 255, as torchvision's ``ToTensor``).

    Args:
        images_uint8: uint8 tensor of any shape.

    Returns:
        float32 tensor of the same shape.

    Raises:
        ValueError: The tensor is not uint8.
    """
    _check_dtype(images_uint8, torch.uint8, "images_uint8")
    return images_uint8.to(torch.float32) / 255.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map float [-1, 1] to uint8 pixels: clamp, then round((x + 1) * 127.5).

    ``from_model_range(to_model_range(u))`` equals ``u`` for every uint8 value.

    Args:
        x: Floating-point tensor of any shape, nominally in [-1, 1]; values outside are clamped.

    Returns:
        uint8 tensor of the same shape.

    Raises:
        ValueError: The tensor is not floating point.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a floating-point tensor in [-1, 1], got {got}; uint8 images are "
            "already pixels."
        )
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _check_resolution(resolution: int | None) -> None:
    """Raise unless resolution is None or a positive integer."""
    if resolution is None:
        return
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(
            f"resolution must be a positive integer (pixels) or None to keep the stored size, "
            f"got {resolution!r}."
        )


def _image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """List the files of ``folder`` whose suffix is in ``extensions``, sorted by name."""
    if isinstance(extensions, str) or not extensions:
        raise ValueError(
            f"extensions must be a non-empty sequence of suffixes such as ('.png',), "
            f"got {extensions!r}."
        )
    wanted = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}
    files = sorted(
        file for file in folder.iterdir() if file.is_file() and file.suffix.lower() in wanted
    )
    if not files:
        raise ValueError(
            f"Image folder {str(folder)!r} contains no file ending in {sorted(wanted)}; add images "
            "or pass extensions that match them."
        )
    return files


def _image_size(file: Path) -> tuple[int, int]:
    """Read (width, height) from the image header, without decoding pixels."""
    try:
        with Image.open(file) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise _unreadable(file, err) from err


def _check_same_size(files: list[Path], sizes: list[tuple[int, int]]) -> None:
    """Raise naming the first two files whose sizes differ."""
    for file, size in zip(files, sizes):
        if size != sizes[0]:
            raise ValueError(
                f"Images differ in size: {files[0].name!r} is {sizes[0][0]}x{sizes[0][1]} and "
                f"{file.name!r} is {size[0]}x{size[1]} (width x height); set resolution to "
                "resize every image to resolution x resolution."
            )


def _read_rgb(file: Path, resolution: int | None) -> torch.Tensor:
    """Decode one image as uint8 (3, H, W) RGB, resized when ``resolution`` is set."""
    try:
        with Image.open(file) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _unreadable(file, err) from err
    if resolution is not None and rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def _unreadable(file: Path, err: Exception) -> ValueError:
    """Build the error for an image file that PIL cannot read."""
    return ValueError(
        f"Image file {str(file)!r} cannot be read ({err}); remove or replace it."
    )


def _check_uint8_images(images: torch.Tensor, arg_name: str) -> None:
    """Raise unless ``images`` is a uint8 tensor (N, 3, H, W)."""
    _check_dtype(images, torch.uint8, arg_name)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{arg_name} must have shape (N, 3, H, W), got {tuple(images.shape)}."
        )


def _check_dtype(tensor: torch.Tensor, dtype: torch.dtype, arg_name: str) -> None:
    """Raise unless ``tensor`` is a tensor of ``dtype``."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{arg_name} must be a {dtype} tensor, got {got}; convert floats in [-1, 1] "
            "with from_model_range."
        )
