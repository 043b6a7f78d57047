"""hash_codes: a few rows of hash inputs -> packed codes, the whole hash in one launch.

A decode step hashes B x (G + 1) rows per KV head (its queries and its new key). Through torch that
is one bmm per weight (two per residual block, plus the projection), the SiLU and residual kernels
between them and the sign packing: about ten launches per layer for a few rows each. Here one
program takes BLOCK_M rows of one head through every block and the projection and writes the packed
sign bits:

    x <- x + W2 silu(W1 x + b1) + b2   (depth times)     codes = pack(sign(P x))

The matmuls accumulate in float32 with IEEE products (no TF32), as the reference does, but in
another order: a pre-sign value within rounding of zero may take the other sign (the tests check
that only such bits ever differ, and that on their inputs none does). For many rows (a prefill) the
weights would be re-read per block of rows; that stays with the torch path (serves()).

Two kernels, one contract. The heads' chains of matmuls cannot be split across programs without a
grid-wide barrier, so what spreads a step's hash over the GPU is fewer rows per program:
- `_hash_rows_kernel` (up to FEW_ROWS rows per head): FEW_ROWS_BLOCK rows per program, each matmul as
  broadcast products summed over BK-wide slices of K, every product in the thread that owns its
  output column (no shuffles). A decode step at 128K x 6 hashes 30 rows per head: 120 programs.
- `_hash_kernel` (more rows): 16-row tl.dot tiles, the smallest a dot takes.
Both keep the running rows in registers and read each matmul's left operand back from their own
scratch rows (a register tile cannot be sliced along K). In a decode step the weights are cold:
between two layers' hashes the step streams far more than L2 holds, so each weight slice a
program reads in turn (one to eight per matmul) would wait on DRAM. On CUDA every program therefore first asks L2
for its share of all its head's weights (`prefetch.global.L2`, no wait), and the slices that follow
come from L2.

    hash_codes(x [n, M, D], w1 [depth, n, D, Wd] | None, b1 [depth, n, 1, Wd], w2 [depth, n, Wd, D],
               b2 [depth, n, 1, D], proj [n, D, bits]) -> codes [n, M, ceil(bits / 32)] int32
"""

from __future__ import annotations

import torch

from spotlight_attn.kernels import _triton
from spotlight_attn.kernels._triton import cdiv, next_pow2
from spotlight_attn.kernels.pack import num_words, pack_signs_reference

triton = tl = libdevice = _sum = _max = _cumsum = None  # bound on the first launch (see _triton.py)

MAX_ROWS = 256  # rows per head the fused kernel takes; more (a prefill) go through torch
MAX_DIM = 128  # head dim and block width it keeps in registers
MAX_BITS = 512
# Up to FEW_ROWS rows per head (a decode step's B x (G + 1) at moderate batch) take programs of
# FEW_ROWS_BLOCK rows: 15 programs per head at 30 rows instead of 2; on the H200 the learned-hash
# shape takes 13.2 us with cold weights instead of 22.4 (docs/BENCHMARKS.md).
FEW_ROWS = 64
FEW_ROWS_BLOCK = 2
# Their K slice and warps, measured on the H200 with cold weights (benchmarks/tune_kernels.py): the
# learned-hash shape (depth 2) 13.2 us at 8 warps and 128-wide slices (4 warps and 64: 16.0); the
# projection alone (SimHash) 5.1 us at 4 warps (8 warps: 6.2), 3.2 us warm at 64-wide slices (16: 3.7).
FEW_ROWS_BK = {True: 128, False: 64}  # keyed by "has residual blocks"
FEW_ROWS_WARPS = {True: 8, False: 4}


def hash_codes_reference(x, w1, b1, w2, b2, proj) -> torch.Tensor:
    """The bank in torch, as HeadBank.forward computes it on heads-first rows, then packed."""
    x = x.to(proj.dtype)
    for i in range(0 if w1 is None else w1.shape[0]):
        hidden = torch.nn.functional.silu(torch.baddbmm(b1[i], x, w1[i]))
        x = x + torch.baddbmm(b2[i], hidden, w2[i])
    return pack_signs_reference(torch.bmm(x, proj))


def serves(x: torch.Tensor, w1, proj: torch.Tensor) -> bool:
    """Whether the fused kernel takes these shapes (rows per head, dims, bits; float32 weights)."""
    n, m, d = x.shape
    width = 0 if w1 is None else w1.shape[-1]
    return (
        m <= MAX_ROWS and d <= MAX_DIM and width <= MAX_DIM and proj.shape[-1] <= MAX_BITS
        and proj.dtype == torch.float32 and (w1 is None or w1.dtype == torch.float32)
    )


@_triton.kernel
def _prefetch_share(ptr, n, part, parts, LINES: tl.constexpr):
    """Ask L2 for this program's share of the n floats at ptr: 128-byte lines part, part + parts, ...
    (one line per lane, no wait, nothing returned to use)."""
    offs = tl.minimum((tl.arange(0, LINES) * parts + part) * 32, n - 1)
    addr = (ptr + offs).to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                              is_pure=False, pack=1)


@_triton.kernel
def _prefetch_weights(w1_ptr, w2_ptr, proj_ptr, n_heads, d, width, bits, DEPTH: tl.constexpr, LINES: tl.constexpr):
    """Every phase's weights of head program_id(0) on their way into L2, spread over the head's programs.

    In a decode step the weights are cold (the step streams far more than L2 holds between two
    layers' hashes), and each matmul slice would otherwise wait on DRAM in turn."""
    head = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    for i in tl.static_range(DEPTH):
        blk = (i * n_heads + head).to(tl.int64)
        _prefetch_share(w1_ptr + blk * d * width, d * width, part, parts, LINES)
        _prefetch_share(w2_ptr + blk * width * d, width * d, part, parts, LINES)
    _prefetch_share(proj_ptr + head.to(tl.int64) * d * bits, d * bits, part, parts, LINES)


@_triton.kernel
def _step_rows(rows, row_ok, group, len_ptr):
    """A decode step's row r of a head (STEP): batch row b = r // (G + 1), slot j = r % (G + 1), the
    query head head * G + j for j < G, the new key (at position lengths[b] - 1) for j == G."""
    b = rows // (group + 1)
    j = rows - b * (group + 1)
    pos = tl.load(len_ptr + b, mask=row_ok, other=1).to(tl.int64) - 1
    return b.to(tl.int64), j, j == group, pos


@_triton.kernel
def _load_rows(
    x_ptr, key_ptr, len_ptr, head, rows, row_ok, dim, d_ok, stride_xh, stride_xm, group, stride_xb,
    stride_kb, stride_kt, stride_kh, STEP: tl.constexpr,
):
    """The program's input rows [BLOCK_M, D_PAD] in float32: rows of x [n, M, D] (strides xh, xm), or
    with STEP a decode step's queries x [B, Hq, 1, D] (strides xb, xh) and new keys, read in place from
    the cache's keys [B, T, Hkv, D] (strides kb, kt, kh) at lengths[b] - 1."""
    if STEP:
        b, j, is_key, pos = _step_rows(rows, row_ok, group, len_ptr)
        q_off = b * stride_xb + (head * group + j).to(tl.int64) * stride_xh
        k_off = b * stride_kb + pos * stride_kt + head.to(tl.int64) * stride_kh
        xq = tl.load(x_ptr + q_off[:, None] + dim[None, :], mask=(row_ok & ~is_key)[:, None] & d_ok[None, :], other=0.0)
        xk = tl.load(key_ptr + k_off[:, None] + dim[None, :], mask=(row_ok & is_key)[:, None] & d_ok[None, :], other=0.0)
        x = xq.to(tl.float32) + xk.to(tl.float32)
    else:
        x_off = head.to(tl.int64) * stride_xh + rows[:, None].to(tl.int64) * stride_xm + dim[None, :]
        x = tl.load(x_ptr + x_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return x


@_triton.kernel
def _store_codes(
    out_ptr, codes_ptr, len_ptr, packed, head, rows, row_ok, m, n_heads, group, stride_cb, stride_ch, stride_ct,
    BITS_PAD: tl.constexpr, WORDS: tl.constexpr, STEP: tl.constexpr,
):
    """Packed codes [BLOCK_M, BITS_PAD // 32] to out [n, M, W], or with STEP the queries' to out
    [B, Hkv, G, W] and the new keys' into the code cache [B, Hkv, T, W] (strides cb, ch, ct) at
    lengths[b] - 1."""
    word = tl.arange(0, BITS_PAD // 32)
    w_ok = word[None, :] < WORDS
    if STEP:
        b, j, is_key, pos = _step_rows(rows, row_ok, group, len_ptr)
        q_out = ((b * n_heads + head) * group + j) * WORDS
        k_out = b * stride_cb + head.to(tl.int64) * stride_ch + pos * stride_ct
        tl.store(out_ptr + q_out[:, None] + word[None, :], packed, mask=(row_ok & ~is_key)[:, None] & w_ok)
        tl.store(codes_ptr + k_out[:, None] + word[None, :], packed, mask=(row_ok & is_key)[:, None] & w_ok)
    else:
        tl.store(out_ptr + (head.to(tl.int64) * m + rows[:, None]) * WORDS + word[None, :], packed,
                 mask=row_ok[:, None] & w_ok)


@_triton.kernel
def _hash_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, proj_ptr, out_ptr, scratch_ptr,
    n_heads, m, d, width, bits, stride_xh, stride_xm,
    key_ptr, len_ptr, codes_ptr, group, stride_xb, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_ct,
    DEPTH: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, W_PAD: tl.constexpr, BITS_PAD: tl.constexpr,
    WORDS: tl.constexpr, BK: tl.constexpr, PREFETCH_LINES: tl.constexpr, STEP: tl.constexpr,
):
    """One program: rows [BLOCK_M block] of head program_id(0). Weights contiguous as in the module docstring.

    The running rows stay in registers as the accumulator; every matmul reads its left operand back
    from this program's scratch rows BK columns at a time, so an operand tile is [BLOCK_M, BK] x
    [BK, N] (a whole [BLOCK_M, 128] x [128, 128] operand pair spilled thousands of registers)."""
    head = tl.program_id(0)
    blk_m = tl.program_id(1)
    rows = blk_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.arange(0, BLOCK_M)
    dim = tl.arange(0, D_PAD)
    hid = tl.arange(0, W_PAD)
    kk = tl.arange(0, BK)
    row_ok = rows < m
    d_ok = dim < d
    w_ok = hid < width
    if PREFETCH_LINES > 0:
        _prefetch_weights(w1_ptr, w2_ptr, proj_ptr, n_heads, d, width, bits, DEPTH, PREFETCH_LINES)
    x = _load_rows(x_ptr, key_ptr, len_ptr, head, rows, row_ok, dim, d_ok, stride_xh, stride_xm, group, stride_xb,
                   stride_kb, stride_kt, stride_kh, STEP)  # [BLOCK_M, D_PAD]
    # This program's scratch: x rows [BLOCK_M, D_PAD] then hidden rows [BLOCK_M, W_PAD], float32.
    scratch_x = scratch_ptr + (head * tl.num_programs(1) + blk_m).to(tl.int64) * BLOCK_M * (D_PAD + W_PAD)
    scratch_h = scratch_x + BLOCK_M * D_PAD
    for i in tl.static_range(DEPTH):
        blk = (i * n_heads + head).to(tl.int64)
        tl.store(scratch_x + local[:, None] * D_PAD + dim[None, :], x)
        tl.debug_barrier()  # the rows written by every thread, before any reads them back
        hidden = tl.full([BLOCK_M, W_PAD], 0.0, tl.float32)
        for k0 in range(0, D_PAD, BK):
            xa = tl.load(scratch_x + local[:, None] * D_PAD + (k0 + kk)[None, :])
            w1 = tl.load(w1_ptr + blk * d * width + (k0 + kk)[:, None] * width + hid[None, :],
                         mask=((k0 + kk) < d)[:, None] & w_ok[None, :], other=0.0)
            hidden += tl.dot(xa, w1, input_precision="ieee")
        b1 = tl.load(b1_ptr + blk * width + hid, mask=w_ok, other=0.0)
        hidden = hidden + b1[None, :]
        hidden = hidden / (1.0 + tl.exp(tl.minimum(-hidden, 80.0)))  # silu (tl.sigmoid: a jit function the interpreter may not call)
        tl.store(scratch_h + local[:, None] * W_PAD + hid[None, :], hidden)
        tl.debug_barrier()
        b2 = tl.load(b2_ptr + blk * d + dim, mask=d_ok, other=0.0)
        delta = tl.full([BLOCK_M, D_PAD], 0.0, tl.float32)
        for k0 in range(0, W_PAD, BK):
            ha = tl.load(scratch_h + local[:, None] * W_PAD + (k0 + kk)[None, :])
            w2 = tl.load(w2_ptr + blk * width * d + (k0 + kk)[:, None] * d + dim[None, :],
                         mask=((k0 + kk) < width)[:, None] & d_ok[None, :], other=0.0)
            delta += tl.dot(ha, w2, input_precision="ieee")
        x = x + (delta + b2[None, :])
        tl.debug_barrier()  # every read of this block's scratch done before the next block rewrites it
    tl.store(scratch_x + local[:, None] * D_PAD + dim[None, :], x)
    tl.debug_barrier()
    col = tl.arange(0, BITS_PAD)
    hashed = tl.full([BLOCK_M, BITS_PAD], 0.0, tl.float32)
    proj_head = proj_ptr + head.to(tl.int64) * d * bits
    for k0 in range(0, D_PAD, BK):
        xa = tl.load(scratch_x + local[:, None] * D_PAD + (k0 + kk)[None, :])
        p = tl.load(proj_head + (k0 + kk)[:, None] * bits + col[None, :],
                    mask=((k0 + kk) < d)[:, None] & (col[None, :] < bits), other=0.0)
        hashed += tl.dot(xa, p, input_precision="ieee")  # padded bits are exactly 0: never set
    # Distinct bits: their sum is their OR, and bit 31 wraps to the int32 sign bit as intended.
    one_bits = tl.where(hashed > 0, 1 << (col % 32)[None, :], 0)
    packed = _sum(tl.reshape(one_bits, [BLOCK_M, BITS_PAD // 32, 32]), axis=2)  # [BLOCK_M, BITS_PAD // 32]
    _store_codes(out_ptr, codes_ptr, len_ptr, packed, head, rows, row_ok, m, n_heads, group, stride_cb, stride_ch,
                 stride_ct, BITS_PAD, WORDS, STEP)


@_triton.kernel
def _matmul_rows(a_ptr, w_ptr, k_valid, n_valid, stride_w, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr,
                 N_PAD: tl.constexpr, BK: tl.constexpr):
    """[BLOCK_M, K_PAD] rows at a_ptr (this program's scratch, row stride K_PAD) @ w [k_valid, n_valid]
    (row stride stride_w) -> [BLOCK_M, N_PAD] float32, as broadcast products summed over BK-wide slices."""
    local = tl.arange(0, BLOCK_M)
    col = tl.arange(0, N_PAD)
    kk = tl.arange(0, BK)
    acc = tl.full([BLOCK_M, N_PAD], 0.0, tl.float32)
    for k0 in tl.static_range(0, K_PAD, BK):
        a = tl.load(a_ptr + local[:, None] * K_PAD + (k0 + kk)[None, :])  # [BLOCK_M, BK]
        w = tl.load(w_ptr + (k0 + kk)[:, None] * stride_w + col[None, :],
                    mask=((k0 + kk) < k_valid)[:, None] & (col < n_valid)[None, :], other=0.0)  # [BK, N_PAD]
        acc += _sum(a[:, :, None] * w[None, :, :], axis=1)
    return acc


@_triton.kernel
def _hash_rows_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, proj_ptr, out_ptr, scratch_ptr,
    n_heads, m, d, width, bits, stride_xh, stride_xm,
    key_ptr, len_ptr, codes_ptr, group, stride_xb, stride_kb, stride_kt, stride_kh, stride_cb, stride_ch, stride_ct,
    DEPTH: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, W_PAD: tl.constexpr, BITS_PAD: tl.constexpr,
    WORDS: tl.constexpr, BK: tl.constexpr, PREFETCH_LINES: tl.constexpr, STEP: tl.constexpr,
):
    """As _hash_kernel, for a few rows per program (BLOCK_M below a dot tile): broadcast products."""
    head = tl.program_id(0)
    blk_m = tl.program_id(1)
    rows = blk_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.arange(0, BLOCK_M)
    dim = tl.arange(0, D_PAD)
    hid = tl.arange(0, W_PAD)
    row_ok = rows < m
    d_ok = dim < d
    w_ok = hid < width
    if PREFETCH_LINES > 0:
        _prefetch_weights(w1_ptr, w2_ptr, proj_ptr, n_heads, d, width, bits, DEPTH, PREFETCH_LINES)
    x = _load_rows(x_ptr, key_ptr, len_ptr, head, rows, row_ok, dim, d_ok, stride_xh, stride_xm, group, stride_xb,
                   stride_kb, stride_kt, stride_kh, STEP)  # [BLOCK_M, D_PAD]
    scratch_x = scratch_ptr + (head * tl.num_programs(1) + blk_m).to(tl.int64) * BLOCK_M * (D_PAD + W_PAD)
    scratch_h = scratch_x + BLOCK_M * D_PAD
    for i in tl.static_range(DEPTH):
        blk = (i * n_heads + head).to(tl.int64)
        tl.store(scratch_x + local[:, None] * D_PAD + dim[None, :], x)
        tl.debug_barrier()
        hidden = _matmul_rows(scratch_x, w1_ptr + blk * d * width, d, width, width, BLOCK_M, D_PAD, W_PAD, BK)
        hidden = hidden + tl.load(b1_ptr + blk * width + hid, mask=w_ok, other=0.0)[None, :]
        hidden = hidden / (1.0 + tl.exp(tl.minimum(-hidden, 80.0)))
        tl.store(scratch_h + local[:, None] * W_PAD + hid[None, :], hidden)
        tl.debug_barrier()
        delta = _matmul_rows(scratch_h, w2_ptr + blk * width * d, width, d, d, BLOCK_M, W_PAD, D_PAD, BK)
        x = x + (delta + tl.load(b2_ptr + blk * d + dim, mask=d_ok, other=0.0)[None, :])
        tl.debug_barrier()
    tl.store(scratch_x + local[:, None] * D_PAD + dim[None, :], x)
    tl.debug_barrier()
    col = tl.arange(0, BITS_PAD)
    hashed = _matmul_rows(scratch_x, proj_ptr + head.to(tl.int64) * d * bits, d, bits, bits, BLOCK_M, D_PAD, BITS_PAD, BK)
    one_bits = tl.where(hashed > 0, 1 << (col % 32)[None, :], 0)
    packed = _sum(tl.reshape(one_bits, [BLOCK_M, BITS_PAD // 32, 32]), axis=2)  # [BLOCK_M, BITS_PAD // 32]
    _store_codes(out_ptr, codes_ptr, len_ptr, packed, head, rows, row_ok, m, n_heads, group, stride_cb, stride_ch,
                 stride_ct, BITS_PAD, WORDS, STEP)


def _hash_codes_triton(
    x, w1, b1, w2, b2, proj, *, block_m: int | None = None, bk: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, prefetch_l2: bool = True,
) -> torch.Tensor:
    """Launcher: same contract as hash_codes_reference. The keyword arguments size a program's work
    (benchmarks/tune_kernels.py times them); block_m below 16 takes the broadcast-product kernel."""
    _triton.bind(globals())
    n, m, d = x.shape
    out = torch.empty(n, m, num_words(proj.shape[-1]), dtype=torch.int32, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = (x, x.stride(0), x.stride(1), x, x, x, 0, 0, 0, 0, 0, 0, 0, 0)  # STEP's arguments unused
    _launch(rows, n, m, d, out, w1, b1, w2, b2, proj, False, block_m, bk, num_warps, num_stages, prefetch_l2)
    return out


def step_hash_codes_reference(query, keys_by_token, lengths, codes, w1, b1, w2, b2, proj) -> torch.Tensor:
    """A decode step's hash in torch (the contract of _step_hash_codes_triton): query [B, Hq, 1, D], the
    cache's keys [B, T, Hkv, D] holding the step's new key at lengths[b] - 1, codes [B, Hkv, T, W] ->
    query codes [B, Hkv, G, W]; the new keys' codes are written into codes at lengths[b] - 1."""
    b, hq, _, d = query.shape
    hkv = keys_by_token.shape[2]
    group = hq // hkv
    batch = torch.arange(b, device=query.device)
    new_keys = keys_by_token[batch, lengths - 1]  # [B, Hkv, D]
    x = torch.cat([query.reshape(b, hkv, group, d), new_keys[:, :, None].to(query.dtype)], dim=2)  # [B, Hkv, G + 1, D]
    folded = x.transpose(0, 1).reshape(hkv, b * (group + 1), d)
    out = hash_codes_reference(folded, w1, b1, w2, b2, proj).reshape(hkv, b, group + 1, -1).transpose(0, 1)
    codes[batch, :, lengths - 1] = out[:, :, group]
    return out[:, :, :group].contiguous()


def step_serves(query, keys_by_token, w1, proj) -> bool:
    """Whether _step_hash_codes_triton takes a decode step of these shapes (serves() on its rows)."""
    b, hq, s, d = query.shape
    rows = b * (hq // keys_by_token.shape[2] + 1)
    return s == 1 and query.dtype == keys_by_token.dtype and serves(query.new_empty(0, rows, d), w1, proj)


def _step_hash_codes_triton(query, keys_by_token, lengths, codes, w1, b1, w2, b2, proj, **launch) -> torch.Tensor:
    """A decode step's hash in one launch, as step_hash_codes_reference: the kernel reads the queries
    and the new keys where they are (no concatenated input) and writes the keys' codes into the code
    cache itself (no index_put after it); rows and codes are the same as the reference's rows through
    _hash_codes_triton."""
    _triton.bind(globals())
    b, hq, _, d = query.shape
    hkv = keys_by_token.shape[2]
    group = hq // hkv
    out = torch.empty(b, hkv, group, codes.shape[-1], dtype=torch.int32, device=query.device)
    if b == 0 or hkv == 0:
        return out
    if query.stride(-1) != 1 or keys_by_token.stride(-1) != 1 or codes.stride(-1) != 1:
        raise ValueError("the step's hash needs query, keys and codes contiguous in their last dim")
    rows = (query, query.stride(1), 0, keys_by_token, lengths, codes, group, query.stride(0),
            keys_by_token.stride(0), keys_by_token.stride(1), keys_by_token.stride(2),
            codes.stride(0), codes.stride(1), codes.stride(2))
    _launch(rows, hkv, b * (group + 1), d, out, w1, b1, w2, b2, proj, True, **launch)
    return out


def _launch(rows, n, m, d, out, w1, b1, w2, b2, proj, step, block_m=None, bk=None, num_warps=None, num_stages=None,
            prefetch_l2=True) -> None:
    """Sizes and launches the kernel for n heads of m rows of dim d (rows: the input's pointers and
    strides, _hash_kernel's x .. stride_ct)."""
    bits = proj.shape[-1]
    depth = 0 if w1 is None else w1.shape[0]
    width = 0 if w1 is None else w1.shape[-1]
    if depth:
        w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    else:
        w1 = b1 = w2 = b2 = proj  # not read
    proj = proj.contiguous()
    d_pad, w_pad = max(16, next_pow2(d)), max(16, next_pow2(max(width, 1)))
    block_m = block_m or (FEW_ROWS_BLOCK if m <= FEW_ROWS else 16)
    few = block_m < 16
    bk = bk or (FEW_ROWS_BK[depth > 0] if few else 16)
    num_warps = num_warps or (FEW_ROWS_WARPS[depth > 0] if few else 4)
    # A slice wider than an operand's padded K would read past its scratch rows: x rows are d_pad wide,
    # hidden rows (residual blocks only) w_pad.
    bk = min(bk, d_pad, w_pad) if depth else min(bk, d_pad)
    blocks_m = cdiv(m, block_m)
    scratch = torch.empty(n * blocks_m * block_m * (d_pad + w_pad), dtype=torch.float32, device=out.device)
    kernel = _hash_rows_kernel if few else _hash_kernel  # tl.dot needs 16 rows
    lines = 0  # per program and weight matrix; 0: no prefetch (the interpreter has no inline PTX)
    if prefetch_l2 and out.is_cuda and not _triton.interpreting():
        lines = next_pow2(cdiv(cdiv(d * max(width, bits), 32), blocks_m))
    x, stride_xh, stride_xm, *step_args = rows
    kernel[(n, blocks_m)](
        x, w1, b1, w2, b2, proj, out, scratch, n, m, d, width, bits, stride_xh, stride_xm, *step_args,
        DEPTH=depth, BLOCK_M=block_m, D_PAD=d_pad, W_PAD=w_pad, BITS_PAD=max(32, next_pow2(bits)),
        WORDS=num_words(bits), BK=bk, PREFETCH_LINES=lines, STEP=step, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
