"""sparse_decode: exact softmax attention of one query token over the selected K/V rows.

Each query head reads the rows its KV head selected (indices [B, Hkv, k], -1 = unused slot).
A row with no selected key gets an all-zero output.

The Triton path is flash-decoding over the index list: each (batch row, KV head) splits its k slots
over programs; a program serves all G query heads of its KV head, gathers BLOCK_N K/V rows straight
from the cache (never copied out), keeps an online softmax, and writes an unnormalised partial; the
last split of the row to finish merges the partials and writes the output.
"""

from __future__ import annotations

import math

import torch

from spotlight_attn.kernels import _triton
from spotlight_attn.kernels._triton import cdiv, next_pow2

triton = tl = libdevice = _sum = _max = _cumsum = None  # bound on the first launch (see _triton.py)


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


@_triton.kernel
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, part_ptr, stat_ptr, counter_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ih, stride_ob, stride_oh,
    num_kv_heads, num_slots, split_len, n_splits, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Split program_id(0) of row program_id(1) = b * Hkv + h: slots [split * split_len, +split_len).

    Writes part[row, split, G, D] (unnormalised output) and stat[row, split, 2, G] (running max in
    log2 units, softmax denominator); the row's last split writes out[b, h*G:(h+1)*G, 0, :].
    F32_DOT: products in float32 (fp32 caches, and bf16 under the interpreter, whose dot cannot take bf16).
    """
    split = tl.program_id(0)
    row = tl.program_id(1)
    b = (row // num_kv_heads).to(tl.int64)
    h = row % num_kv_heads
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < G
    d_ok = d < D
    q = tl.load(
        q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [G_PAD, D_PAD]; padded heads are zeros, their results are never stored
    k_row = k_ptr + b * stride_kb + h.to(tl.int64) * stride_kh
    v_row = v_ptr + b * stride_vb + h.to(tl.int64) * stride_vh
    idx_row = idx_ptr + b * stride_ib + h.to(tl.int64) * stride_ih

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.full([G_PAD], 0, tl.float32)
    acc = tl.full([G_PAD, D_PAD], 0, tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, num_slots)
    n_next = lo + tl.arange(0, BLOCK_N)
    pos_next = tl.load(idx_row + n_next, mask=n_next < hi, other=-1)
    for _ in range(lo, hi, BLOCK_N):
        pos = pos_next  # [BLOCK_N] int64, -1 = unused
        n_next += BLOCK_N
        pos_next = tl.load(idx_row + n_next, mask=n_next < hi, other=-1)  # next indices in flight
        used = pos >= 0
        kv_mask = used[:, None] if D == D_PAD else used[:, None] & d_ok[None, :]
        keys = tl.load(k_row + pos[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        vals = tl.load(v_row + pos[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)  # both in flight
        if F32_DOT:
            logits = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(keys))
        logits = tl.where(used[None, :], logits * scale_log2, float("-inf"))  # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, _max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: weights stay 0, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(logits - m_use[:, None])
        l_i = l_i * alpha + _sum(p, axis=1)
        if F32_DOT:  # p rounded to the cache dtype first, as the tensor-core path does
            p_in = p.to(vals.dtype).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_in, vals.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals)
        m_i = m_new

    cell = row * n_splits + split
    tl.store(part_ptr + (cell * G + g[:, None]) * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(stat_ptr + (cell * 2) * G + g, m_i, mask=g_ok)
    tl.store(stat_ptr + (cell * 2 + 1) * G + g, l_i, mask=g_ok)

    # The row's last split to finish merges every split (release/acquire through the counter): one
    # online-softmax pass, S_BLOCK splits a step so that a step's loads are all in flight together.
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel") == n_splits - 1:
        gg = tl.arange(0, G_P2)
        sb = tl.arange(0, S_BLOCK)
        gg_ok = gg < G
        m_run = tl.full([G_P2], float("-inf"), dtype=tl.float32)
        num = tl.full([G_P2, D_PAD], 0, tl.float32)
        den = tl.full([G_P2], 0, tl.float32)
        for s0 in range(0, n_splits, S_BLOCK):
            cells = row * n_splits + s0 + sb
            ok = ((s0 + sb) < n_splits)[:, None] & gg_ok[None, :]
            m_s = tl.load(stat_ptr + (cells * 2)[:, None] * G + gg[None, :], mask=ok, other=float("-inf"),
                          cache_modifier=".cg")  # [S_BLOCK, G_P2]
            l_s = tl.load(stat_ptr + (cells * 2 + 1)[:, None] * G + gg[None, :], mask=ok, other=0.0,
                          cache_modifier=".cg")
            part = tl.load(
                part_ptr + ((cells[:, None, None] * G + gg[None, :, None]) * D + d[None, None, :]),
                mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg",
            )  # [S_BLOCK, G_P2, D_PAD]
            m_new = tl.maximum(m_run, _max(m_s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp2(m_run - m_use)  # 0 while nothing was seen
            w = tl.exp2(m_s - m_use[None, :])  # 0 for splits that saw no key
            den = den * rescale + _sum(w * l_s, axis=0)
            num = num * rescale[:, None] + _sum(w[:, :, None] * part, axis=0)
            m_run = m_new
        out = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
        tl.store(
            out_ptr + b * stride_ob + (h * G + gg)[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=gg_ok[:, None] & d_ok[None, :],
        )
        tl.atomic_xchg(counter_ptr + row, 0)


def _sparse_decode_triton(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scaling: float,
    *, block_n: int | None = None, split_len: int | None = None, programs_per_sm: int = 2,
    max_splits: int = 32, num_warps: int = 4, num_stages: int | None = None,
) -> torch.Tensor:
    """Launcher: shapes as in sparse_decode_reference. The keyword arguments override the split plan
    (tests use them to force many splits; benchmarks tune them)."""
    _triton.bind(globals())
    b, hq, _, d = query.shape
    hkv, k = keys.shape[1], indices.shape[-1]
    group = hq // hkv
    device = query.device
    out = torch.empty(b, hq, 1, d, dtype=query.dtype, device=device)
    if k == 0 or b == 0:
        return out.zero_()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    query = query if query.stride(-1) == 1 else query.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()

    rows = b * hkv
    block_n = block_n or (32 if query.dtype == torch.float32 else 64)  # fp32 tiles at 64 spill registers
    if split_len is None:
        target = _triton.num_programs_target(device) * programs_per_sm // 4
        splits = max(1, min(cdiv(target, rows), cdiv(k, block_n), max_splits))
        split_len = cdiv(cdiv(k, splits), block_n) * block_n
    splits = cdiv(k, split_len)
    d_pad = max(16, next_pow2(d))
    merge_tile = 4096 if query.dtype == torch.float32 else 8192  # partials merged per step (registers)
    part = torch.empty(rows, splits, group, d, dtype=torch.float32, device=device)
    stat = torch.empty(rows, splits, 2, group, dtype=torch.float32, device=device)
    counters = _triton.zeroed_counters(device, rows)
    _sparse_decode_kernel[(splits, rows)](
        query, keys, values, indices, out, part, stat, counters,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1),
        hkv, k, split_len, splits, scaling * math.log2(math.e),
        G=group, G_PAD=max(16, next_pow2(group)), G_P2=next_pow2(group), D=d, D_PAD=d_pad, BLOCK_N=block_n,
        S_BLOCK=max(1, min(next_pow2(splits), merge_tile // (next_pow2(group) * d_pad))),
        F32_DOT=query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and device.type != "cuda"),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    return out


def sparse_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    *,
    use_kernel: bool | None = None,
    force_reference: bool = False,
) -> torch.Tensor:
    """Attention over selected rows. Shapes as in sparse_decode_reference; fp16, bf16 or fp32.

    The Triton kernel on CUDA tensors, the reference elsewhere (see _triton.use_kernel for the overrides).
    """
    if _triton.use_kernel((query, keys, values, indices), use_kernel, force_reference):
        return _sparse_decode_triton(query, keys, values, indices, scaling)
    return sparse_decode_reference(query, keys, values, indices, scaling)
