"""Typed configs. Each checks itself on construction and serialises to JSON-ready dicts."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import Enum

from spotlight_attn.errors import SpotlightError


class Method(str, Enum):
    """Which selector picks the keys a decode step reads."""

    DENSE = "dense"  # every valid key (the model's own attention, through our path)
    ORACLE = "oracle"  # exact top-k of group-summed attention probability: the upper bound
    SPOTLIGHT = "spotlight"  # learned non-linear hash codes (needs a hasher)
    LINEAR = "linear"  # SimHash: sign of seeded random projections, `bits` wide
    QUEST = "quest"  # per-page min/max key bound, `page_size` tokens a page
    STREAMING = "streaming"  # attention sinks + the most recent tokens


class Placement(str, Enum):
    """Where the learned hash sits: one per KV head for queries and keys, or a query hash per query head."""

    SHARED = "shared"
    ASYMMETRIC = "asymmetric"


@dataclass(slots=True, frozen=True)
class Budget:
    """How many cached tokens one decode step reads, per (batch row, KV head).

    `amount` is a fraction of the row's valid tokens when it is a float in [0, 1], or an absolute
    token count when it is an int >= 0. The count is then raised to `min_tokens` and capped at the
    valid tokens. The first `sink` and last `window` valid tokens are always read and count INSIDE
    the budget; when they alone exceed it, the row reads them anyway (k grows to sink + window).

    `heads`, if given, are per-KV-head fractions that replace `amount` head by head (one layer's
    share of a calibrated allocation, budgets.py); `amount` then stays the layer's nominal fraction.
    """

    amount: float | int = 0.02
    min_tokens: int = 20
    sink: int = 4
    window: int = 16
    heads: tuple[float, ...] | None = None

    def __post_init__(self):
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise SpotlightError(f"budget must be a fraction in [0, 1] or a token count, got {amount!r}")
        if isinstance(amount, float) and not (0.0 <= amount <= 1.0 and math.isfinite(amount)):
            raise SpotlightError(
                f"budget {amount!r} is out of range: a float budget is a fraction in [0, 1] "
                "(pass an int for an absolute token count)"
            )
        if isinstance(amount, int) and amount < 0:
            raise SpotlightError(f"budget {amount!r} is out of range: a token count must be >= 0")
        for name in ("min_tokens", "sink", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpotlightError(f"{name} must be an int >= 0, got {value!r}")
        if self.heads is not None:
            if not self.is_fraction:
                raise SpotlightError(f"per-head budgets need a fractional budget, not the token count {amount!r}")
            heads = tuple(self.heads)
            bad = [f for f in heads if isinstance(f, bool) or not isinstance(f, float) or not (0.0 <= f <= 1.0 and math.isfinite(f))]
            if not heads or bad:
                raise SpotlightError(f"per-head budgets must be fractions in [0, 1], one per KV head, got {self.heads!r}")
            object.__setattr__(self, "heads", heads)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.amount, float)

    def tokens_for(self, n_valid: int, head: int | None = None) -> int:
        """Tokens read by a row holding `n_valid` valid tokens (forced sink/window included); with
        per-head budgets, by KV head `head`, or by the head that reads the most when it is None."""
        if self.heads is not None:
            amounts = self.heads if head is None else (self.heads[head],)
            return max(_tokens(a, n_valid, self.min_tokens, self.sink + self.window) for a in amounts)
        return _tokens(self.amount, n_valid, self.min_tokens, self.sink + self.window)

    def head_tokens_for(self, n_valid: int, num_heads: int) -> list[int]:
        """Tokens read by each of `num_heads` KV heads of a row holding `n_valid` valid tokens."""
        if self.heads is not None and len(self.heads) != num_heads:
            raise SpotlightError(f"the budget has fractions for {len(self.heads)} KV heads, the layer {num_heads}")
        if self.heads is None:
            return [self.tokens_for(n_valid)] * num_heads
        return [self.tokens_for(n_valid, h) for h in range(num_heads)]


def _tokens(amount: float | int, n_valid: int, min_tokens: int, forced: int) -> int:
    if isinstance(amount, float):
        wanted = math.ceil(amount * n_valid - 1e-9)
    else:
        wanted = int(amount)
    wanted = max(wanted, min_tokens, min(forced, n_valid))
    return min(wanted, n_valid)


def parse_budget(text: str) -> float | int:
    """CLI form: '0.02' or '2%' is a fraction, '512' a token count."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        if any(c in text for c in ".eE"):
            return float(text)
        return int(text)
    except ValueError:
        raise SpotlightError(f"budget {text!r} is not a number: use a fraction like 0.02, '2%', or a count like 512")


@dataclass(slots=True)
class SpotlightConfig:
    """What `enable()` installs: the selector, its budget, and the layers it leaves dense."""

    method: Method | str = Method.SPOTLIGHT
    budget: float | int = 0.02
    min_tokens: int = 20
    sink: int = 4
    window: int = 16
    dense_layers: tuple[int, ...] = (0, 1)
    bits: int = 128  # LINEAR only: SimHash code length (any width >= 1)
    seed: int = 0  # LINEAR only: projection seed
    page_size: int = 16  # QUEST only
    force_reference: bool = False  # run the pure-torch reference even where a GPU kernel exists
    # generate()'s default cache after enable(): "static" (preallocated, compiled and graph-captured on
    # CUDA: the fast path), "dynamic" (leave generation_config as it is), or "auto" = static on CUDA.
    # Either way `generate(..., cache_implementation=...)` chooses per call, as in transformers.
    cache: str = "auto"
    # Over the static cache on CUDA, generate() reads its stop flag one step late (transformers'
    # DeferredStopCheck), so the device never waits for the host between steps; when EOS or a stopping
    # criterion ends generation, one extra step runs and is undone before generate() returns.
    defer_stop: bool = True
    # Sibling projections that read one input (q/k/v, gate/up) run as one GEMM over their weights stored
    # side by side (fused_projections.py): no second copy of any weight, any device.
    fuse_projections: bool = True
    # A head budget profile (budgets.py, `spotlight calibrate`): the budget is then the mean over the
    # sparse (layer, KV head) cells, shared out by their calibrated attention mass curves. None: every
    # head reads the same fraction.
    head_budgets: str | None = None

    def __post_init__(self):
        try:
            self.method = Method(self.method)
        except ValueError:
            names = ", ".join(m.value for m in Method)
            raise SpotlightError(f"unknown method {self.method!r}; choose one of: {names}") from None
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if any(i < 0 for i in self.dense_layers):
            raise SpotlightError(f"dense_layers must be layer indices >= 0, got {self.dense_layers}")
        if not isinstance(self.bits, int) or self.bits < 1:
            raise SpotlightError(f"bits must be an int >= 1, got {self.bits!r}")
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise SpotlightError(f"page_size must be an int >= 1, got {self.page_size!r}")
        if not isinstance(self.fuse_projections, bool):
            raise SpotlightError(f"fuse_projections must be True or False, got {self.fuse_projections!r}")
        if self.cache not in ("auto", "static", "dynamic"):
            raise SpotlightError(f"cache must be 'auto', 'static' or 'dynamic', got {self.cache!r}")
        self.budget_spec  # validates budget, min_tokens, sink, window
        if self.head_budgets is not None:
            if not isinstance(self.head_budgets, (str, os.PathLike)):
                raise SpotlightError(f"head_budgets must be the path of a head budget profile, got {self.head_budgets!r}")
            self.head_budgets = os.fspath(self.head_budgets)
            if not self.budget_spec.is_fraction:
                raise SpotlightError(f"head_budgets split a fractional budget; {self.budget!r} is a token count")

    @property
    def budget_spec(self) -> Budget:
        return Budget(self.budget, self.min_tokens, self.sink, self.window)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        out["dense_layers"] = list(self.dense_layers)
        return out


@dataclass(slots=True)
class HasherConfig:
    """Shape of a learned hash: a residual MLP stack per head, then a projection to `bits` signs."""

    bits: int = 128
    depth: int = 2  # residual blocks x + W2 silu(W1 x)
    width: int = 128  # hidden width of each block
    placement: Placement | str = Placement.SHARED
    init_scale: float = 0.02  # std of the block weights: small, so an untrained hash is close to SimHash

    def __post_init__(self):
        if not isinstance(self.bits, int) or self.bits % 32 or not 32 <= self.bits <= 256:
            raise SpotlightError(f"bits must be a multiple of 32 from 32 to 256, got {self.bits!r}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise SpotlightError(f"depth must be an int >= 0, got {self.depth!r}")
        if not isinstance(self.width, int) or self.width < 1:
            raise SpotlightError(f"width must be an int >= 1, got {self.width!r}")
        try:
            self.placement = Placement(self.placement)
        except ValueError:
            raise SpotlightError(
                f"unknown placement {self.placement!r}; choose 'shared' or 'asymmetric'"
            ) from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["placement"] = self.placement.value
        return out


@dataclass(slots=True)
class PairSampling:
    """How many queries / keys one loss evaluation samples, and how pairs are weighted."""

    num_queries: int = 256
    num_top: int = 64
    num_other: int = 64
    num_hard: int = 32  # of num_other, drawn from just below the top-k boundary
    num_hard_top: int = 0  # of num_top, drawn from just above it (the lower half of the true set)
    min_position: int = 64  # sampled queries see at least this many keys
    include_forced: bool = False  # rank the always-read sink/window keys too
    mass_weight: float = 0.0  # lambda: 0 = every pair counts the same, 1 = pairs weighted by mass lost
    logit_scale: float = 1.0  # multiplies draft differences inside the BCE
    straight_through: bool = False  # hard sign codes forward, soft-sign gradient backward
    gain: float = 64.0  # soft sign s = g h / (1 + |g h|)
    listwise: float = 0.0  # weight of the listwise loss (KL from the attention to the draft's softmax): 0 = pairs only, 1 = list only
    list_scale: float = 2.0  # the draft's softmax is over list_scale * (draft standardised per query); 2 beat 4 (docs/TRAINING.md)
    list_power: float = 1.0  # the listwise target is the attention raised to this power, renormalised: < 1 flattens it

    def __post_init__(self):
        if self.num_hard > self.num_other:
            raise ValueError(f"num_hard ({self.num_hard}) must be <= num_other ({self.num_other})")
        if self.num_hard_top > self.num_top:
            raise ValueError(f"num_hard_top ({self.num_hard_top}) must be <= num_top ({self.num_top})")
        if not 0.0 <= self.mass_weight <= 1.0:
            raise ValueError(f"mass_weight must be in [0, 1], got {self.mass_weight}")
        if not 0.0 <= self.listwise <= 1.0:
            raise ValueError(f"listwise must be in [0, 1], got {self.listwise}")
        if not self.list_scale > 0:
            raise ValueError(f"list_scale must be > 0, got {self.list_scale}")
        if not self.list_power > 0:
            raise ValueError(f"list_power must be > 0, got {self.list_power}")


@dataclass(slots=True)
class TrainConfig:
    """Everything that decides the trained weights (stored in the checkpoint header)."""

    bits: int = 128
    placement: str = "shared"
    depth: int = 2
    width: int = 64  # = head_dim of SmolLM2: keeps the shipped 28-layer hasher under 5 MB in float16
    budget: float = 0.1  # training budget: the true set is what the oracle reads at this fraction
    min_tokens: int = 20
    sink: int = 4
    window: int = 16
    dense_layers: tuple[int, ...] = (0, 1)
    steps: int = 300  # optimiser steps per layer in all, spread evenly over the batches (at least one each)
    batch_chunks: int = 1  # chunks per frozen forward and optimiser step (under torchrun: split over the ranks)
    epochs: int = 1  # passes over the chunks, each in a fresh seeded order
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    warmup: float = 0.01  # fraction of the steps (at least one step)
    clip: float = 1.0
    seed: int = 0
    sampling: PairSampling = field(default_factory=PairSampling)

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = PairSampling(**self.sampling)
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch_chunks", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpotlightError(f"{name} must be an int >= 1, got {value!r}")
        self.hasher_config  # validates bits / placement / depth / width
        self.budget_spec  # validates the budget

    @property
    def hasher_config(self) -> HasherConfig:
        return HasherConfig(bits=self.bits, depth=self.depth, width=self.width, placement=self.placement)

    @property
    def budget_spec(self) -> Budget:
        return Budget(self.budget, self.min_tokens, self.sink, self.window)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["dense_layers"], out["betas"] = list(self.dense_layers), list(self.betas)
        return out
