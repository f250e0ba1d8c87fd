"""Benchmarks for smoothce: loss + gradient of cross-entropy, side by side with PyTorch's ways.

Run from the repository root: ``python -m benchmarks --help``. Not installed with smoothce.
"""
