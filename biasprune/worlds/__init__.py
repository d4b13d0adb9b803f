"""Worlds: everything a study runs against (dense pipeline, data, labels, classifier)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import UNet2DModel

from biasprune.classifier import AttributeClassifier


@dataclass
class World:
    """A dense model with the data and classifier it is measured against.

    Attributes:
        name: World name (`toyfaces`, `fairface64`).
        model_id: Identifier of the dense model (Hub id, directory or cache key).
        unet: The dense noise-prediction model.
        scheduler_config: Config of the DDPM training scheduler.
        images: Training images, uint8 (N, 3, H, W) at the model's resolution.
        labels: Ground-truth group index per image and attribute, or None if unlabelled.
        groups: Group names per attribute, in the classifier's order.
        classifier: Reads the attributes of generated images.
        features: Maps uint8 images to an embedding used for `fd_<features_name>`, or None.
        features_name: Name of that embedding (the metric is `fd_<features_name>`).
        study_ratios: Numerator and denominator groups of each study ratio
            (denominator None means all other groups).
        content_hashes: Hashes of the world's parts, logged as run tags.
    """

    name: str
    model_id: str
    unet: UNet2DModel
    scheduler_config: dict
    images: torch.Tensor
    labels: dict[str, np.ndarray] | None
    groups: dict[str, list[str]]
    classifier: AttributeClassifier
    features: Callable[[torch.Tensor], np.ndarray] | None = None
    features_name: str | None = None
    study_ratios: dict[str, tuple[list[str], list[str] | None]] = field(default_factory=dict)
    content_hashes: dict[str, str] = field(default_factory=dict)
