from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from biasprune import prune
from biasprune.pruning import CONFIG_NAME, count_params_macs, load_pruned


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipeline_dir(tmp_path):
    directory = tmp_path / "ddpm"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10)) \
        .save_pretrained(directory)
    return directory


def _write_images(folder, count: int, size: tuple[int, int] = (20, 20)) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


def _reported(stdout: str, name: str) -> tuple[int, int]:
    match = re.search(rf"^{name}\s+(\d+) -> (\d+) \(([\d.]+) % fewer\)$", stdout, re.MULTILINE)
    assert match, stdout
    return int(match.group(1)), int(match.group(2))


def test_prune_cli_l1_subprocess(pipeline_dir, tmp_path):
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "biasprune.prune", "--model", str(pipeline_dir),
               "--pruner", "l1", "--ratio", "0.5", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr

    loaded = load_pruned(out)
    dense_params, dense_macs = count_params_macs(build_tiny_unet())
    params, macs = count_params_macs(loaded)
    assert _reported(result.stdout, "params") == (dense_params, params)
    assert _reported(result.stdout, "MACs") == (dense_macs, macs)
    assert params < 0.3 * dense_params
    assert str(out) in result.stdout
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.num_train_timesteps == 10
    metadata = json.loads((out / CONFIG_NAME).read_text())["metadata"]
    assert metadata["pruner"] == "l1"
    assert metadata["pruning_ratio"] == 0.5


def test_prune_cli_taylor_with_images(pipeline_dir, tmp_path, capsys):
    _write_images(tmp_path / "images", count=3)
    out = tmp_path / "pruned"
    prune.main(["--model", str(pipeline_dir), "--pruner", "taylor", "--ratio", "0.25",
                "--images", str(tmp_path / "images"), "--batch-size", "2", "--out", str(out)])

    before, after = _reported(capsys.readouterr().out, "params")
    assert after == count_params_macs(load_pruned(out))[0] < before
    metadata = json.loads((out / CONFIG_NAME).read_text())["metadata"]
    assert metadata["calibration_images"] == 3


def test_prune_cli_missing_model_invalid(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        prune.main(["--model", str(missing), "--pruner", "l1", "--ratio", "0.5",
                    "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pruner", "diff-pruning", "--ratio", "0.5"], "--images DIR"),
        (["--pruner", "l1", "--ratio", "1.5"], r"pruning_ratio=1.5 is outside \(0, 1\)"),
        (["--pruner", "diff-pruning", "--ratio", "0.5", "--images", "x", "--thr", "2"], "--thr"),
    ],
)
def test_prune_cli_options_invalid(pipeline_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        prune.main(["--model", str(pipeline_dir), "--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_load_calibration_images_resized_to_range(tmp_path):
    _write_images(tmp_path / "images", count=2, size=(24, 20))
    images = prune.load_calibration_images(tmp_path / "images", 16)
    assert images.shape == (2, 3, 16, 16)
    assert images.dtype == torch.float32
    assert -1.0 <= images.min() < -0.8
    assert 0.8 < images.max() <= 1.0


def test_load_calibration_images_mixed_sizes_invalid(tmp_path):
    _write_images(tmp_path / "images", count=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "small.png")
    with pytest.raises(ValueError, match="small.png is 8x8.*one size"):
        prune.load_calibration_images(tmp_path / "images", 16)


def test_load_calibration_images_empty_invalid(tmp_path):
    with pytest.raises(ValueError, match="no .png/.jpg"):
        prune.load_calibration_images(tmp_path, 16)
