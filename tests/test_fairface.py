from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from fairface_standins import save_fairface_weights

from biasprune import attributes
from biasprune.attributes import AGE9, GENDER, RACE4, RACE7, age_bin, mapping
from biasprune.classifier import UNKNOWN
from biasprune.fairface import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FairFaceClassifier,
    _preprocess,
    build_resnet34,
    load_resnet34,
    race_classes_of,
)

# Expected group of every raw class, written out by hand from the documented mappings.
EXPECTED_GROUPS = {
    "age3": ["0-9", "0-9", "10-49", "10-49", "10-49", "10-49", "50+", "50+", "50+"],
    "age2": ["other", "other", "10-49", "10-49", "10-49", "10-49", "other", "other", "other"],
    "race2": ["White", "Black", "Other", "Other", "Other", "Other", "Other"],
    "race4": ["White", "Black", "Other", "Asian", "Asian", "Other", "Other"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_mapping_of_every_raw_class(name):
    m = mapping(name)
    got = [m.groups[g] for g in m.map_labels(np.arange(len(m.raw_classes)))]
    assert got == EXPECTED_GROUPS[name]


@pytest.mark.parametrize("name,raw", [("gender", GENDER), ("race7", RACE7), ("age9", AGE9)])
def test_identity_mappings(name, raw):
    m = mapping(name)
    assert list(m.groups) == raw
    assert list(m.map_labels(np.arange(len(raw)))) == list(range(len(raw)))


def test_race_mappings_of_the_four_race_model():
    assert list(mapping("race4", 4).groups) == ["White", "Black", "Asian", "Other"]
    assert [mapping("race4", 4).groups[g] for g in mapping("race4", 4).map_labels(np.arange(4))] == [
        "White", "Black", "Asian", "Other"
    ]  # fmt: skip
    assert [mapping("race2", 4).groups[g] for g in mapping("race2", 4).map_labels(np.arange(4))] == [
        "White", "Black", "Other", "Other"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="race7 needs the 7-race"):
        mapping("race7", 4)
    assert RACE4 == ["White", "Black", "Asian", "Indian"]


def test_map_names_reads_every_csv_value():
    ages = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
    assert [mapping("age3").groups[g] for g in mapping("age3").map_names(ages)] == EXPECTED_GROUPS["age3"]
    races = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
    assert [mapping("race4").groups[g] for g in mapping("race4").map_names(races)] == EXPECTED_GROUPS["race4"]
    with pytest.raises(ValueError, match="unknown race label 'Martian'"):
        mapping("race2").map_names(["Martian"])


def test_map_labels_unknown_and_range():
    m = mapping("age3")
    assert list(m.map_labels(np.array([UNKNOWN, 8, 0]))) == [UNKNOWN, 2, 0]
    with pytest.raises(ValueError, match="out of range"):
        m.map_labels(np.array([9]))


def test_map_probabilities_sums_group_members():
    m = mapping("race2")
    probabilities = np.array([
        [0.30, 0.10, 0.15, 0.15, 0.10, 0.10, 0.10],  # White is the top class, and Other sums to 0.60
        [0.05, 0.50, 0.10, 0.10, 0.10, 0.10, 0.05],
    ])  # fmt: skip
    labels, confidence = m.map_probabilities(probabilities)
    assert [m.groups[g] for g in labels] == ["White", "Black"]
    np.testing.assert_allclose(confidence, [0.30, 0.50])


def test_age_bin_edges():
    assert list(age_bin([0, 2.9, 3, 9, 10, 49, 50, 69, 70, 95])) == [0, 0, 1, 1, 2, 5, 6, 7, 8, 8]
    with pytest.raises(ValueError):
        age_bin([-1])


def test_study_ratios_follow_the_mappings():
    ratios = attributes.study_ratios({"gender": mapping("gender"), "race": mapping("race2"), "age": mapping("age3")})
    assert ratios == {"gender": (["Male"], ["Female"]), "race": (["White"], ["Black"]), "age": (["10-49"], None)}
    assert "age" in attributes.study_ratios({"age": mapping("age2")})


def test_standin_state_dict_has_published_keys_and_shapes(tmp_path):
    path = save_fairface_weights(tmp_path / "res34_fair_align_multi_7_20190809.pt")
    state = torch.load(path, weights_only=True)
    reference = torchvision.models.resnet34(weights=None).state_dict()
    assert set(state) == set(reference)
    assert state["fc.weight"].shape == (18, 512)
    assert state["fc.bias"].shape == (18,)
    assert state["layer4.2.conv2.weight"].shape == reference["layer4.2.conv2.weight"].shape


def test_load_resnet34_accepts_data_parallel_prefix(tmp_path):
    path = tmp_path / "weights.pt"
    net = build_resnet34()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    loaded = load_resnet34(path)
    assert torch.equal(loaded.fc.weight, net.fc.weight)


def test_load_resnet34_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="res34_fair_align_multi_7_20190809.pt.*classifier_weights"):
        load_resnet34(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="not a FairFace ResNet-34"):
        load_resnet34(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_resnet34(garbage)


def test_race_classes_from_file_name():
    assert race_classes_of("res34_fair_align_multi_4_20190809.pt") == 4
    assert race_classes_of("res34_fair_align_multi_7_20190809.pt") == 7
    assert race_classes_of("custom.pt") == 7
    assert race_classes_of("custom.pt", 4) == 4


def _biased_weights(path, race: int, gender: int, age: int, margin: float = 6.0):
    """A network whose output ignores the image: each head's argmax is the given class."""
    net = build_resnet34()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.bias[race] = margin
        net.fc.bias[7 + gender] = margin
        net.fc.bias[9 + age] = margin
    torch.save(net.state_dict(), path)
    return path


def test_predict_maps_heads_to_groups(tmp_path):
    path = _biased_weights(tmp_path / "res34_fair_align_multi_7_x.pt", race=3, gender=1, age=6)
    classifier = FairFaceClassifier(path, mappings={"gender": "gender", "race": "race4", "age": "age3"})
    images = torch.rand(5, 3, 64, 64)
    predictions = classifier.predict(images)
    assert classifier.groups == {"gender": GENDER, "race": ["White", "Black", "Asian", "Other"], "age": ["0-9", "10-49", "50+"]}
    assert list(predictions.labels["race"]) == [2] * 5  # East Asian -> Asian
    assert list(predictions.labels["gender"]) == [1] * 5  # Female
    assert list(predictions.labels["age"]) == [2] * 5  # 50-59 -> 50+
    # Asian = East + Southeast Asian: e^6 + 1 over e^6 + 6; 50+ = three age bins: e^6 + 2 over e^6 + 8.
    e = np.exp(6.0)
    np.testing.assert_allclose(predictions.confidence["race"], (e + 1) / (e + 6), rtol=1e-4)
    np.testing.assert_allclose(predictions.confidence["age"], (e + 2) / (e + 8), rtol=1e-4)
    assert "race 7" in classifier.description
    assert "race=race4" in classifier.description


def test_predict_four_race_model_uses_first_four_logits(tmp_path):
    path = _biased_weights(tmp_path / "res34_fair_align_multi_4_x.pt", race=2, gender=0, age=0)
    with torch.no_grad():  # a large logit in the 7-race-only slot must be ignored
        state = torch.load(path, weights_only=True)
        state["fc.bias"][5] = 20.0
        torch.save(state, path)
    classifier = FairFaceClassifier(path, mappings={"race": "race4"})
    assert classifier.race_classes == 4
    assert list(classifier.predict(torch.rand(2, 3, 32, 32)).labels["race"]) == [2, 2]  # Asian


def test_min_confidence_abstains(tmp_path):
    path = _biased_weights(tmp_path / "w_7_.pt", race=0, gender=0, age=0, margin=0.5)
    classifier = FairFaceClassifier(path, mappings={"age": "age9"}, min_confidence=0.5)
    assert list(classifier.predict(torch.rand(3, 3, 16, 16)).labels["age"]) == [UNKNOWN] * 3


class _HalfFoundAligner:
    """Pretends that faces are found in even-indexed images only."""

    def align(self, images):
        found = np.arange(len(images)) % 2 == 0
        return torch.nn.functional.interpolate(images, size=(48, 48)), found


def test_images_without_a_face_are_unknown(tmp_path):
    path = _biased_weights(tmp_path / "w_7_.pt", race=1, gender=0, age=4)
    classifier = FairFaceClassifier(path, aligner=_HalfFoundAligner())
    predictions = classifier.predict(torch.rand(4, 3, 64, 64))
    assert len(predictions) == 4
    for attribute in ("gender", "race", "age"):
        assert predictions.labels[attribute][1] == UNKNOWN
        assert predictions.labels[attribute][3] == UNKNOWN
        assert predictions.labels[attribute][0] != UNKNOWN
        assert predictions.confidence[attribute][1] == 0.0
    assert "dlib-aligned" in classifier.description


def test_preprocess_resizes_and_normalizes():
    x = _preprocess(torch.full((2, 3, 64, 64), 0.5))
    assert x.shape == (2, 3, 224, 224)
    expected = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), expected, rtol=1e-5)


def test_uint8_input_matches_float(tmp_path):
    classifier = FairFaceClassifier(save_fairface_weights(tmp_path / "w_7_.pt"))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    a = classifier.raw_probabilities(images.float() / 255)
    b = classifier.predict(images)
    for attribute, m in classifier.mappings.items():
        labels, _ = m.map_probabilities(a[m.attribute])
        assert list(labels) == list(b.labels[attribute])


class _RecordingAligner(_HalfFoundAligner):
    def __init__(self):
        self.batch_sizes = []

    def align(self, images):
        self.batch_sizes.append(len(images))
        return super().align(images)


def test_alignment_runs_one_batch_at_a_time(tmp_path):
    aligner = _RecordingAligner()
    path = _biased_weights(tmp_path / "w_7_.pt", race=1, gender=0, age=4)
    classifier = FairFaceClassifier(path, aligner=aligner, batch_size=3)
    predictions = classifier.predict(torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8))
    assert aligner.batch_sizes == [3, 3, 1]
    # Each batch restarts the aligner's even/odd pattern: images 0, 2 | 3, 5 | 6 have a face.
    assert [int(v != UNKNOWN) for v in predictions.labels["gender"]] == [1, 0, 1, 1, 0, 1, 1]
