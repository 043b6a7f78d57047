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

Scoring is defined for many query rows at once (`scores_rows`): row s of query [B, Hq, S, D] sees
the keys where row_valid[b, s] is True, its causal past. A decode step is the case S = 1 with
row_valid = key_valid; teacher-forced evaluation (attention.teacher_forcing) scores every position
of a text in one forward pass with the same code, so both modes select alike.
"""

from __future__ import annotations

import torch

from spotlight_attn.cache import KeyHasher, SpotlightLayer
from spotlight_attn.config import Budget, Method
from spotlight_attn.errors import SpotlightError
from spotlight_attn.kernels.pack import unpack_bits
from spotlight_attn.kernels.score_select import hamming_scores, score_select
from spotlight_attn.selection.topk import select_topk


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """query [B, Hq, S, D] -> [B, Hkv, G, S, D] float32 (query head j belongs to KV head j // G)."""
    b, hq, s, d = query.shape
    return query.reshape(b, num_kv_heads, hq // num_kv_heads, s, d).float()


def _zeros(layer: SpotlightLayer, rows: int) -> torch.Tensor:
    b, hkv, t, _ = layer.keys.shape
    return torch.zeros(b, hkv, rows, t, dtype=torch.int32, device=layer.keys.device)


class Selector:
    """Base: score every cached key, then apply the shared top-k rules."""

    method: Method

    def key_index(self, layer_idx: int) -> tuple[KeyHasher | None, int | None]:
        """What the cache keeps for this layer: (key hasher or None, Quest page size or None)."""
        return None, None

    def scores_rows(self, query: torch.Tensor, layer: SpotlightLayer, scaling: float, row_valid: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, S, D], row_valid [B, S, T] bool -> per-key scores [B, Hkv, S, T] (higher = read first).
        Scores of keys outside a row's row_valid are arbitrary: the top-k rules never pick them."""
        raise NotImplementedError

    def scores(self, query: torch.Tensor, layer: SpotlightLayer, scaling: float) -> torch.Tensor:
        """query [B, Hq, 1, D] -> per-key scores [B, Hkv, T]: one decode step over every valid key."""
        return self.scores_rows(query, layer, scaling, layer.key_valid[:, None, :])[:, :, 0]

    def select(self, query, layer: SpotlightLayer, budget: Budget, scaling: float) -> torch.Tensor:
        return select_topk(self.scores(query, layer, scaling), layer.key_valid, budget)


class DenseSelector(Selector):
    method = Method.DENSE

    def scores_rows(self, query, layer, scaling, row_valid):
        return _zeros(layer, query.shape[2])

    def select(self, query, layer, budget, scaling):
        return super().select(query, layer, Budget(1.0, 0, 0, 0), scaling)


class OracleSelector(Selector):
    method = Method.ORACLE

    def scores_rows(self, query, layer, scaling, row_valid):
        q = _group_queries(query, layer.keys.shape[1])  # [B, Hkv, G, S, D]
        logits = (q @ layer.keys.float()[:, :, None].transpose(-1, -2)) * scaling  # [B, Hkv, G, S, T]
        logits = logits.masked_fill(~row_valid[:, None, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hkv, S, T]


class HashSelector(Selector):
    """Spotlight (learned MLPHasher) or LinearHash (SimHash LinearHasher): the same scoring on codes."""

    def __init__(self, hasher, method: Method, force_reference: bool = False):
        self.hasher = hasher
        self.method = method
        self.force_reference = force_reference  # skip the GPU kernel (debugging)

    def key_index(self, layer_idx):
        return (lambda keys: self.hasher.key_codes(layer_idx, keys)), None

    def scores_rows(self, query, layer, scaling, row_valid):
        codes = self.hasher.query_codes(layer.layer_idx, query)  # [B, Hq, S, W]
        if query.shape[2] == 1:  # a decode step: popcount of XOR, as the kernel does
            return hamming_scores(codes, layer.codes, self.hasher.bits)[:, :, None]
        # Many rows: agreeing bits of +-1 codes are (bits + q.k) / 2, so the group sum is one matmul,
        # exact in float32 (every partial sum is an integer below 2**24).
        bits = self.hasher.bits
        group = codes.shape[1] // layer.codes.shape[1]
        dot = self.group_dot(unpack_bits(codes, bits).float() * 2 - 1, layer)
        return ((dot + group * bits) / 2).round().to(torch.int32)  # [B, Hkv, S, T]

    def group_dot(self, query_bits: torch.Tensor, layer: SpotlightLayer) -> torch.Tensor:
        """query_bits [B, Hq, S, bits] float -> sum over each GQA group of query_bits . (+-1 key codes): [B, Hkv, S, T]."""
        hkv = layer.codes.shape[1]
        q = query_bits.unflatten(1, (hkv, -1)).sum(2)  # [B, Hkv, S, bits]: the group's sum
        k = unpack_bits(layer.codes, self.hasher.bits).float() * 2 - 1  # [B, Hkv, T, bits]
        return q @ k.transpose(-1, -2)

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

    def scores_rows(self, query, layer, scaling, row_valid):
        q = _group_queries(query, layer.keys.shape[1])  # [B, Hkv, G, S, D]
        # max(q*lo, q*hi) summed over d = relu(q).hi - relu(-q).lo: two matmuls instead of a [.., P, D] tensor.
        up, down = q.clamp(min=0), q.clamp(max=0)
        lo, hi = layer.page_min.float()[:, :, None], layer.page_max.float()[:, :, None]  # [B, Hkv, 1, P, D]
        bound = (up @ hi.transpose(-1, -2) + down @ lo.transpose(-1, -2)).sum(2)  # [B, Hkv, S, P]; empty pages never read
        page = layer.page_of_token()  # [B, T]
        if not torch.equal(row_valid.sum(-1), layer.key_valid.sum(-1, keepdim=True).expand_as(row_valid[..., 0])):
            bound = self._prefix_page_bound(q, up, down, layer, row_valid, page, bound)
        index = page[:, None, None, :].expand(-1, bound.shape[1], bound.shape[2], -1)  # [B, Hkv, S, T]
        return bound.gather(3, index)  # each token scores its page's bound

    def _prefix_page_bound(self, q, up, down, layer, row_valid, page, bound):
        """Rows that do not see the whole cache (teacher forcing): their last page holds future keys, so
        its bound is taken over the keys of that page the row sees (what a decode step at that
        position would hold), from running min / max within each page."""
        b, hkv, t, d = layer.keys.shape
        if not bool(layer.key_valid.all()):
            raise SpotlightError("quest scores rows with a causal past only on unpadded rows (attention_mask all ones)")
        size = self.page_size
        pages = -(-t // size)
        keys = torch.nn.functional.pad(layer.keys.float(), (0, 0, 0, pages * size - t))  # [B, Hkv, pages*size, D]
        paged = keys.unflatten(2, (pages, size))
        run_min = paged.cummin(3).values.flatten(2, 3)[:, :, :t]  # [B, Hkv, T, D]: min over its page up to t
        run_max = paged.cummax(3).values.flatten(2, 3)[:, :, :t]
        last = row_valid.sum(-1) - 1  # [B, S] each row's position
        index = last.clamp(min=0)[:, None, :, None].expand(-1, hkv, -1, d)  # [B, Hkv, S, D]
        lo, hi = run_min.gather(2, index)[:, :, None], run_max.gather(2, index)[:, :, None]  # [B, Hkv, 1, S, D]
        own = (up * hi + down * lo).sum(-1).sum(2)  # [B, Hkv, S]: the bound of each row's own page
        own_page = page.gather(1, last.clamp(min=0))[:, None, :, None].expand(-1, hkv, -1, 1)  # [B, Hkv, S, 1]
        return bound.scatter(3, own_page, own[..., None])


class StreamingSelector(Selector):
    method = Method.STREAMING

    def scores_rows(self, query, layer, scaling, row_valid):
        return _zeros(layer, query.shape[2])
