"""The attribute classifier interface that fairness measurement reads generated faces with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

UNKNOWN = -1
"""Group index of an image the classifier abstained on (confidence below its threshold)."""


@dataclass
class Predictions:
    """Per-image predictions for each attribute.

    `labels[a]` contains one group index per image (into the classifier's `groups[a]`), or
    `UNKNOWN`; `confidence[a]` contains the softmax probability of the predicted group.
    """

    labels: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.labels.values()))) if self.labels else 0


class AttributeClassifier(Protocol):
    """Reads the demographic attributes of face images.

    `groups` maps each attribute name to its ordered group names. `predict` takes float
    images in [0, 1], shape (N, 3, H, W), at any resolution the classifier resizes from.
    """

    groups: dict[str, list[str]]

    def predict(self, images: torch.Tensor) -> Predictions: ...


def check_groups(classifier_groups: dict[str, list[str]], configured: dict[str, list[str]]) -> None:
    """Raise ValueError unless the classifier reads every configured attribute with the same groups."""
    for attribute, groups in configured.items():
        if attribute not in classifier_groups:
            raise ValueError(
                f"classifier has no attribute {attribute!r} (it reads {sorted(classifier_groups)}); "
                f"remove {attribute!r} from the configured attributes or use a classifier that reads it"
            )
        if list(classifier_groups[attribute]) != list(groups):
            raise ValueError(
                f"classifier groups for {attribute!r} are {list(classifier_groups[attribute])}, "
                f"but the configuration expects {list(groups)}; set the configured groups to the "
                "classifier's or map the classifier's outputs first"
            )
