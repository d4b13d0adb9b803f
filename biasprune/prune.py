"""Prune the UNet of a diffusers DDPM pipeline and save the result.

Commands to paste::

    # L1-norm pruning of half the channels of a local pipeline
    python -m biasprune.prune --model run/ddpm --pruner l1 --ratio 0.5 --out run/pruned-l1-0.5

    # Diff-Pruning (Fang et al., NeurIPS 2023) of the study's model, calibrated on a folder
    # of training images (resized to the model's sample size)
    python -m biasprune.prune --model theunnecessarythings/ddpm-ema-fairface-64 \\
        --pruner diff-pruning --ratio 0.25 --images data/fairface/train --thr 0.05 \\
        --out run/pruned-diff-0.25 --device cuda

The output folder contains the pruned UNet (read it back with ``biasprune.pruning.load_pruned``)
and the pipeline's scheduler config in ``scheduler/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from biasprune.pruning import (
    GRADIENT_PRUNERS,
    PRUNERS,
    count_params_macs,
    model_size_mb,
    prune_unet,
    save_pruned,
    validate_pruning_args,
)

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# "owner/name" or "name": what the Hugging Face Hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, prune the pipeline's UNet and write it to ``--out``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # 1. Check every option before loading anything.
    try:
        validate_pruning_args(args.pruner, args.ratio)
    except ValueError as error:
        parser.error(str(error))
    if args.pruner in GRADIENT_PRUNERS and args.images is None:
        parser.error(f"--pruner {args.pruner} needs calibration images: pass --images DIR "
                     "(a folder of PNG/JPG training images), or use --pruner l1 or random.")
    if not 0.0 <= args.thr < 1.0:
        parser.error(f"--thr {args.thr} is outside [0, 1); Diff-Pruning (Fang et al., 2023) "
                     "uses 0.05.")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be at least 1.")
    if args.images is not None and not Path(args.images).is_dir():
        parser.error(f"--images {args.images}: no such folder.")
    if not _looks_like_hub_id(args.model) and not Path(args.model).exists():
        parser.error(f"--model {args.model}: no such local folder (and not a Hub id of the "
                     "form owner/name); pass a folder written by DDPMPipeline.save_pretrained.")

    # 2. Load the pipeline and, for gradient pruners, the calibration images.
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(args.model).to(args.device)
    unet = pipeline.unet
    images = None
    if args.pruner in GRADIENT_PRUNERS:
        images = load_calibration_images(args.images, unet.config.sample_size,
                                         unet.config.in_channels)
    elif args.images is not None:
        logger.warning("--images is ignored by --pruner %s (it uses no gradients)", args.pruner)

    # 3. Prune and report the cost before and after.
    params_before, macs_before = count_params_macs(unet)
    pruned = prune_unet(unet, args.pruner, args.ratio, scheduler=pipeline.scheduler,
                        calibration_images=images, thr=args.thr,
                        calibration_batch_size=args.batch_size, seed=args.seed)
    params_after, macs_after = count_params_macs(pruned)
    print(_reduction_line("params", params_before, params_after))
    print(_reduction_line("MACs", macs_before, macs_after))

    # 4. Save the pruned UNet and the scheduler config.
    out = Path(args.out)
    metadata = {"model": args.model, "pruner": args.pruner, "pruning_ratio": args.ratio,
                "thr": args.thr, "seed": args.seed,
                "calibration_images": 0 if images is None else int(images.shape[0]),
                "params": params_after, "macs": macs_after}
    save_pruned(pruned, out, metadata=metadata)
    pipeline.scheduler.save_pretrained(out / "scheduler")
    print(f"saved pruned UNet to {out} ({model_size_mb(out):.2f} MB) "
          f"and the scheduler to {out / 'scheduler'}")


def load_calibration_images(
    folder: str | os.PathLike, sample_size: int | tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """Read every PNG/JPG image of a folder into a float tensor in [-1, 1].

    Args:
        folder: Folder of images, all of one size (not searched recursively).
        sample_size: Model resolution: an int for square images or (height, width); every
            image is resized to it (bicubic).
        channels: 3 for RGB, 1 for grayscale. Default 3.

    Returns:
        Tensor of shape (N, channels, height, width), files in name order.

    Raises:
        ValueError: If the folder contains no image or the images differ in size.
    """
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"--images {folder}: no .png/.jpg/.jpeg file found; pass a folder "
                         "of training images.")
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    mode = "RGB" if channels == 3 else "L"
    arrays, first_size = [], None
    for path in paths:
        with Image.open(path) as image:
            if first_size is None:
                first_size = image.size
            elif image.size != first_size:
                raise ValueError(
                    f"{path} is {image.size[0]}x{image.size[1]} but {paths[0]} is "
                    f"{first_size[0]}x{first_size[1]}; --images needs images of one size."
                )
            resized = image.convert(mode).resize((width, height), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(resized, dtype=np.float32).reshape(height, width, -1))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    logger.info("read %d calibration images from %s", len(paths), folder)
    return batch / 127.5 - 1.0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m biasprune.prune",
        description="Prune the UNet of a diffusers DDPM pipeline and save it.",
    )
    parser.add_argument("--model", required=True,
                        help="local pipeline folder (DDPMPipeline.save_pretrained) or Hub id")
    parser.add_argument("--pruner", required=True, choices=PRUNERS,
                        help="channel importance criterion")
    parser.add_argument("--ratio", required=True, type=float,
                        help="fraction of channels removed from every layer, in (0, 1)")
    parser.add_argument("--out", required=True, help="output folder for the pruned model")
    parser.add_argument("--images", default=None,
                        help="folder of PNG/JPG calibration images of one size; required by "
                             f"{' and '.join(GRADIENT_PRUNERS)}")
    parser.add_argument("--thr", type=float, default=0.05,
                        help="diff-pruning stops accumulating gradients once the loss falls "
                             "below thr times its maximum (default: 0.05)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="calibration images per forward pass (default: 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for calibration noise and the random pruner (default: 0)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to prune on, e.g. cpu or cuda (default: cpu)")
    return parser


def _looks_like_hub_id(model: str) -> bool:
    """True for "name" or "owner/name"; local-looking paths (./x, /x, a/b/c) are not."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


def _reduction_line(name: str, before: int, after: int) -> str:
    return f"{name:<6} {before} -> {after} ({100 * (1 - after / before):.1f} % fewer)"


if __name__ == "__main__":
    main()
