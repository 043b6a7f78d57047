"""skinny_linear: x [M, K] @ w[N, K]^T for the few rows of a decode step, at the weights' bandwidth.

A decode step multiplies B = 1..16 rows by every weight matrix once, so each GEMM is a stream of
its weight bytes. cuBLAS reaches 26% of the copy bandwidth on the Llama-3-8B shape's k/v projections
(4096 -> 1024) and 59% on q/o (H200, docs/BENCHMARKS.md): too few tiles to keep every
multiprocessor reading. This kernel splits K as well as N, so a 8 MB weight still spreads over
hundreds of programs; the last program of each N tile to finish sums the tile's fp32 partials
(in a fixed order, so results do not depend on timing) and writes the output.

    skinny_linear_reference(x, w, bias) -> F.linear in the input dtype
    _skinny_linear_triton(x, w, bias, ...) -> the kernel (CUDA, or CPU under TRITON_INTERPRET=1)
    skinny_serves(x, w) -> whether the kernel takes these shapes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spotlight_attn.kernels import _triton
from spotlight_attn.kernels._triton import cdiv, next_pow2

triton = tl = libdevice = _sum = _max = _cumsum = None  # bound on the first launch (see _triton.py)

MAX_ROWS = 16  # tl.dot's smallest M; more rows are a GEMM cuBLAS does well


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], w [N, K], bias [N] or None -> [M, N] in x's dtype."""
    return F.linear(x, w, bias)


def skinny_serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Rows <= MAX_ROWS, float16 or bfloat16 alike in x and w (tl.dot would round float32 to tf32), last
    dims contiguous, K a multiple of 8 (16-byte rows)."""
    return (
        x.dim() == 2 and w.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] == w.shape[1]
        and x.dtype == w.dtype and x.dtype in (torch.float16, torch.bfloat16)
        and x.stride(-1) == 1 and w.stride(-1) == 1 and w.shape[1] % 8 == 0
    )


@_triton.kernel
def _skinny_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_split,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr, WIDEN: tl.constexpr, STAGES: tl.constexpr,
):
    """Program (n tile, split s): acc [BM, BN] = x[:, Ks] @ w[tile, Ks]^T over its k_split columns of K.
    SPLIT > 1: partials go to part[s, tile] (fp32 [SPLIT, n_tiles, BM, BN]); the tile's last program to
    arrive (acq_rel counter) sums them in split order, adds the bias and writes out [M, N]."""
    tile = tl.program_id(0)
    s = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = tile * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.full([BM, BN], 0.0, tl.float32)
    k0 = s * k_split
    for kk in tl.range(k0, k0 + k_split, BK, num_stages=STAGES):
        ks = kk + rk
        if EVEN:  # K % (SPLIT * BK) == 0 and N % BN == 0: only the padding rows of x are masked
            w = tl.load(w_ptr + rn[:, None] * stride_wn + ks[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + ks[None, :], mask=(rn[:, None] < N) & (ks[None, :] < K),
                        other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        if WIDEN:  # the interpreter's dot mishandles 16-bit floats (kernels-notes.md)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w))
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        n_tiles = tl.num_programs(0)
        cell = (rm[:, None] * BN + tl.arange(0, BN)[None, :])  # [BM, BN] within a tile's partial
        tl.store(part_ptr + (s * n_tiles + tile) * (BM * BN) + cell, acc)
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
            total = tl.full([BM, BN], 0.0, tl.float32)
            for j in range(0, SPLIT):  # split order, whichever program finished last
                total += tl.load(part_ptr + (j * n_tiles + tile) * (BM * BN) + cell, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + tile, 0)


def plan_skinny(n: int, k: int, device: torch.device, *, block_n: int | None = None, block_k: int = 128,
                programs_per_sm: int = 4) -> tuple[int, int, int]:
    """(BN, BK, SPLIT): N tiles x K splits near programs_per_sm programs per multiprocessor, each split
    a whole number of BK columns."""
    bn = block_n or (32 if n >= 8192 else 16)
    tiles = cdiv(n, bn)
    target = max(1, _triton.num_programs_target(device) * programs_per_sm // 4)
    steps = cdiv(k, block_k)
    split = 1
    while tiles * split * 2 <= target and steps % (split * 2) == 0 and steps // (split * 2) >= 2:
        split *= 2
    return bn, block_k, split


def _skinny_linear_triton(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
    block_n: int | None = None, block_k: int = 128, split: int | None = None, num_warps: int = 4,
    stages: int = 4, programs_per_sm: int = 4,
) -> torch.Tensor:
    """Launcher: x [M <= 16, K], w [N, K] (last dims contiguous), bias [N] or None -> [M, N] in x's dtype.
    The keyword arguments size a program's work (tests shrink them; benchmarks tune them)."""
    _triton.bind(globals())
    if not skinny_serves(x, w):
        raise ValueError(f"skinny_linear takes x [M <= {MAX_ROWS}, K], w [N, K] of one 16-bit float dtype, "
                         f"got x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    m, k = x.shape
    n = w.shape[0]
    bn, bk, planned = plan_skinny(n, k, x.device, block_n=block_n, block_k=block_k, programs_per_sm=programs_per_sm)
    split = split or planned
    k_split = cdiv(cdiv(k, bk), split) * bk
    tiles = cdiv(n, bn)
    bm = max(16, next_pow2(m))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, tiles, bm, bn, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = _triton.zeroed_counters(x.device, tiles) if split > 1 else out
    even = k % (split * bk) == 0 and n % bn == 0
    _skinny_kernel[(tiles, split)](
        x, w, bias if bias is not None else out, out, part, counters,
        m, n, k, x.stride(0), w.stride(0), out.stride(0), k_split,
        BM=bm, BN=bn, BK=bk, SPLIT=split, HAS_BIAS=bias is not None, EVEN=even,
        WIDEN=_triton.interpreting(), STAGES=stages, num_warps=num_warps,
    )
    return out
