"""What a model is, beyond its name: a fingerprint of the weights a hasher depends on.

A learned hasher is trained on one model's queries and keys, so its header records that model's
identity (beside the geometry), `load_hasher` refuses a hasher whose identity differs, and the CLI
finds a shipped hasher by the identity of the model it loaded, whatever path or alias named it (the
GGUF file, the alias, a folder converted from either).

The fingerprint is a fixed sample of the query and key projection weights: SAMPLES values, evenly
spaced through each flattened `q_proj` / `k_proj` weight of the first, middle and last layer. Two
fingerprints match when their relative L2 difference is at most TOLERANCE: loose enough for the
same weights in another dtype (bfloat16 rounds each value by at most 2**-9 relative, float16 by
2**-12), tight enough that other weights of the same shape (another checkpoint, a re-quantisation)
do not pass. A model without those projections has no fingerprint, and only its geometry is checked.
"""

from __future__ import annotations

import hashlib
import math

import torch

SAMPLES = 64
TOLERANCE = 0.01
PROJECTIONS = ("q_proj", "k_proj")


def _projection_weights(model) -> dict[str, torch.Tensor]:
    """{name: weight} of the q/k projections of the first, middle and last decoder layer."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not layers:
        return {}
    chosen = sorted({0, len(layers) // 2, len(layers) - 1})
    weights = {}
    for i in chosen:
        attention = getattr(layers[i], "self_attn", None)
        for name in PROJECTIONS:
            proj = getattr(attention, name, None)
            weight = getattr(proj, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
                return {}
            weights[f"layers.{i}.self_attn.{name}.weight"] = weight
    return weights


def model_identity(model) -> dict | None:
    """{"tensors": [names], "sample": [floats], "digest": str} for `model`, or None without q/k projections."""
    weights = _projection_weights(model)
    if not weights:
        return None
    sample = []
    for weight in weights.values():
        weight = weight.detach()
        if hasattr(weight, "full_tensor"):  # a tensor-parallel shard (DTensor): fingerprint the whole weight (every rank calls this)
            weight = weight.full_tensor()
        flat = weight.reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, SAMPLES, device=flat.device).round().long()
        sample += [float(f"{v:.7g}") for v in flat[positions].float().cpu().tolist()]
    return {"tensors": list(weights), "sample": sample, "digest": _digest(sample)}


def _digest(sample: list[float]) -> str:
    """A short name for a fingerprint, for messages (matching uses the tolerance, not this)."""
    rounded = torch.tensor(sample, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    return hashlib.sha256(rounded.numpy().tobytes()).hexdigest()[:12]


def identity_difference(recorded: dict, actual: dict) -> float:
    """Relative L2 difference of two fingerprints (inf when they sample different tensors)."""
    if recorded.get("tensors") != actual.get("tensors") or len(recorded.get("sample", [])) != len(actual["sample"]):
        return math.inf
    a, b = torch.tensor(actual["sample"], dtype=torch.float64), torch.tensor(recorded["sample"], dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def identity_matches(recorded: dict | None, actual: dict | None) -> bool:
    """True when either side has no fingerprint (nothing to compare) or the two are within TOLERANCE."""
    if recorded is None or actual is None:
        return True
    return identity_difference(recorded, actual) <= TOLERANCE
