"""Offline stand-ins of the real study's files, in their published formats with random content.

- a diffusers DDPM pipeline folder with the FairFace-64 UNet layout (CelebA-HQ-256 blocks),
- a FairFace-format folder: images under train/ and a label CSV with every label value,
- a FairFace ResNet-34 state dict with the published key names and shapes,
- pytorch-fid's FID Inception state dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from pytorch_fid import inception as pf_inception

from biasprune.attributes import AGE9, GENDER, RACE7
from biasprune.fairface import build_resnet34

STUDY_CHANNELS = (128, 128, 256, 256, 512, 512)
STUDY_DOWN_BLOCKS = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
STUDY_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")


def study_unet(sample_size: int = 32, channel_divisor: int = 8, seed: int = 0) -> UNet2DModel:
    """The study's UNet layout (6 levels, attention in the 5th down and 2nd up block, 2 layers per block).

    `channel_divisor` divides the study's channel counts (1 gives the full 128…512 model).
    """
    torch.manual_seed(seed)
    channels = tuple(c // channel_divisor for c in STUDY_CHANNELS)
    return UNet2DModel(
        sample_size=sample_size,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=STUDY_DOWN_BLOCKS,
        up_block_types=STUDY_UP_BLOCKS,
        norm_num_groups=min(32, channels[0] // 2),
        attention_head_dim=8,
    ).eval()


def save_pipeline(folder: Path, unet: UNet2DModel, num_train_timesteps: int = 1000) -> Path:
    """Save a DDPM pipeline the way the Hub repositories hold it (model_index.json, unet/, scheduler/)."""
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def fairface_rows(count: int) -> list[dict]:
    """Label rows that cycle through every race, gender and age value of FairFace's CSVs."""
    ages = [a if a != "70+" else "more than 70" for a in AGE9]
    rows = []
    for i in range(count):
        rows.append({
            "file": f"train/{i + 1}.jpg",
            "age": ages[i % len(ages)],
            "gender": GENDER[i % len(GENDER)],
            "race": RACE7[i % len(RACE7)],
            "service_test": bool(i % 3 == 0),
        })  # fmt: skip
    return rows


def make_fairface_folder(folder: Path, count: int = 48, size: int = 40, seed: int = 0) -> Path:
    """Write `count` JPEG faces-to-be (smooth random images) and `fairface_label_train.csv`."""
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    rows = fairface_rows(count)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for row in rows:
        base = rng.uniform(40, 220, size=3)
        slope = rng.uniform(-60, 60, size=(2, 3))
        image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / row["file"], quality=95)
    pd.DataFrame(rows).to_csv(folder / "fairface_label_train.csv", index=False)
    return folder


def save_fairface_weights(path: Path, seed: int = 0) -> Path:
    """Save a random ResNet-34 state dict with FairFace's 18-output head, as the published `.pt` files are."""
    torch.manual_seed(seed)
    torch.save(build_resnet34().state_dict(), path)
    return path


def inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Build random weights for pytorch-fid's FID Inception the way `fid_inception_v3` does.

    Convolutions get He-normal weights so that activations keep their scale through the network
    (PyTorch's default init shrinks the pool3 features to about 1e-8).
    """
    torch.manual_seed(seed)
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def make_study_files(root: Path, images: int = 48) -> dict[str, Path]:
    """Write every stand-in under `root` and return their paths by config key."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": save_pipeline(root / "ddpm", study_unet()),
        "data_dir": make_fairface_folder(root / "fairface", count=images),
        "classifier_weights": save_fairface_weights(root / "res34_fair_align_multi_7_20190809.pt"),
        "fid_weights": root / "pt_inception-2015-12-05-6726825d.pth",
    }
    torch.save(inception_state_dict(), paths["fid_weights"])
    return paths
