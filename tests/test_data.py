from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biasprune.data import (
    from_model_range,
    load_image_folder,
    save_png,
    to_model_range,
    to_unit_range,
)


def _random_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, size, size), dtype=torch.uint8, generator=generator)


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


def test_save_png_round_trip_bit_exact(tmp_path):
    images = _random_images(5, 8)
    paths = save_png(images, tmp_path / "out", prefix="img", start_index=7)
    loaded, names = load_image_folder(tmp_path / "out")
    assert [p.name for p in paths] == [f"img_{i:06d}.png" for i in range(7, 12)]
    assert names == [p.name for p in paths]
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, images)


def test_load_image_folder_sorted_names_and_extensions(tmp_path):
    pixels = _random_images(3, 4).permute(0, 2, 3, 1).numpy()
    _write(tmp_path / "b.PNG", pixels[0])
    _write(tmp_path / "a.png", pixels[1])
    _write(tmp_path / "c.bmp", pixels[2])
    (tmp_path / "notes.txt").write_text("not an image")
    loaded, names = load_image_folder(tmp_path)
    assert names == ["a.png", "b.PNG"]
    assert torch.equal(loaded.permute(0, 2, 3, 1), torch.from_numpy(pixels[[1, 0]]))
    _, names_bmp = load_image_folder(tmp_path, extensions=("bmp",))
    assert names_bmp == ["c.bmp"]


def test_load_image_folder_mixed_sizes_invalid(tmp_path):
    _write(tmp_path / "small.png", np.zeros((4, 4, 3), np.uint8))
    _write(tmp_path / "wide.png", np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"'small.png' is 4x4 and 'wide.png' is 6x4.*resolution"):
        load_image_folder(tmp_path)


def test_load_image_folder_resize_and_rgb_convert(tmp_path):
    gray = np.full((4, 6), 200, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 255
    Image.fromarray(gray).save(tmp_path / "a_gray.png")
    Image.fromarray(rgba).save(tmp_path / "b_rgba.png")
    _write(tmp_path / "c_rgb.png", np.full((2, 2, 3), 77, np.uint8))
    loaded, names = load_image_folder(tmp_path, resolution=3)
    assert names == ["a_gray.png", "b_rgba.png", "c_rgb.png"]
    assert loaded.shape == (3, 3, 3, 3)
    # Bicubic resizing of a constant image stays constant.
    assert torch.all(loaded[0] == 200)
    assert loaded[1, :, 1, 1].tolist() == [10, 20, 30]
    assert torch.all(loaded[2] == 77)


def test_load_image_folder_resize_matches_pil_bicubic(tmp_path):
    pixels = _random_images(1, 10, seed=3)[0].permute(1, 2, 0).numpy()
    _write(tmp_path / "x.png", pixels)
    loaded, _ = load_image_folder(tmp_path, resolution=4)
    expected = np.array(Image.fromarray(pixels).resize((4, 4), Image.Resampling.BICUBIC))
    assert torch.equal(loaded[0].permute(1, 2, 0), torch.from_numpy(expected))


@pytest.mark.parametrize("content", [b"", b"definitely not a png", None])
def test_load_image_folder_corrupt_file_invalid(tmp_path, content):
    _write(tmp_path / "a_good.png", np.zeros((64, 64, 3), np.uint8))
    bad = tmp_path / "b_bad.png"
    if content is None:  # valid header, truncated pixel data
        _write(bad, _random_images(1, 64)[0].permute(1, 2, 0).numpy())
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"b_bad\.png.*remove or replace it"):
        load_image_folder(tmp_path)


def test_load_image_folder_missing_folder_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_image_folder(tmp_path / "no_such_folder")


def test_load_image_folder_no_images_invalid(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"contains no file ending in \['.jpeg', '.jpg', '.png'\]"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("resolution", [0, -3, 2.5, True])
def test_load_image_folder_resolution_invalid(tmp_path, resolution):
    with pytest.raises(ValueError, match=rf"resolution must be a positive integer.*{resolution!r}"):
        load_image_folder(tmp_path, resolution=resolution)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"prefix": "a/b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"start_index": -1}, "start_index"),
    ],
)
def test_save_png_arguments_invalid(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        save_png(_random_images(1, 2), tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "images",
    [torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, 2, 2)],
)
def test_save_png_images_invalid(tmp_path, images):
    with pytest.raises(ValueError, match="images must"):
        save_png(images, tmp_path)


def test_to_model_range_values():
    pixels = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    expected = torch.tensor([-1.0, 1 / 127.5 - 1, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0])
    out = to_model_range(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_to_unit_range_values():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    out = to_unit_range(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0]), rtol=0, atol=1e-7)


def test_from_model_range_round_trip_exact():
    every_value = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(from_model_range(to_model_range(every_value)), every_value)


def test_from_model_range_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 2.0])
    # (x + 1) * 127.5 -> 0, 0, 127.5, 254.87, 255; round-half-to-even gives 128 for 127.5.
    assert from_model_range(x).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("fn", [to_model_range, to_unit_range])
def test_range_conversion_uint8_invalid(fn):
    with pytest.raises(ValueError, match=r"images_uint8 must be a torch.uint8 tensor, got torch"):
        fn(torch.zeros(2))


def test_from_model_range_dtype_invalid():
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        from_model_range(torch.zeros(2, dtype=torch.uint8))
