"""The `toyfaces` world: synthetic faces with known attributes, a dense DDPM and a classifier.

Everything is built from the config on first use (data rendering, DDPM training,
classifier training) and cached on disk under a key of that config, so later runs load
it in seconds. The ground truth is exact, which is what validates the bias measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from biasprune.cache import cache_root, cached_dir, content_key
from biasprune.classifier import UNKNOWN, Predictions
from biasprune.data import to_model_range
from biasprune.finetune import Finetuner, FinetuneSettings
from biasprune.worlds import World
from biasprune.worlds.toyfaces_render import GROUPS, render_faces, sample_attributes

logger = logging.getLogger(__name__)

# Bump when rendering or training code changes in a way that changes the built world.
_BUILD_VERSION = 2
# The world built from the default config, shipped so that the default study needs no build.
SHIPPED_WORLD_DIR = Path(__file__).with_name("toyfaces_default")


@dataclass
class ToyFacesConfig:
    """Settings of the synthetic face world.

    Attributes:
        resolution: Image side in pixels. Default 16, so the default study fits a 2-core CPU.
        num_images: Training images. Default 8000.
        frequencies: Group frequencies per attribute, in the order of `GROUPS`; deliberately
            unbalanced so that a shift toward the majority group is visible.
        data_seed: Seed of attributes, nuisance variation and noise.
        block_out_channels: UNet channels per resolution level (three levels: 16, 8, 4 px at 16 px).
        layers_per_block: Resnet layers per UNet block.
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups.
        num_train_timesteps: DDPM timesteps T.
        beta_schedule: diffusers beta schedule. Default `squaredcos_cap_v2`, the cosine schedule
            of Nichol and Dhariwal (2021), which destroys small images more gradually than the linear one.
        ddpm_steps: Training steps of the dense DDPM.
        ddpm_batch_size: Batch size of the dense DDPM.
        ddpm_learning_rate: AdamW learning rate of the dense DDPM.
        ddpm_ema_decay: EMA decay of the dense DDPM.
        classifier_steps: Training steps of the attribute classifier.
        classifier_threshold: Minimum softmax probability to assign a group; below it the
            classifier abstains and the image counts as unknown.
        holdout_images: Images rendered with another seed to measure classifier accuracy.
    """

    resolution: int = 16
    num_images: int = 8000
    frequencies: dict[str, list[float]] = field(
        default_factory=lambda: {
            "gender": [0.62, 0.38],
            "race": [0.5, 0.2, 0.2, 0.1],
            "age": [0.2, 0.6, 0.2],
        }
    )
    data_seed: int = 0
    block_out_channels: list[int] = field(default_factory=lambda: [32, 48, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 16
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    ddpm_steps: int = 4000
    ddpm_batch_size: int = 64
    ddpm_learning_rate: float = 1e-3
    ddpm_ema_decay: float = 0.999
    classifier_steps: int = 600
    classifier_threshold: float = 0.8
    holdout_images: int = 2000


def validate_config(config: ToyFacesConfig) -> None:
    """Raise ValueError for a toyfaces setting that cannot build a world."""
    if config.resolution < 8 or config.resolution % 4:
        raise ValueError(f"toyfaces resolution must be a multiple of 4 and at least 8, got {config.resolution}")
    for attribute, groups in GROUPS.items():
        p = config.frequencies.get(attribute)
        if p is None or len(p) != len(groups) or min(p) < 0 or sum(p) <= 0:
            raise ValueError(
                f"toyfaces frequencies[{attribute!r}] must be {len(groups)} non-negative numbers "
                f"for groups {groups}, got {p}"
            )
    if not 0.0 < config.classifier_threshold < 1.0:
        raise ValueError(f"classifier_threshold must be in (0, 1), got {config.classifier_threshold}")
    if config.num_images < 64:
        raise ValueError(f"toyfaces num_images must be at least 64, got {config.num_images}")


def render_dataset(config: ToyFacesConfig, seed: int | None = None, num_images: int | None = None):
    """Render the labelled images of the world; the same config and seed give the same bytes."""
    rng = np.random.default_rng(config.data_seed if seed is None else seed)
    n = config.num_images if num_images is None else num_images
    labels = sample_attributes(n, config.frequencies, rng)
    images = render_faces(labels, config.resolution, rng)
    return torch.from_numpy(images), labels


class ToyFacesClassifier(nn.Module):
    """A small CNN with one head per attribute; its pooled features give `fd_toyfaces`."""

    def __init__(self, groups: dict[str, list[str]] = GROUPS, threshold: float = 0.8, resolution: int = 16):
        super().__init__()
        self.groups = {a: list(g) for a, g in groups.items()}
        self.threshold = threshold
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(64, len(g)) for a, g in self.groups.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return x * 2 - 1

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(self._prepare(images))
        return {a: head(features) for a, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """Return the pooled 64-d features of uint8 or [0, 1] images as float64."""
        self.eval()
        out = [self.body(self._prepare(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> Predictions:
        """Assign each image a group per attribute, or UNKNOWN below the confidence threshold."""
        self.eval()
        probabilities: dict[str, list[torch.Tensor]] = {a: [] for a in self.groups}
        for i in range(0, len(images), batch_size):
            for a, logits in self(images[i : i + batch_size]).items():
                probabilities[a].append(logits.softmax(-1))
        labels, confidence = {}, {}
        for a, chunks in probabilities.items():
            p, index = torch.cat(chunks).max(-1)
            index[p < self.threshold] = UNKNOWN
            labels[a], confidence[a] = index.numpy(), p.numpy()
        return Predictions(labels, confidence)


def load_world(config: ToyFacesConfig | None = None, cache_dir: str | Path | None = None) -> World:
    """Load the toyfaces world, building and caching it first if needed.

    The world built from the default config ships with the package, so the default study
    needs no build. Any other config is built on first use and cached under its key.
    """
    config = config or ToyFacesConfig()
    validate_config(config)
    key = world_key(config)
    if shipped_world_key() == key:
        return _load_built(config, SHIPPED_WORLD_DIR, key)
    path = cache_root(cache_dir) / "worlds" / f"toyfaces-{key}"
    if not path.is_dir():
        logger.info("building toyfaces world %s (first use; later runs load it from %s)", key, path)
    cached_dir(path, lambda tmp: build_world(config, tmp))
    return _load_built(config, path, key)


def shipped_world_key() -> str | None:
    """Return the key of the world shipped with the package, or None if none ships."""
    info = SHIPPED_WORLD_DIR / "world.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("world_key")


def rebuild_shipped_world(directory: Path = None) -> Path:
    """Build the default world again and write it where the package ships it."""
    directory = Path(directory or SHIPPED_WORLD_DIR)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    build_world(ToyFacesConfig(), directory)
    return directory


def world_key(config: ToyFacesConfig) -> str:
    return content_key("toyfaces", _BUILD_VERSION, dataclasses.asdict(config))


def build_world(config: ToyFacesConfig, directory: Path) -> dict:
    """Render the data, train the classifier and the dense DDPM, and save them to `directory`.

    The build runs on one torch thread, so that it is reproducible bit for bit on a given CPU
    and torch version. On 2 cores one thread trained at about 5 steps/s, two at about 6.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_world(config, directory)
    finally:
        torch.set_num_threads(threads)


def _build_world(config: ToyFacesConfig, directory: Path) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.data_seed)
    images, labels = render_dataset(config)
    holdout_images, holdout_labels = render_dataset(config, seed=config.data_seed + 1, num_images=config.holdout_images)

    # 1. Attribute classifier, trained on the rendered data.
    classifier = train_classifier(config, images, labels)
    accuracy = classifier_accuracy(classifier, holdout_images, holdout_labels)
    logger.info("toyfaces classifier held-out accuracy %s", {a: round(v, 4) for a, v in accuracy.items()})
    save_file(classifier.state_dict(), directory / "classifier.safetensors")

    # 2. Dense DDPM, trained from scratch with the noise-prediction loss.
    unet, scheduler = _new_ddpm(config)
    settings = FinetuneSettings(
        batch_size=config.ddpm_batch_size,
        learning_rate=config.ddpm_learning_rate,
        ema_decay=config.ddpm_ema_decay,
        seed=config.data_seed,
        log_every=250,
        cosine_decay_steps=config.ddpm_steps,
    )
    trainer = Finetuner(unet, scheduler.config, to_model_range(images), settings)
    trainer.run([config.ddpm_steps], resume=False)
    trainer.ema.save_pretrained(directory / "unet")
    scheduler.save_pretrained(directory / "scheduler")

    info = {
        "world_key": world_key(config),
        "config": dataclasses.asdict(config),
        "classifier_holdout_accuracy": accuracy,
        "build_seconds": time.perf_counter() - started,
        "images_sha256": _array_digest(images),
    }
    (directory / "world.json").write_text(json.dumps(info, indent=2))
    logger.info("built toyfaces world in %.0f s", info["build_seconds"])
    return info


def _array_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def _new_ddpm(config: ToyFacesConfig) -> tuple[UNet2DModel, DDPMScheduler]:
    channels = tuple(config.block_out_channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(channels) - 1)
    up = ("AttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    unet = UNet2DModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule, clip_sample=True
    )
    return unet, scheduler


def train_classifier(config: ToyFacesConfig, images: torch.Tensor, labels: dict[str, np.ndarray]) -> ToyFacesClassifier:
    """Train the attribute classifier with additive noise so that it also reads imperfect samples."""
    generator = torch.Generator().manual_seed(config.data_seed)
    classifier = ToyFacesClassifier(GROUPS, config.classifier_threshold, config.resolution)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    targets = {a: torch.from_numpy(v).long() for a, v in labels.items()}
    x_all = images.float() / 255.0
    classifier.train()
    for step in range(config.classifier_steps):
        index = torch.randint(0, len(images), (128,), generator=generator)
        x = x_all[index]
        x = x + torch.randn(x.shape, generator=generator) * torch.rand(len(x), 1, 1, 1, generator=generator) * 0.08
        logits = classifier(x.clamp(0, 1))
        loss = sum(F.cross_entropy(logits[a], targets[a][index]) for a in GROUPS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            logger.info("classifier step %d/%d loss %.4f", step + 1, config.classifier_steps, loss.item())
    return classifier.eval()


def classifier_accuracy(classifier: ToyFacesClassifier, images: torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Return per-attribute accuracy of the argmax prediction (no abstention)."""
    with torch.no_grad():
        logits = {a: [] for a in classifier.groups}
        for i in range(0, len(images), 1024):
            for a, v in classifier(images[i : i + 1024]).items():
                logits[a].append(v)
    return {a: float((torch.cat(v).argmax(-1).numpy() == labels[a]).mean()) for a, v in logits.items()}


def _load_built(config: ToyFacesConfig, path: Path, key: str) -> World:
    images, labels = render_dataset(config)
    info = json.loads((path / "world.json").read_text())
    digest = _array_digest(images)
    if digest != info["images_sha256"]:
        logger.warning(
            "toyfaces images rendered now (sha256 %s) differ from those the cached world %s was trained on (%s); "
            "delete %s to rebuild it", digest, key, info["images_sha256"], path
        )
    classifier = ToyFacesClassifier(GROUPS, config.classifier_threshold, config.resolution)
    classifier.load_state_dict(load_file(path / "classifier.safetensors"))
    classifier.eval()
    unet = UNet2DModel.from_pretrained(path / "unet", low_cpu_mem_usage=False).eval()
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return World(
        name="toyfaces",
        model_id=f"toyfaces-{key}",
        unet=unet,
        scheduler_config=dict(scheduler.config),
        images=images,
        labels=labels,
        groups={a: list(g) for a, g in GROUPS.items()},
        classifier=classifier,
        features=classifier.embed,
        features_name="toyfaces",
        study_ratios={"gender": (["male"], ["female"]), "race": (["white"], ["black"]), "age": (["10-49"], None)},
        content_hashes={"world_key": key, "images_sha256": digest},
    )


def main(argv: list[str] | None = None) -> None:
    """Rebuild the shipped default world: `python -m biasprune.worlds.toyfaces --rebuild`."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the default toyfaces world that ships with biasprune.")
    parser.add_argument("--rebuild", action="store_true", required=True, help="train the world again from its config")
    parser.add_argument("--out", default=str(SHIPPED_WORLD_DIR), help="folder to write (default: the shipped one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"wrote {rebuild_shipped_world(Path(args.out))}")


if __name__ == "__main__":
    main()
