"""The FairFace attribute classifier: torchvision ResNet-34 with an 18-logit head.

FairFace (Kärkkäinen and Joo, 2021) publishes two ResNet-34 state dicts,
`res34_fair_align_multi_7_20190809.pt` (race 7) and `res34_fair_align_multi_4_20190809.pt`
(race 4). Both have 18 outputs: logits 0-6 are race (the 4-race model uses 0-3), 7-8 gender,
9-17 the 9 age bins. Inputs are 224x224 and normalized with ImageNet's mean and standard
deviation, as in FairFace's `predict.py`. With a face aligner, images are first detected and
aligned (dlib, padding 0.25); images without a detected face are reported as unknown.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biasprune.attributes import GroupMapping, mapping
from biasprune.cache import hash_file
from biasprune.classifier import UNKNOWN, Predictions

logger = logging.getLogger(__name__)

WEIGHTS_URL = "https://github.com/joojs/fairface (README: pretrained models)"
"""The page that links the published weights (a Google Drive folder)."""
WEIGHTS_FILES = {7: "res34_fair_align_multi_7_20190809.pt", 4: "res34_fair_align_multi_4_20190809.pt"}
NUM_OUTPUTS = 18
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HEADS = {"race": slice(0, 7), "gender": slice(7, 9), "age": slice(9, 18)}
DEFAULT_MAPPINGS = {"gender": "gender", "race": "race2", "age": "age3"}


def race_classes_of(weights_path: str | os.PathLike, race_classes: int = 0) -> int:
    """Return the race class count: `race_classes` when given, else read from the file name (`_4_` or `_7_`).

    A file whose name has neither is taken as the 7-race model.
    """
    if race_classes:
        if race_classes not in (4, 7):
            raise ValueError(f"race_classes must be 4 or 7 (FairFace's two models), got {race_classes}")
        return race_classes
    match = re.search(r"_([47])_", Path(weights_path).name)
    return int(match.group(1)) if match else 7


def build_resnet34() -> torch.nn.Module:
    """Return torchvision's ResNet-34 with FairFace's 18-output head and random weights."""
    import torchvision

    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, NUM_OUTPUTS)
    return model


def load_resnet34(weights_path: str | os.PathLike) -> torch.nn.Module:
    """Load a published FairFace state dict into ResNet-34 (eval mode, CPU).

    Raises:
        FileNotFoundError: The file does not exist; the message names the download page.
        ValueError: The file is not a ResNet-34 state dict with an 18-output head.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FairFace classifier weights {str(path)!r} not found; download {WEIGHTS_FILES[7]} "
            f"(or the 4-race {WEIGHTS_FILES[4]}) from {WEIGHTS_URL} and set "
            "trial.world.fairface64.classifier_weights or $BIASPRUNE_FAIRFACE_WEIGHTS to its path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch state dict: {err}") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} contains a {type(state).__name__}, not a state dict")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_resnet34()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{str(path)!r} is not a FairFace ResNet-34 state dict (torchvision resnet34 keys with an "
            f"{NUM_OUTPUTS}-output fc): {str(err).splitlines()[0]}"
        ) from err
    return model.eval()


class FairFaceClassifier:
    """Reads gender, race and age of face images with FairFace's ResNet-34.

    Args:
        weights_path: A published FairFace `.pt` state dict.
        mappings: Group mapping per attribute (see `biasprune.attributes`), default
            gender / race2 / age3. Only the attributes named here are reported.
        race_classes: 7 or 4; 0 reads it from the file name.
        aligner: Optional face aligner with `align(images) -> (chips, found)`; images
            without a found face are reported as `UNKNOWN`.
        min_confidence: Group confidence below which an attribute is reported as `UNKNOWN`.
        batch_size: Images per forward pass.
        device: Device of the network.
        autocast_dtype: Mixed-precision dtype on CUDA (for example torch.bfloat16), or None.
    """

    name = "fairface"

    def __init__(
        self,
        weights_path: str | os.PathLike,
        mappings: Mapping[str, str] | None = None,
        race_classes: int = 0,
        aligner=None,
        min_confidence: float = 0.0,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.race_classes = race_classes_of(weights_path, race_classes)
        self.mappings: dict[str, GroupMapping] = {}
        for attribute, name in (mappings or DEFAULT_MAPPINGS).items():
            m = mapping(name, self.race_classes)
            if m.attribute != attribute:
                raise ValueError(f"mapping {name!r} reads {m.attribute}, not {attribute!r}")
            self.mappings[attribute] = m
        self.groups = {a: list(m.groups) for a, m in self.mappings.items()}
        self.aligner = aligner
        self.min_confidence = min_confidence
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.weights_path = str(weights_path)
        self.network = load_resnet34(weights_path).to(self.device)
        self.description = (
            f"FairFace ResNet-34 ({Path(weights_path).name}, sha256 {hash_file(weights_path)}, race {self.race_classes}), "
            f"{INPUT_SIZE}x{INPUT_SIZE} ImageNet-normalized, "
            + ("dlib-aligned (padding 0.25)" if aligner is not None else "unaligned")
            + ", mappings " + ", ".join(f"{a}={m.name}" for a, m in self.mappings.items())
        )

    def raw_probabilities(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Return softmax probabilities per raw head (`race`, `gender`, `age`) for images in [0, 1]."""
        heads = {"race": [], "gender": [], "age": []}
        race = slice(0, self.race_classes)
        for start in range(0, len(images), self.batch_size):
            batch = _preprocess(images[start:start + self.batch_size].to(self.device))
            with torch.no_grad(), torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
            ):
                logits = self.network(batch).float()
            heads["race"].append(torch.softmax(logits[:, race], dim=1).cpu().numpy())
            heads["gender"].append(torch.softmax(logits[:, _HEADS["gender"]], dim=1).cpu().numpy())
            heads["age"].append(torch.softmax(logits[:, _HEADS["age"]], dim=1).cpu().numpy())
        widths = {"race": self.race_classes, "gender": 2, "age": 9}
        return {h: np.concatenate(v) if v else np.zeros((0, widths[h])) for h, v in heads.items()}

    def predict(self, images: torch.Tensor) -> Predictions:
        """Predict the configured attributes of images, shape (N, 3, H, W), uint8 or float in [0, 1].

        Images are aligned and classified one batch at a time, so the aligned 300 px chips of a
        whole dataset are never held at once.
        """
        heads: dict[str, list[np.ndarray]] = {"race": [], "gender": [], "age": []}
        found_parts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            if batch.dtype == torch.uint8:
                batch = batch.float() / 255.0
            found = np.ones(len(batch), dtype=bool)
            if self.aligner is not None:
                batch, found = self.aligner.align(batch)
            for head, values in self.raw_probabilities(batch).items():
                heads[head].append(values)
            found_parts.append(np.asarray(found, dtype=bool))
        widths = {"race": self.race_classes, "gender": 2, "age": 9}
        probabilities = {h: np.concatenate(v) if v else np.zeros((0, widths[h])) for h, v in heads.items()}
        found = np.concatenate(found_parts) if found_parts else np.zeros(0, dtype=bool)
        labels, confidence = {}, {}
        for attribute, m in self.mappings.items():
            group, conf = m.map_probabilities(probabilities[m.attribute])
            unknown = ~found | (conf < self.min_confidence)
            group[unknown] = UNKNOWN
            conf = np.where(found, conf, 0.0)
            labels[attribute], confidence[attribute] = group, conf
        if self.aligner is not None and not found.all():
            logger.info("no face detected in %d of %d images; they count as unknown", int((~found).sum()), len(found))
        return Predictions(labels, confidence)


def _preprocess(images: torch.Tensor) -> torch.Tensor:
    """Resize to 224x224 and normalize with ImageNet's mean and standard deviation."""
    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
