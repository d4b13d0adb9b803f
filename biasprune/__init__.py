"""Measure how structured pruning of diffusion models changes quality, cost and demographic bias."""

__version__ = "0.1.0"
