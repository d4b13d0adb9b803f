"""Deterministic renderer of synthetic faces whose demographic attributes are known exactly.

Each image is a face on a background. Three attributes stand in for the demographic ones
of the real study and are drawn at configurable, deliberately unbalanced frequencies:

- gender (2 groups): face outline. "male" is a rounded square with short hair on top,
  "female" a disk with long hair down both sides.
- race (4 groups): skin tone, four well-separated colours.
- age (3 groups): hair colour (blond, auburn, grey-white). The colours differ in hue as well
  as brightness: with black in place of auburn, a measured build of the default world
  generated the 10-49 group about 10 points below its training share.

Nuisance variation keeps the task from being trivial: face position and size, background
colour and gradient, global lighting and pixel noise.
"""

from __future__ import annotations

import numpy as np

GROUPS: dict[str, list[str]] = {
    "gender": ["male", "female"],
    "race": ["white", "black", "asian", "indian"],
    "age": ["0-9", "10-49", "50+"],
}

# RGB in [0, 1]. Skin tones differ by at least 0.2 in some channel after the lighting range.
_SKIN_RGB = np.array(
    [
        [0.96, 0.80, 0.72],  # white
        [0.32, 0.19, 0.11],  # black
        [0.93, 0.78, 0.38],  # asian
        [0.66, 0.42, 0.24],  # indian
    ]
)
_HAIR_RGB = np.array(
    [
        [0.95, 0.80, 0.15],  # 0-9: blond
        [0.45, 0.16, 0.06],  # 10-49: auburn
        [0.85, 0.86, 0.92],  # 50+: grey-white
    ]
)


def sample_attributes(
    num_images: int, frequencies: dict[str, list[float]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Draw each attribute independently at its group frequencies."""
    labels = {}
    for attribute, groups in GROUPS.items():
        p = np.asarray(frequencies[attribute], dtype=float)
        labels[attribute] = rng.choice(len(groups), size=num_images, p=p / p.sum())
    return labels


def render_faces(labels: dict[str, np.ndarray], resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Render one face per label triple; return uint8 images of shape (N, 3, resolution, resolution)."""
    n = len(labels["gender"])
    scale = resolution / 16.0
    coords = (np.arange(resolution) + 0.5)[None, :]
    ys, xs = coords[:, :, None], coords[:, None, :]  # (1, R, 1) and (1, 1, R)

    # 1. Nuisance parameters, per image.
    cx = (8.0 + rng.uniform(-1.0, 1.0, n)) * scale
    cy = (8.5 + rng.uniform(-0.75, 0.75, n)) * scale
    radius = (4.7 + rng.uniform(-0.4, 0.4, n)) * scale
    background = rng.uniform([0.18, 0.38, 0.42], [0.32, 0.55, 0.68], size=(n, 3))
    gradient = rng.uniform(-0.08, 0.08, size=(n, 2))
    lighting = rng.uniform(0.9, 1.06, n)

    dx = (xs - cx[:, None, None]) / radius[:, None, None]
    dy = (ys - cy[:, None, None]) / radius[:, None, None]
    male = (labels["gender"] == 0)[:, None, None]

    # 2. Face mask: a disk, or a rounded square (L4 norm) for "male".
    distance = np.where(male, (dx**4 + dy**4) ** 0.25, np.sqrt(dx**2 + dy**2))
    edge = 1.0 / radius[:, None, None]
    face = _soft_step(1.0 - distance, edge)

    # 3. Hair: a cap above the face, plus side locks down to the chin for "female".
    cap = _soft_step(1.35 - np.sqrt(dx**2 + (dy + 0.3) ** 2), edge)
    cap *= _soft_step(-dy - 0.35, edge)
    locks = _soft_step(np.abs(dx) - 0.8, edge) * _soft_step(1.45 - np.abs(dx), edge) * _soft_step(1.1 - dy, edge)
    locks *= _soft_step(dy + 0.6, edge) * ~male
    hair = np.clip(np.maximum(cap, locks), 0.0, 1.0)

    # 4. Eyes and mouth, dark, inside the face.
    eye_y = dy + 0.15
    eyes = _soft_step(0.22 - np.sqrt((np.abs(dx) - 0.38) ** 2 + eye_y**2), edge)
    mouth = _soft_step(0.12 - np.abs(dy - 0.45), edge) * _soft_step(0.35 - np.abs(dx), edge)
    features = np.clip(eyes + mouth, 0.0, 1.0) * face

    # 5. Compose colours, then lighting and noise.
    skin = _SKIN_RGB[labels["race"]][:, :, None, None]
    hair_rgb = _HAIR_RGB[labels["age"]][:, :, None, None]
    ramp = gradient[:, 0, None, None] * (xs / resolution - 0.5) + gradient[:, 1, None, None] * (ys / resolution - 0.5)
    image = background[:, :, None, None] + ramp[:, None]
    image = image * (1 - face[:, None]) + skin * face[:, None]
    image = image * (1 - features[:, None]) + 0.12 * features[:, None]
    image = image * (1 - hair[:, None]) + hair_rgb * hair[:, None]
    image = image * lighting[:, None, None, None] + rng.normal(0.0, 0.015, size=image.shape)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _soft_step(x: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Anti-aliased step: 0 below -width/2, 1 above width/2, linear between."""
    return np.clip(x / width + 0.5, 0.0, 1.0)
