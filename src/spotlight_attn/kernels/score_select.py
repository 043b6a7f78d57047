"""score_select: query codes + key codes -> the top-k positions per (batch row, KV head).

Score of key t for KV head h = sum over the G query heads g of h of (bits - popcount(q[g] XOR k[h, t])),
an integer in [0, G * bits]. Selection follows selection/topk.py exactly (budget, sink, window,
padding, ties to the more recent token).
"""

from __future__ import annotations

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.pack import popcount
from spotlight_attn.selection.topk import select_topk


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """query_codes [B, Hq, 1, W] int32, key_codes [B, Hkv, T, W] int32 -> scores [B, Hkv, T] int32."""
    b, hq, _, w = query_codes.shape
    hkv = key_codes.shape[1]
    group = hq // hkv
    q = query_codes.reshape(b, hkv, group, 1, w)  # [B, Hkv, G, 1, W]
    differing = popcount(torch.bitwise_xor(q, key_codes[:, :, None]))  # [B, Hkv, G, T]
    return (group * bits - differing.sum(2)).to(torch.int32)  # [B, Hkv, T]


def score_select_reference(
    query_codes: torch.Tensor, key_codes: torch.Tensor, key_valid: torch.Tensor, budget: Budget, bits: int
) -> torch.Tensor:
    """Pure-torch reference. key_valid [B, T] bool -> indices [B, Hkv, k] int64, -1 where unused."""
    return select_topk(hamming_scores(query_codes, key_codes, bits), key_valid, budget)


def score_select(
    query_codes: torch.Tensor, key_codes: torch.Tensor, key_valid: torch.Tensor, budget: Budget, bits: int
) -> torch.Tensor:
    """Top-k by summed Hamming agreement. Shapes as in score_select_reference."""
    return score_select_reference(query_codes, key_codes, key_valid, budget, bits)
