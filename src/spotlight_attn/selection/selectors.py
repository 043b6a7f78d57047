"""Selectors: for one layer at one decode step, which cached positions each KV head reads.

    select(query [B, Hq, 1, D], layer: SpotlightLayer, budget: Budget, scaling) -> indices [B, Hkv, k] int64

All of them run through selection/topk.py's rules (budget, sink, window, padding, ties), so they
differ only in how they score a key:
- Dense: reads every valid key (budget ignored).
- Oracle: group sum of softmax(q.k * scaling) over valid keys: the exact attention mass, the upper bound.
- Hash (spotlight / linear): group sum of agreeing code bits (see kernels/score_select.py).
- Quest: each token scores its page's bound sum_g sum_d max(q_d min_d, q_d max_d); a page is
  `page_size` consecutive valid tokens (see cache.py).
- Streaming: every key scores 0, so the sinks and the most recent tokens fill the budget.
"""

from __future__ import annotations

import torch

from spotlight_attn.cache import KeyHasher, SpotlightLayer
from spotlight_attn.config import Budget, Method
from spotlight_attn.kernels.score_select import hamming_scores, score_select
from spotlight_attn.selection.topk import select_topk


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """query [B, Hq, 1, D] -> [B, Hkv, G, D] float32 (query head j belongs to KV head j // G)."""
    b, hq, _, d = query.shape
    return query.reshape(b, num_kv_heads, hq // num_kv_heads, d).float()


class Selector:
    """Base: score every cached key, then apply the shared top-k rules."""

    method: Method

    def key_index(self, layer_idx: int) -> tuple[KeyHasher | None, int | None]:
        """What the cache keeps for this layer: (key hasher or None, Quest page size or None)."""
        return None, None

    def scores(self, query: torch.Tensor, layer: SpotlightLayer, scaling: float) -> torch.Tensor:
        """query [B, Hq, 1, D] -> per-key scores [B, Hkv, T] (higher = read first)."""
        raise NotImplementedError

    def select(self, query, layer: SpotlightLayer, budget: Budget, scaling: float) -> torch.Tensor:
        return select_topk(self.scores(query, layer, scaling), layer.key_valid, budget)


class DenseSelector(Selector):
    method = Method.DENSE

    def scores(self, query, layer, scaling):
        b, hkv, t, _ = layer.keys.shape
        return torch.zeros(b, hkv, t, dtype=torch.int32, device=layer.keys.device)

    def select(self, query, layer, budget, scaling):
        return super().select(query, layer, Budget(1.0, 0, 0, 0), scaling)


class OracleSelector(Selector):
    method = Method.ORACLE

    def scores(self, query, layer, scaling):
        q = _group_queries(query, layer.keys.shape[1])  # [B, Hkv, G, D]
        logits = (q @ layer.keys.float().transpose(-1, -2)) * scaling  # [B, Hkv, G, T]
        logits = logits.masked_fill(~layer.key_valid[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hkv, T]


class HashSelector(Selector):
    """Spotlight (learned MLPHasher) or LinearHash (SimHash LinearHasher): the same scoring on codes."""

    def __init__(self, hasher, method: Method, force_reference: bool = False):
        self.hasher = hasher
        self.method = method
        self.force_reference = force_reference  # skip the GPU kernel (debugging)

    def key_index(self, layer_idx):
        return (lambda keys: self.hasher.key_codes(layer_idx, keys)), None

    def scores(self, query, layer, scaling):
        return hamming_scores(self.hasher.query_codes(layer.layer_idx, query), layer.codes, self.hasher.bits)

    def select(self, query, layer, budget, scaling):
        query_codes = self.hasher.query_codes(layer.layer_idx, query)  # [B, Hq, 1, W]
        return score_select(
            query_codes, layer.codes, layer.key_valid, budget, self.hasher.bits, force_reference=self.force_reference
        )


class QuestSelector(Selector):
    method = Method.QUEST

    def __init__(self, page_size: int):
        self.page_size = page_size

    def key_index(self, layer_idx):
        return None, self.page_size

    def scores(self, query, layer, scaling):
        q = _group_queries(query, layer.keys.shape[1])[:, :, :, None, :]  # [B, Hkv, G, 1, D]
        lo, hi = layer.page_min.float()[:, :, None], layer.page_max.float()[:, :, None]  # [B, Hkv, 1, P, D]
        bound = torch.maximum(q * lo, q * hi).sum(-1).sum(2)  # [B, Hkv, P]; empty pages are inf/nan, never read
        page = layer.page_of_token()[:, None, :].expand(-1, bound.shape[1], -1)  # [B, Hkv, T]
        return bound.gather(2, page)  # [B, Hkv, T]: each token scores its page's bound


class StreamingSelector(Selector):
    method = Method.STREAMING

    def scores(self, query, layer, scaling):
        b, hkv, t, _ = layer.keys.shape
        return torch.zeros(b, hkv, t, dtype=torch.int32, device=layer.keys.device)
