"""Fast decoding: a static cache, a decode step over the model's modules, CUDA graphs (engine.py),
and the end-to-end decode benchmark (bench.py)."""

from spotlight_attn.engine.dense import DenseKernel
from spotlight_attn.engine.engine import DecodeEngine

__all__ = ["DecodeEngine", "DenseKernel"]
