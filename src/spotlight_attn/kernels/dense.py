"""Dense attention over the static cache's token-major K/V ([B, T_max, Hkv, D]; static_cache.py).

- dense_decode: one query token per row over the keys each row holds (positions [0, lengths[b])).
  Flash-attention's variable-length kernel (torch's aten op) reads the cache as [B * T_max, Hkv, D]
  with per-row lengths on the device (`seqused_k`): no mask, no host read, nothing past a row's
  length is read. Elsewhere (CPU, fp32, GPUs before sm80): SDPA over all T_max keys with a padding
  mask, which reads the whole buffer.
- dense_prefill: the new tokens of each row (packed, padding dropped) attend causally to the row's
  keys, the new ones last. Flash varlen again (its causal mask is aligned to the end of each row,
  which is where new keys go), else SDPA row by row with an explicit [n_new, n_keys] mask. Neither
  builds a [B, 1, S, T] mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(new: int, total: int, device) -> torch.Tensor:
    """[new, total] bool: the last `new` of `total` positions each see themselves and everything before."""
    return torch.arange(total, device=device)[None, :] <= (total - new) + torch.arange(new, device=device)[:, None]


def flash_varlen_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch's flash-attention varlen op runs here (CUDA, sm80+, fp16/bf16, the op present)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scaling: float, seqused_k=None):
    """q [total_q, Hq, D], k/v [B * T_max, Hkv, D] -> [total_q, Hq, D] (torch's flash-attention op)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scaling, seqused_k=seqused_k,
    )[0]


def dense_decode(query, keys_by_token, values_by_token, lengths, cu_k, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, D], keys/values [B, T, Hkv, D], lengths [B], cu_k [B + 1] int32 -> [B, Hq, 1, D]."""
    b, hq, _, d = query.shape
    t, hkv = keys_by_token.shape[1], keys_by_token.shape[2]
    if flash_varlen_available(query.device, query.dtype):
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=query.device)  # one query token per row
        out = _flash_varlen(
            query.reshape(b, hq, d), keys_by_token.view(b * t, hkv, d), values_by_token.view(b * t, hkv, d),
            cu_q, cu_k, 1, t, False, scaling, seqused_k=lengths.to(torch.int32),
        )  # [B, Hq, D]
        return out.view(b, hq, 1, d)
    held = torch.arange(t, device=query.device)[None, :] < lengths[:, None]  # [B, T]
    return F.scaled_dot_product_attention(
        query, keys_by_token.transpose(1, 2), values_by_token.transpose(1, 2), attn_mask=held[:, None, None, :],
        scale=scaling, enable_gqa=True,
    )


def dense_prefill(query, keys_by_token, values_by_token, new_valid, lengths, scaling: float) -> torch.Tensor:
    """Causal attention of new tokens over each row's held keys (the new ones included, at the end).

    query [B, Hq, S, D] (all S positions, padding too), keys/values [B, T, Hkv, D], new_valid [B, S]
    bool (which queries are real tokens; None = all), lengths [B] keys held per row after this update
    -> [B, S, Hq, D]; padding queries get zeros. Eager only (it reads the counts on the host)."""
    b, hq, s, d = query.shape
    t, hkv = keys_by_token.shape[1], keys_by_token.shape[2]
    new_valid = torch.ones(b, s, dtype=torch.bool, device=query.device) if new_valid is None else new_valid
    out = query.new_zeros(b, s, hq, d)
    n_new, n_keys = new_valid.sum(-1).tolist(), lengths.tolist()
    q_by_token = query.transpose(1, 2)  # [B, S, Hq, D]
    if flash_varlen_available(query.device, query.dtype) and max(n_new, default=0) > 0:
        counts = torch.tensor([0] + n_new, device=query.device).cumsum(0).to(torch.int32)
        cu_k = torch.arange(b + 1, dtype=torch.int32, device=query.device) * t
        packed = _flash_varlen(
            q_by_token[new_valid], keys_by_token.view(b * t, hkv, d), values_by_token.view(b * t, hkv, d),
            counts, cu_k, max(n_new), max(n_keys), True, scaling, seqused_k=lengths.to(torch.int32),
        )  # [total_new, Hq, D]
        out[new_valid] = packed
        return out
    group = hq // hkv
    for row in range(b):
        n, m = n_new[row], n_keys[row]
        if n == 0:
            continue
        q = q_by_token[row][new_valid[row]].transpose(0, 1)  # [Hq, n, D]
        k = keys_by_token[row, :m].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, m, D]
        v = values_by_token[row, :m].transpose(0, 1).repeat_interleave(group, 0)
        out[row, new_valid[row]] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_mask(n, m, query.device), scale=scaling
        ).transpose(0, 1)
    return out
