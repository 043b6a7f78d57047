"""sparse_decode: exact softmax attention of one query token over the selected K/V rows.

Each query head reads the rows its KV head selected (indices [B, Hkv, k], -1 = unused slot).
A row with no selected key gets an all-zero output.
"""

from __future__ import annotations

import torch


def sparse_decode_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Pure-torch reference (gather, then softmax attention in float32).

    query [B, Hq, 1, D], keys/values [B, Hkv, T, D], indices [B, Hkv, k] int64 -> out [B, Hq, 1, D] in query.dtype.
    """
    b, hq, _, d = query.shape
    hkv, k = keys.shape[1], indices.shape[-1]
    group = hq // hkv
    used = indices >= 0  # [B, Hkv, k]
    rows = indices.clamp(min=0)[..., None].expand(b, hkv, k, d)
    k_sel = keys.gather(2, rows).float()  # [B, Hkv, k, D]
    v_sel = values.gather(2, rows).float()
    q = query.reshape(b, hkv, group, d).float()  # [B, Hkv, G, D]
    logits = (q @ k_sel.transpose(-1, -2)) * scaling  # [B, Hkv, G, k]
    logits = logits.masked_fill(~used[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing selected -> 0
    out = probs @ v_sel  # [B, Hkv, G, D]
    return out.reshape(b, hq, 1, d).to(query.dtype)


def sparse_decode(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention over selected rows. Shapes as in sparse_decode_reference."""
    return sparse_decode_reference(query, keys, values, indices, scaling)
