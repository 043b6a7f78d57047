"""Budgets that follow the attention: one mean budget shared unevenly over (layer, KV head).

A fixed fraction gives every (layer, KV head) the same share of the cache however concentrated its
attention is. A head budget profile records, per (layer, KV head), the attention mass a method's own
selection recovers at each fraction of a grid, measured on calibration text the way `spotlight eval
retrieval` measures it (`spotlight calibrate`). `HeadBudgetProfile.allocate` then splits a mean
budget so that the mass summed over the cells is largest: water-filling over each curve's concave
hull, every head between `floor` and `cap` times the budget, the mean over the sparse cells equal to
the budget. Decoding reads per-head counts from the selection plan (config.Budget.heads), so a step
reads as many keys as the fixed budget on average.

File: safetensors, tensors `fractions` [F] float64 and `mass` [L, Hkv, F] float64 (NaN on layers
not calibrated), written atomically; header (metadata, all strings):
  format          "spotlight-attn/head-budgets"
  format_version  "1"
  model           JSON: the geometry it was measured on (the fields hasher files check)
  identity        JSON: the model's weight fingerprint (identity.py), or null
  selector        JSON: {"method": ..., and "hasher" (sha256 of a learned hasher's tensors) or
                  "bits"/"seed" (SimHash)}: whose selection the curves measure
  calibration     JSON: free-form (data, contexts, chunks, steps, dense layers)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spotlight_attn.config import Budget, Method, SpotlightConfig
from spotlight_attn.errors import CheckpointError, HasherMismatchError, SpotlightError
from spotlight_attn.hashing.checkpoint import CHECKED_FIELDS, atomic_write, check_geometry, read_metadata
from spotlight_attn.identity import TOLERANCE, identity_difference, model_identity

FORMAT = "spotlight-attn/head-budgets"
FORMAT_VERSION = "1"
FLOOR = 0.25  # every head reads at least this times the budget
CAP = 4.0  # and at most this times it (the index buffer's width grows with the largest head's share)


def hasher_digest(hasher) -> str:
    """sha256 of a learned hasher's tensors (state_dict order, float32 bytes): which hash a profile measured."""
    digest = hashlib.sha256()
    for name, tensor in hasher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def selector_key(config: SpotlightConfig, hasher=None) -> dict:
    """What a profile's curves depend on besides the model: the method, and its hash."""
    key = {"method": config.method.value}
    if config.method is Method.LINEAR:
        key.update(bits=config.bits, seed=config.seed)
    elif config.method is Method.SPOTLIGHT:
        if hasher is None:
            raise HasherMismatchError("method 'spotlight' needs its hasher to match a head budget profile")
        key["hasher"] = hasher_digest(hasher)
    return key


def _hull(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """Upper concave hull of the points (x ascending), from (0, 0) to (1, 1)."""
    hull: list[tuple[float, float]] = []
    for p in [(0.0, 0.0)] + list(zip(xs, ys)) + [(1.0, 1.0)]:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@dataclass
class HeadBudgetProfile:
    """Mass curves per (layer, KV head): mass[l, h, j] recovered at fraction fractions[j]."""

    fractions: torch.Tensor  # [F] float64, ascending, in (0, 1)
    mass: torch.Tensor  # [L, Hkv, F] float64; NaN rows for layers not calibrated
    model: dict  # geometry (ModelGeometry.to_dict())
    selector: dict
    identity: dict | None = None
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        f, m = self.fractions, self.mass
        if f.dim() != 1 or not len(f) or m.dim() != 3 or m.shape[-1] != len(f):
            raise CheckpointError(f"head budget curves need fractions [F] and mass [L, Hkv, F], got {tuple(f.shape)} and {tuple(m.shape)}")
        if not bool(((f > 0) & (f < 1)).all()) or not bool((f[1:] > f[:-1]).all()):
            raise CheckpointError("head budget fractions must ascend strictly inside (0, 1)")
        measured = m[~m.isnan()]
        if measured.numel() and not bool(((measured >= 0) & (measured <= 1 + 1e-6)).all()):
            raise CheckpointError("head budget mass curves must lie in [0, 1]")

    @property
    def layers(self) -> list[int]:
        """The layers with curves."""
        return [i for i in range(self.mass.shape[0]) if not bool(self.mass[i].isnan().any())]

    def allocate(self, budget: float, layers: list[int], floor: float = FLOOR, cap: float = CAP) -> torch.Tensor:
        """Fractions [len(layers), Hkv] float64 for `layers`, with mean `budget`, that maximise the summed mass.

        Each head starts at floor x budget; the rest goes, piece by piece, to the hull segments of
        steepest slope (most mass per key) until the mean reaches the budget. Heads stop at cap x
        budget (and at 1)."""
        if isinstance(budget, bool) or not isinstance(budget, float) or not 0.0 <= budget <= 1.0:
            raise SpotlightError(f"head budgets split a fractional budget in [0, 1], got {budget!r}")
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise SpotlightError(f"the head budget profile has no curves for layers {missing} (it has {self.layers})")
        if not 0.0 <= floor <= 1.0 <= cap:
            raise SpotlightError(f"head budgets need 0 <= floor <= 1 <= cap, got floor {floor}, cap {cap}")
        heads = self.mass.shape[1]
        lo, hi = floor * budget, min(1.0, cap * budget)
        out = torch.full((len(layers), heads), lo, dtype=torch.float64)
        pieces = []  # (slope, cell, width) of every hull segment inside [lo, hi]
        xs = self.fractions.tolist()
        for row, layer in enumerate(layers):
            for h in range(heads):
                hull = _hull(xs, self.mass[layer, h].tolist())
                for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
                    a, b = max(x1, lo), min(x2, hi)
                    if b > a:
                        pieces.append(((y2 - y1) / (x2 - x1), row, h, b - a))
        pieces.sort(key=lambda p: -p[0])
        left = (budget - lo) * out.numel()
        i = 0
        while i < len(pieces) and left > 0:
            j = i  # pieces of one slope share what is left in proportion to their widths
            while j < len(pieces) and pieces[j][0] >= pieces[i][0] * (1 - 1e-9):
                j += 1
            group = pieces[i:j]
            total = sum(p[3] for p in group)
            share = min(1.0, left / total)
            for _, row, h, width in group:
                out[row, h] += width * share
            left -= total * share
            i = j
        return out

    def mass_at(self, fractions: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The curves read at per-head fractions [len(layers), Hkv] (linear between grid points, from
        (0, 0) to (1, 1)) -> mass [len(layers), Hkv]: what an allocation should recover on the calibration text."""
        xs = torch.cat([torch.zeros(1, dtype=torch.float64), self.fractions, torch.ones(1, dtype=torch.float64)])
        out = torch.empty(fractions.shape, dtype=torch.float64)
        for row, layer in enumerate(layers):
            ys = torch.cat([torch.zeros(self.mass.shape[1], 1, dtype=torch.float64), self.mass[layer],
                            torch.ones(self.mass.shape[1], 1, dtype=torch.float64)], dim=1)  # [Hkv, F + 2]
            x = fractions[row].to(torch.float64).clamp(0, 1)
            j = (torch.searchsorted(xs, x, right=True) - 1).clamp(0, len(xs) - 2)  # [Hkv]
            t = (x - xs[j]) / (xs[j + 1] - xs[j])
            heads = torch.arange(len(x))
            out[row] = ys[heads, j] + t * (ys[heads, j + 1] - ys[heads, j])
        return out

    def layer_budgets(self, config: SpotlightConfig, num_layers: int, heads: slice | None = None) -> dict[int, Budget]:
        """{layer: Budget with per-head fractions} for the sparse layers of `config` (its budget the
        mean); `heads`: this rank's share of the KV heads under tensor parallelism."""
        base = config.budget_spec
        if not base.is_fraction:
            raise SpotlightError(f"head budgets split a fractional budget; {config.budget!r} is a token count")
        layers = [i for i in range(num_layers) if i not in config.dense_layers]
        fractions = self.allocate(float(base.amount), layers)
        fractions = fractions if heads is None else fractions[:, heads]
        return {
            layer: Budget(base.amount, base.min_tokens, base.sink, base.window, heads=tuple(float(f) for f in row))
            for layer, row in zip(layers, fractions.tolist())
        }

    def check(self, model, geometry, config: SpotlightConfig, hasher=None, source: str = "the head budget profile") -> None:
        """Refuse a profile measured on another model, or for another method or hash than `config`'s."""
        check_geometry(self.model, geometry, source)
        actual = model_identity(model)
        if self.identity is not None and actual is not None and identity_difference(self.identity, actual) > TOLERANCE:
            raise HasherMismatchError(
                f"{source} was calibrated on another model of this geometry (identity {self.identity.get('digest')}, "
                f"this model's {actual['digest']}): calibrate one for this model with `spotlight calibrate`"
            )
        wanted = selector_key(config, hasher)
        if self.selector != wanted:
            raise HasherMismatchError(
                f"{source} measured the selection of {_describe(self.selector)}, but this setting selects with "
                f"{_describe(wanted)}: calibrate one for it with `spotlight calibrate`"
            )


def _describe(key: dict) -> str:
    if "hasher" in key:
        return f"{key['method']} (hasher sha256 {key['hasher'][:12]})"
    if "bits" in key:
        return f"{key['method']} ({key['bits']} bits, seed {key['seed']})"
    return key["method"]


def save_profile(profile: HeadBudgetProfile, path: str | os.PathLike) -> Path:
    """Write `profile` to `path` atomically (a reader sees the old file or the new one)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": json.dumps(profile.model),
        "identity": json.dumps(profile.identity),
        "selector": json.dumps(profile.selector),
        "calibration": json.dumps(profile.calibration),
    }
    tensors = {"fractions": profile.fractions.to(torch.float64).contiguous(), "mass": profile.mass.to(torch.float64).contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_profile(path: str | os.PathLike) -> HeadBudgetProfile:
    """Read and validate a profile file. Raises CheckpointError when it is missing or not one."""
    path = Path(path)
    _, fields = read_metadata(path, "head budget profile", FORMAT, FORMAT_VERSION, ("model", "identity", "selector", "calibration"))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if set(tensors) != {"fractions", "mass"}:
        raise CheckpointError(f"{path} holds tensors {sorted(tensors)}, not fractions and mass")
    fractions, mass = tensors["fractions"].to(torch.float64), tensors["mass"].to(torch.float64)
    missing = [name for name in CHECKED_FIELDS if name not in (fields["model"] or {})]
    if missing or not isinstance(fields["selector"], dict) or "method" not in fields["selector"]:
        raise CheckpointError(f"{path} has an incomplete header (model fields missing: {missing})")
    if mass.shape[:2] != (fields["model"]["num_layers"], fields["model"]["num_kv_heads"]):
        raise CheckpointError(f"{path}: mass curves {tuple(mass.shape)} do not match its model's layers and KV heads")
    return HeadBudgetProfile(fractions, mass, fields["model"], fields["selector"], fields["identity"], fields["calibration"])


def profile_from_retrieval(results: dict, geometry, selector: dict, identity: dict | None, method: str) -> HeadBudgetProfile:
    """A profile from `spotlight eval retrieval` results over a grid of fractional budgets (one
    context length, rows of one method, each with mass_layer_head)."""
    rows = sorted((r for r in results["rows"] if r["method"] == method and isinstance(r["budget"], float)), key=lambda r: r["budget"])
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) > 1:
        raise SpotlightError(f"calibrate over one context length, not {contexts}")
    if len(rows) < 2:
        raise SpotlightError(f"a head budget profile needs curves at two or more fractions; got {len(rows)} for {method}")
    fractions = torch.tensor([r["budget"] for r in rows], dtype=torch.float64)
    mass = torch.full((geometry.num_layers, geometry.num_kv_heads, len(rows)), math.nan, dtype=torch.float64)
    for j, r in enumerate(rows):
        mass[r["layers"], :, j] = torch.tensor(r["mass_layer_head"], dtype=torch.float64)
    return HeadBudgetProfile(fractions, mass, geometry.to_dict(), selector, identity, {})
