"""The decode step's kernels as registered torch custom ops, so torch.compile and CUDA graphs take them.

A decode step over the static cache (static_cache.py) calls these; each has a fake (meta)
implementation for tracing and one real implementation for every device: on CUDA tensors the Triton
kernel (or flash-attention), elsewhere the pure-torch reference (or the Triton interpreter when
`use_kernel` asks for it, as the tests do). Nothing in them reads the device from the host, and their
outputs have shapes fixed by their arguments, so a whole decode step can be captured in one graph.

    spotlight::score_select(query_codes, key_codes, bounds, k, bits, sink, window, guess!, use_kernel) -> indices
    spotlight::sparse_decode(query, keys, values, indices, scaling, use_kernel) -> out
    spotlight::dense_decode(query, keys_by_token, values_by_token, lengths, cu_k, scaling) -> out
    spotlight::hash_codes(x, w1, b1, w2, b2, proj, use_kernel) -> codes (kernels/hash.py)
    spotlight::step_hash_codes(query, keys_by_token, lengths, codes!, w1, b1, w2, b2, proj, use_kernel) -> query codes
"""

from __future__ import annotations

import logging

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels import _triton

logger = logging.getLogger(__name__)
_FUSED_HASH_FAILED: list[str] = []  # the first failure of the fused hash on this process's GPU, if any


def _use(tensors, use_kernel: int) -> bool:
    """use_kernel: -1 = the device decides (kernel on CUDA), 0 = reference, 1 = kernel (interpreter on CPU)."""
    return _triton.use_kernel(tensors, None if use_kernel < 0 else bool(use_kernel))


@torch.library.custom_op("spotlight::score_select", mutates_args=("guess",))
def score_select_op(
    query_codes: torch.Tensor, key_codes: torch.Tensor, bounds: torch.Tensor, k: int, bits: int, sink: int, window: int,
    guess: torch.Tensor, use_kernel: int = -1,
) -> torch.Tensor:
    """query_codes [B, Hq, 1, W] or grouped [B, Hkv, G, W] int32 (read in place: any strides but the
    last), key_codes [B, Hkv, T, W] int32, bounds [B, 3] or per KV head [B, Hkv, 3] int32 (valid run
    start, end, keys to read: kernels/score_select.plan_from_lengths) -> indices [B, Hkv, k] int64, -1 tails.
    guess [B, Hkv] float32: the kernel's per-row threshold prediction, updated in place
    (score_select.new_guess; bins as SPOTLIGHT_SELECT_GUESS says), or an empty tensor for none; the
    reference ignores it. The picks do not depend on it. (A tensor, never None: torch 2.11's in-place
    bookkeeping of custom ops indexes past the arguments for a mutated optional left at None.)"""
    from spotlight_attn.kernels.score_select import (
        GUESS_BINS_IN_CACHE, SelectPlan, _score_select_triton, kernel_serves, query_group,
    )

    budget = Budget(0, min_tokens=0, sink=sink, window=window)
    group = query_group(query_codes, key_codes.shape[1])
    if _use((query_codes, key_codes, bounds), use_kernel) and kernel_serves(group, bits):
        plan = SelectPlan(budget, k, (k,) * bounds.shape[0], bounds, True)
        return _score_select_triton(query_codes, key_codes, plan, bits, guess=guess if guess.numel() else None,
                                    guess_bins=GUESS_BINS_IN_CACHE)
    return _score_select_rows_reference(query_codes, key_codes, bounds, k, bits, budget)


def _score_select_rows_reference(query_codes, key_codes, bounds, k, bits, budget: Budget) -> torch.Tensor:
    """The reference, row by row: row b (head h) reads bounds[b, (h,) 2] keys of its valid run, padded
    to k with -1."""
    from spotlight_attn.kernels.score_select import hamming_scores
    from spotlight_attn.selection.topk import select_topk

    b, hkv, t = key_codes.shape[0], key_codes.shape[1], key_codes.shape[2]
    out = torch.full((b, hkv, k), -1, dtype=torch.int64, device=key_codes.device)
    scores = hamming_scores(query_codes, key_codes, bits)  # [B, Hkv, T]
    positions = torch.arange(t, device=key_codes.device)
    per_head = bounds.reshape(b, -1, 3).tolist()  # [B, 1 or Hkv, 3]
    for row in range(b):
        for h, (start, end, k_row) in enumerate(per_head[row]):
            heads = slice(h, h + 1) if len(per_head[row]) > 1 else slice(None)
            valid = ((positions >= start) & (positions < end))[None]  # [1, T]
            row_budget = Budget(int(k_row), min_tokens=0, sink=budget.sink, window=budget.window)
            picked = select_topk(scores[row : row + 1, heads], valid, row_budget)[0]  # [heads, k_row]
            out[row, heads, : picked.shape[-1]] = picked
    return out


@score_select_op.register_fake
def _(query_codes, key_codes, bounds, k, bits, sink, window, guess, use_kernel=-1):
    return key_codes.new_empty((key_codes.shape[0], key_codes.shape[1], k), dtype=torch.int64)


@torch.library.custom_op("spotlight::sparse_decode", mutates_args=())
def sparse_decode_op(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scaling: float,
    use_kernel: int = -1,
) -> torch.Tensor:
    """query [B, Hq, 1, D], keys/values [B, Hkv, T, D] (any strides, last dim contiguous), indices
    [B, Hkv, k] int64 (-1 = unused) -> attention over the selected rows [B, Hq, 1, D]."""
    from spotlight_attn.kernels.sparse_decode import _sparse_decode_triton, sparse_decode_reference

    if _use((query, keys, values, indices), use_kernel):
        return _sparse_decode_triton(query, keys, values, indices, scaling)
    return sparse_decode_reference(query, keys, values, indices, scaling)


@sparse_decode_op.register_fake
def _(query, keys, values, indices, scaling, use_kernel=-1):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op("spotlight::dense_decode", mutates_args=())
def dense_decode_op(
    query: torch.Tensor, keys_by_token: torch.Tensor, values_by_token: torch.Tensor, lengths: torch.Tensor,
    cu_k: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """One query token per row over every held key: query [B, Hq, 1, D], keys/values by token
    [B, T, Hkv, D], lengths [B] (keys held per row: positions [0, lengths[b])), cu_k [B + 1] int32
    (= arange(B + 1) * T) -> [B, Hq, 1, D]. Flash-attention's varlen kernel where it runs (no mask,
    no host read), else SDPA with a padding mask."""
    from spotlight_attn.kernels.dense import dense_decode

    return dense_decode(query, keys_by_token, values_by_token, lengths, cu_k, scaling)


@dense_decode_op.register_fake
def _(query, keys_by_token, values_by_token, lengths, cu_k, scaling):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op("spotlight::hash_codes", mutates_args=())
def hash_codes_op(
    x: torch.Tensor, w1: torch.Tensor | None, b1: torch.Tensor | None, w2: torch.Tensor | None,
    b2: torch.Tensor | None, proj: torch.Tensor, use_kernel: int = -1,
) -> torch.Tensor:
    """Heads-first rows x [n, M, D] through a hash bank (w1 None: SimHash, the projection alone) ->
    packed codes [n, M, W] int32. On CUDA (use_kernel -1) the fused kernel where it serves the shapes;
    should it fail to build on this GPU, the torch path takes over for the process, with a warning."""
    from spotlight_attn.kernels.hash import _hash_codes_triton, hash_codes_reference, serves

    args = (x, w1, b1, w2, b2, proj)
    if use_kernel == 1:
        return _hash_codes_triton(*args)
    if use_kernel < 0 and not _FUSED_HASH_FAILED and _use((x, proj), use_kernel) and serves(x, w1, proj):
        try:
            return _hash_codes_triton(*args)
        except Exception as error:  # a Triton build failure on an untested GPU must not stop decoding
            _FUSED_HASH_FAILED.append(repr(error))
            logger.warning("the fused hash kernel failed on this GPU (%r); hashing through torch from now on", error)
    return hash_codes_reference(*args)


@hash_codes_op.register_fake
def _(x, w1, b1, w2, b2, proj, use_kernel=-1):
    return x.new_empty((x.shape[0], x.shape[1], (proj.shape[-1] + 31) // 32), dtype=torch.int32)


@torch.library.custom_op("spotlight::step_hash_codes", mutates_args=("codes",))
def step_hash_codes_op(
    query: torch.Tensor, keys_by_token: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor,
    w1: torch.Tensor | None, b1: torch.Tensor | None, w2: torch.Tensor | None, b2: torch.Tensor | None,
    proj: torch.Tensor, use_kernel: int = -1,
) -> torch.Tensor:
    """A decode step's hash with one bank for queries and keys: query [B, Hq, 1, D], the cache's keys
    [B, T, Hkv, D] (the step's new key already written at lengths[b] - 1), lengths [B], the code cache
    [B, Hkv, T, W] int32 -> query codes [B, Hkv, G, W] int32; the new keys' codes go into `codes` at
    lengths[b] - 1. One launch of the fused kernel on CUDA (kernels/hash.py, STEP), which reads the
    queries and keys in place; it falls back to torch as hash_codes does."""
    from spotlight_attn.kernels.hash import _step_hash_codes_triton, step_hash_codes_reference, step_serves

    args = (query, keys_by_token, lengths, codes, w1, b1, w2, b2, proj)
    if use_kernel == 1:
        return _step_hash_codes_triton(*args)
    if (use_kernel < 0 and not _FUSED_HASH_FAILED and _use((query, proj), use_kernel)
            and step_serves(query, keys_by_token, w1, proj)):
        try:
            return _step_hash_codes_triton(*args)
        except Exception as error:  # as in hash_codes_op
            _FUSED_HASH_FAILED.append(repr(error))
            logger.warning("the fused hash kernel failed on this GPU (%r); hashing through torch from now on", error)
    return step_hash_codes_reference(*args)


@step_hash_codes_op.register_fake
def _(query, keys_by_token, lengths, codes, w1, b1, w2, b2, proj, use_kernel=-1):
    b, hq, hkv = query.shape[0], query.shape[1], keys_by_token.shape[2]
    return query.new_empty((b, hkv, hq // hkv, codes.shape[-1]), dtype=torch.int32)
