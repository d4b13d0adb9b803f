"""Check that mixed-precision sampling and classification leave the metrics within their noise.

    python bench/precision.py                      # the default toyfaces world, 1000 samples
    python bench/precision.py --precision fp16     # on a GPU
    python bench/precision.py --device cuda --num-samples 5000

The dense model is sampled and classified twice from the same noise, once in fp32 and once under
autocast in the given precision. The script prints both rows' metrics, the largest change of any
group share, and that change in units of the share's binomial standard error, then the wall
times. A change below about 2 standard errors is within the metric's own sampling noise. It exits
with status 1 when a share moves by more than `--max-se` standard errors.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time

from biasprune.config import TrialConfig
from biasprune.trial import open_measurer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="autocast precision to check")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--num-samples", type=int, default=1000, help="images sampled per precision")
    parser.add_argument("--sampler-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--max-se", type=float, default=3.0, help="largest accepted share change, in standard errors")
    return parser.parse_args(argv)


def measure(precision: str, args: argparse.Namespace, cache_dir: str) -> tuple[dict, float]:
    config = TrialConfig(pruner="dense", device=args.device, cache_dir=cache_dir)
    config.sampling.num_samples = args.num_samples
    config.sampling.sampler_steps = args.sampler_steps
    config.sampling.precision = precision
    config.measure.references = ["data_predicted", "data_labels", "uniform"]
    started = time.perf_counter()
    _, measurer = open_measurer(config)
    row = measurer.evaluate_dense()
    return row, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as cache_dir:
        reference, reference_s = measure("fp32", args, cache_dir)
        mixed, mixed_s = measure(args.precision, args, cache_dir)
    quality = reference["quality_metric"]
    print(f"device {reference['device']}, {args.num_samples} samples, {args.sampler_steps} DDIM steps")
    print(f"{'metric':<28} {'fp32':>12} {args.precision:>12}")
    for key in (quality, "fairness_divergence", "unknown_rate"):
        print(f"{key:<28} {reference[key]:>12.5f} {mixed[key]:>12.5f}")
    worst_key, worst_se, worst_delta = "", 0.0, 0.0
    for key in sorted(k for k in reference if k.startswith("share_")):
        p, q = reference[key], mixed[key]
        if not (math.isfinite(p) and math.isfinite(q)):
            continue
        se = math.sqrt(max(p * (1 - p), 1e-12) / args.num_samples)
        if abs(q - p) / se > worst_se:
            worst_key, worst_se, worst_delta = key, abs(q - p) / se, q - p
    print(f"largest share change: {worst_key} {worst_delta:+.4f} ({worst_se:.2f} standard errors)")
    print(f"wall time: fp32 {reference_s:.1f} s, {args.precision} {mixed_s:.1f} s")
    return 0 if worst_se <= args.max_se else 1


if __name__ == "__main__":
    sys.exit(main())
