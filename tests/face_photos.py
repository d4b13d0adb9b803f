"""A real face photo for the classifier and alignment tests: scikit-image's astronaut (bundled)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FACE_BOX = (40, 220, 130, 310)
"""Rows and columns (top, bottom, left, right) of a square crop around the astronaut's face."""


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def as_tensor(*images: np.ndarray) -> torch.Tensor:
    """Stack uint8 (H, W, 3) images into a float (N, 3, H, W) tensor in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images]).float() / 255.0


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def face_crop() -> np.ndarray:
    top, bottom, left, right = FACE_BOX
    return np.ascontiguousarray(astronaut()[top:bottom, left:right])


def face64() -> np.ndarray:
    """The face framed as a generated 64×64 face is: the face fills most of the image."""
    return resize(face_crop(), 64, 64)
