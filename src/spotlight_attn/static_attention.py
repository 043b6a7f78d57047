"""Attention over the static cache (static_cache.py): the fast generate() path.

- Prefill (query length > 1, eager): dense, causal, over each row's held keys (kernels/dense.py:
  flash varlen on CUDA, no [S, T] mask); the keys were hashed as the layer wrote them.
- Decode (query length 1): a dense layer reads every held key (flash varlen with per-row lengths);
  a hash layer hashes the query and the new key in one pass (one launch on CUDA, which reads them
  in place and writes the key's codes into the cache), selects
  a fixed-width index buffer (score_select, -1 padding; the bounds come from the step's plan, made
  once on the device at layer 0 from the row lengths) and attends over it (sparse_decode). The
  kernels are registered custom ops (kernels/ops.py), nothing reads the device from the host, and
  every shape is fixed by the cache: the step compiles with fullgraph=True and replays as a CUDA graph.
"""

from __future__ import annotations

import torch

from spotlight_attn.config import Method
from spotlight_attn.kernels import ops
from spotlight_attn.kernels.dense import dense_prefill
from spotlight_attn.kernels.score_select import device_head_tokens, device_tokens_for

# Methods the static cache serves; the others (oracle, quest, streaming) decode over the dynamic cache.
STATIC_METHODS = (Method.DENSE, Method.SPOTLIGHT, Method.LINEAR)


def static_attention(installed, cache, layer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """query [B, Hq, S, D] (post-RoPE), after layer.update -> [B, S, Hq, D]."""
    if query.shape[2] > 1:
        return dense_prefill(query, layer.k_by_token, layer.v_by_token, cache.seq.new_valid, layer.lengths, scaling)
    config = installed.config
    budget = config.budget_spec  # sink, window, min_tokens; the keys each row reads come from the step's plan
    if layer.layer_idx == 0:
        _plan_step(cache, layer, budget)
    if layer.key_hasher is None:  # a dense layer, or method dense
        out = ops.dense_decode_op(query, layer.k_by_token, layer.v_by_token, layer.lengths, layer.cu_k, scaling)
        return out.transpose(1, 2)
    hasher = installed.selector.hasher
    use_kernel = 0 if config.force_reference else -1
    if layer.defers_codes(1):  # the new key's codes come with the query's, from one pass of the hash
        query_codes = hasher.fused_step_codes(layer.layer_idx, query, layer.k_by_token, layer.lengths, layer.codes)
        if query_codes is None:  # no fused kernel here: the same pass through torch, then the codes' write
            query_codes, key_codes = hasher.step_codes(layer.layer_idx, query, layer.newest_keys(), grouped=True)
            layer.write_newest_codes(key_codes)
    else:
        query_codes = hasher.query_codes(layer.layer_idx, query)  # [B, Hq, 1, W]
    plan = cache.layers[0]
    bounds = plan.bounds if plan.head_bounds is None else plan.head_bounds[layer.layer_idx]  # [B, 3] or [B, Hkv, 3]
    indices = ops.score_select_op(
        query_codes, layer.codes, bounds, cache.k, hasher.bits, budget.sink, budget.window, layer.select_guess, use_kernel
    )  # [B, Hkv, k]; query codes [B, Hq, 1, W] or, from step_codes, [B, Hkv, G, W], read in place
    keys, values = layer.k_by_token.transpose(1, 2), layer.v_by_token.transpose(1, 2)  # [B, Hkv, T, D] (see update)
    out = ops.sparse_decode_op(query, keys, values, indices, scaling, use_kernel)  # [B, Hq, 1, D]
    return out.transpose(1, 2)


def _plan_step(cache, layer, budget) -> None:
    """What every layer of a decode step shares, made once, at layer 0 (after its update; every layer
    holds the same keys):
    - the selection bounds (start 0, end = lengths, keys to read) into layer 0's `bounds`, which
      every hash layer passes to score_select; with head budgets, every layer's per-head bounds into
      layer 0's `head_bounds` at once;
    - the keys read and held over all layers, added to cache.read / cache.cached: a hash layer reads
      device_tokens_for of the held keys, a dense layer all.
    Made per layer instead, these cost a launch and two reductions per layer per step."""
    hkv = layer.k_by_token.shape[2]
    lengths = layer.lengths
    held = lengths.sum() * hkv
    n_layers, n_hash = len(cache.layers), cache.hash_layers
    read = held * (n_layers - n_hash)
    if n_hash and layer.head_bounds is not None:
        k_heads = device_head_tokens(lengths, layer.head_fractions, budget)  # [L, B, Hkv]
        ends = lengths[None, :, None].expand_as(k_heads)
        layer.head_bounds.copy_(torch.stack([torch.zeros_like(k_heads), ends, k_heads], dim=-1))
        read = read + k_heads[cache.hash_layer_indices].sum()
    elif n_hash:
        k_rows = device_tokens_for(lengths, budget)  # [B]
        layer.bounds.copy_(torch.stack([torch.zeros_like(k_rows), lengths, k_rows], dim=1))
        read = read + k_rows.sum() * hkv * n_hash
    cache.read.add_(read)
    cache.cached.add_(held * n_layers)
