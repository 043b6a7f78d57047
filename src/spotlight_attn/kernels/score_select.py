"""score_select: query codes + key codes -> the top-k positions per (batch row, KV head).

Score of key t for KV head h = sum over the G query heads g of h of (bits - popcount(q[g] XOR k[h, t])),
an integer in [0, G * bits]. Selection follows selection/topk.py exactly (budget, sink, window,
padding, ties to the more recent token).

The Triton path selects by counting, not sorting (three launches over row chunks):
1. `_score_kernel` scores every key once, writes a 16-bit score per key (1/8 of the code bytes at 128
   bits, re-read by the next two passes) and a histogram of buckets per chunk; the last chunk of a row
   to finish finds the bucket holding the row's k-th best score. The chunk's interior blocks (no
   sink, window or padding key) count into packed 8-bit fields (at most 20 buckets, `_packed_add`),
   a few integer instructions a key, where tl.histogram (Triton 3.6) spends ballots per bit of the
   bucket index: 39 instructions a key in SASS, half of the pass's loop. Elsewhere 64 buckets
   through tl.histogram.
2. `_refine_kernel` counts the scores inside that bucket exactly (in 4-bit packed fields where a
   chunk has at most 15 blocks, `_nibble_add`, else 8-bit ones); the last chunk finds the exact
   threshold score, how many of the tied keys at the threshold to take (the most recent ones), and
   where each chunk's picks start in the output row.
3. `_emit_kernel` writes each chunk's picks in position order, so rows come out sorted, then -1s
   (on the GPU through a predicated PTX store, `_store_picked`).
It needs the valid keys of each batch row to be one run [start, end) (left or right padding); any
other key_valid falls back to the reference. docs/kernels-notes.md has the measurements behind it.

Scores are computed in a shifted unit that keeps their order: with n1 = number of a KV head's query
heads whose bit i is 1 and d_i = 2 n1 - G, the agreement of key bit k_i is (G + |d_i| tau_i) / 2 with
tau_i = +1 when k_i equals the majority bit (d_i > 0) and -1 otherwise. So
    score = sum_i min(n1, G - n1)  +  sum_j 2^j popcount(~(k XOR majority) AND plane_j),
plane_j = the bits where |d_i| / 2^PAR has bit j set (PAR = 1 for even G, whose |d_i| are even). The
first term is the same for every key of the row, so the kernel ranks keys by the second, scaled by
2^-PAR: x = sum_j 2^j popcount(...) in [0, bits * (G >> PAR)]. That takes bit_length(G >> PAR)
popcounts per word instead of G (2 instead of 4 for G = 4).

A predicted threshold (`guess`, one float per row kept from step to step) lets pass 1 settle it
alone most of the time. Over keys of random bits x would have mean m = sum_i w_i / 2 and spread
s = sqrt(sum_i w_i^2) / 2 (w_i = |d_i| >> PAR, known from the query before any key is read); a row
keeps a running mean r of its residuals (threshold - m) / s (GUESS_SMOOTH), and pass 1 counts exact
bins for the GUESS_EXACT scores either side of c = round(m + r s), then bands of 2, 4, 8 and 16
scores, then one open bin a side. When the k-th best score falls in an exact bin, pass 1's counts give the threshold and the
tie quotas, and pass 2 does not run (mode 0); in a band, pass 2 counts inside it as it does a
coarse bucket (mode 1); in an open bin, the keys are recounted in coarse buckets first (mode 2).
The picks never depend on the prediction, only the work does. docs/kernels-notes.md, "Predicted
threshold", has how often each mode comes up on the real model (benchmarks/threshold_drift.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels import _triton
from spotlight_attn.kernels._triton import cdiv, next_pow2
from spotlight_attn.kernels.pack import popcount, unpack_bits

triton = tl = libdevice = _sum = _max = _cumsum = None  # bound on the first launch (see _triton.py)

COARSE_BINS = 64  # buckets of the first pass; tl.histogram's cost grows with the bin count
FORCED = 32767  # 16-bit score marking a sink/window key; padding keys hold -1
MAX_CHUNKS = 64  # chunks per row, so one program can reduce every chunk's counts
# Pass 1's bins around a predicted threshold c (`guess`, module docstring): GUESS_EXACT scores either side
# of c one bin each, then GUESS_BANDS bands a side of widths 2, 4, 8, 16, then one open bin a side.
GUESS_EXACT = 4
GUESS_BANDS = 4
GUESS_CENTER = 1 + GUESS_BANDS + GUESS_EXACT  # the bin of x == c
GUESS_BINS = 2 * GUESS_CENTER + 1  # 19: five packed counters of four 8-bit fields
# guess_bins="exact": the same 19 bins as exact scores c - 8 .. c + 8 and one open bin a side, no bands
# (three instructions a key in pass 1 instead of twelve; a miss takes the recount). Not yet timed.
GUESS_WIDE = GUESS_CENTER - 1
GUESS_START = 2.0  # the residual a fresh row (NaN) predicts from (about the 2% point of a normal spread)
# Each step moves a row's residual this far towards the one it just measured (a running mean, which
# predicts the real model's next threshold better than the last residual alone: kernels-notes.md).
GUESS_SMOOTH = 0.4
# The static cache keeps a prediction buffer per hash layer and the op counts GUESS_BINS_IN_CACHE's bins
# around it: SPOTLIGHT_SELECT_GUESS=bands (the default; 1 too) or exact, or 0 for no prediction (for A/B
# timing: the picks are the same either way).
_GUESS_SETTING = os.environ.get("SPOTLIGHT_SELECT_GUESS", "bands").strip().lower()
if _GUESS_SETTING not in ("0", "1", "bands", "exact"):
    raise ValueError(f"SPOTLIGHT_SELECT_GUESS must be bands, exact or 0, not {_GUESS_SETTING!r}")
GUESS_IN_CACHE = _GUESS_SETTING != "0"
GUESS_BINS_IN_CACHE = "exact" if _GUESS_SETTING == "exact" else "bands"
COUNTERS = 5  # per row in the fused kernel: arrivals, flag 1, flag 2, departures, recount flag


def query_group(query_codes: torch.Tensor, num_kv_heads: int) -> int:
    """Query heads per KV head, G, of query codes given per head [B, Hq, 1, W] or grouped [B, Hkv, G, W].

    The grouped form is what one hash pass over a KV head's queries and new key leaves
    (hasher.step_codes(grouped=True)); the kernels read it in place, without a copy. The two forms
    hold the same element order, and for G = 1 they are the same shape.
    """
    rows, per_row = query_codes.shape[1], query_codes.shape[2]
    if per_row == 1 and rows % num_kv_heads == 0:
        return rows // num_kv_heads
    if rows == num_kv_heads:
        return per_row
    raise ValueError(
        f"query codes of shape {tuple(query_codes.shape)} fit neither [B, Hq, 1, W] nor [B, Hkv, G, W] "
        f"for {num_kv_heads} KV heads"
    )


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """query_codes [B, Hq, 1, W] (or grouped [B, Hkv, G, W]) int32, key_codes [B, Hkv, T, W] int32
    -> scores [B, Hkv, T] int32."""
    b, w = query_codes.shape[0], query_codes.shape[-1]
    hkv = key_codes.shape[1]
    group = query_group(query_codes, hkv)
    q = query_codes.reshape(b, hkv, group, 1, w)  # [B, Hkv, G, 1, W]
    differing = popcount(torch.bitwise_xor(q, key_codes[:, :, None]))  # [B, Hkv, G, T]
    return (group * bits - differing.sum(2)).to(torch.int32)  # [B, Hkv, T]


def shifted_scores(query_codes: torch.Tensor, key_codes: torch.Tensor, bits: int):
    """The kernels' own view, in torch: shifted scores x [B, Hkv, T] int32 (module docstring), which
    rank keys as hamming_scores does, and the threshold prediction's spread terms m, s [B, Hkv] float32."""
    b, hkv = key_codes.shape[:2]
    group = query_group(query_codes, hkv)
    q = unpack_bits(query_codes.reshape(b, hkv, group, -1), bits)  # [B, Hkv, G, bits]
    d = 2 * q.sum(2) - group
    w = (d.abs() >> (1 if group % 2 == 0 else 0)).to(torch.int32)  # [B, Hkv, bits]
    agree = unpack_bits(key_codes, bits) == (d > 0)[:, :, None]  # [B, Hkv, T, bits]
    x = (agree * w[:, :, None]).sum(-1).to(torch.int32)
    weights = w.float()
    return x, weights.sum(-1) / 2, weights.pow(2).sum(-1).sqrt() / 2


def score_select_reference(
    query_codes: torch.Tensor, key_codes: torch.Tensor, key_valid: torch.Tensor, budget: Budget, bits: int
) -> torch.Tensor:
    """Pure-torch reference. key_valid [B, T] bool -> indices [B, Hkv, k] int64, -1 where unused."""
    from spotlight_attn.selection.topk import select_topk  # here: selection imports this module

    return select_topk(hamming_scores(query_codes, key_codes, bits), key_valid, budget)


@dataclass(frozen=True, slots=True)
class SelectPlan:
    """What selection needs to know about one decode step's cache, shared by every layer of the step.

    Building it reads three numbers per batch row back to the host (the only sync of the kernel path);
    build it once per step with `plan_select` and pass it to every layer's `score_select`.
    """

    budget: Budget
    k: int  # output width: the largest per-row token count
    k_rows: tuple[int, ...]  # tokens each batch row reads (its most-reading KV head's), forced ones included
    bounds: torch.Tensor  # [B, 3] int32 on the cache's device: valid run start, end, k_row; [B, Hkv, 3] per head
    contiguous: bool  # every row's valid keys form one run (else the kernels cannot serve it)


def plan_select(key_valid: torch.Tensor, budget: Budget, num_heads: int | None = None) -> SelectPlan:
    """key_valid [B, T] bool -> the SelectPlan for this step (one device-to-host read). A budget with
    per-head fractions needs `num_heads` (the KV heads) and gets per-head bounds [B, Hkv, 3]."""
    b, t = key_valid.shape
    heads = len(budget.heads) if budget.heads is not None else None
    if heads is not None and num_heads != heads:
        raise ValueError(f"the budget has fractions for {heads} KV heads, the plan is for {num_heads}")
    shape = (b, 3) if heads is None else (b, heads, 3)
    if b == 0 or t == 0:
        empty = torch.zeros(shape, dtype=torch.int32, device=key_valid.device)
        return SelectPlan(budget, 0, (0,) * b, empty, True)
    pos = torch.arange(t, device=key_valid.device)
    n_valid = key_valid.sum(-1)
    first = torch.where(key_valid, pos, t).amin(-1)
    last = torch.where(key_valid, pos, -1).amax(-1)
    rows = torch.stack([n_valid, first, last], dim=1).tolist()
    contiguous = all(n == 0 or hi - lo + 1 == n for n, lo, hi in rows)
    per_head = [budget.head_tokens_for(int(n), heads or 1) for n, _, _ in rows]
    k_rows = tuple(max(kr) for kr in per_head)
    bounds = [[[lo, lo + n, kr] if n else [0, 0, 0] for kr in krs] for (n, lo, _), krs in zip(rows, per_head)]
    bounds = torch.tensor(bounds, dtype=torch.int32).reshape(shape).to(key_valid.device, non_blocking=True)
    return SelectPlan(budget, max(k_rows), k_rows, bounds, contiguous)


def device_tokens_for(n_valid: torch.Tensor, budget: Budget, num_heads: int | None = None) -> torch.Tensor:
    """Budget.tokens_for on a device tensor of valid counts [B] -> [B] int64, with no host read; with
    `num_heads`, per KV head -> [B, num_heads] (each head's fraction where the budget has per-head ones).

    Same arithmetic as the host version (float64 ceil of amount * n - 1e-9), so the two agree exactly.
    """
    n = n_valid.to(torch.int64)
    if num_heads is not None:
        if budget.heads is not None and len(budget.heads) != num_heads:
            raise ValueError(f"the budget has fractions for {len(budget.heads)} KV heads, not {num_heads}")
        n = n[:, None].expand(-1, num_heads)
    elif budget.heads is not None:
        raise ValueError("a budget with per-head fractions needs num_heads")
    if budget.heads is not None:
        amount = torch.tensor(budget.heads, dtype=torch.float64, device=n.device)
        wanted = torch.ceil(amount * n.to(torch.float64) - 1e-9).to(torch.int64)
    elif budget.is_fraction:
        wanted = torch.ceil(budget.amount * n.to(torch.float64) - 1e-9).to(torch.int64)
    else:
        wanted = torch.full_like(n, int(budget.amount))
    return _tokens_rule(wanted, n, budget)


def device_head_tokens(n_valid: torch.Tensor, fractions: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Per-head fractions [L, Hkv] float64 (a head budget profile's, all layers at once) and valid
    counts [B] -> tokens read [L, B, Hkv] int64, as Budget(heads=fractions[l]).tokens_for would give."""
    n = n_valid.to(torch.int64)[None, :, None]  # [1, B, 1]
    wanted = torch.ceil(fractions[:, None, :] * n.to(torch.float64) - 1e-9).to(torch.int64)
    return _tokens_rule(wanted, n, budget)


def _tokens_rule(wanted: torch.Tensor, n: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Budget.tokens_for's rule after the amount: raised to the forced keys and min_tokens, capped at n."""
    wanted = torch.maximum(wanted, torch.clamp(n, max=budget.sink + budget.window))
    wanted = torch.clamp(wanted, min=budget.min_tokens)
    return torch.minimum(wanted, n)


def plan_from_lengths(lengths: torch.Tensor, budget: Budget, k: int, bounds: torch.Tensor | None = None) -> SelectPlan:
    """A SelectPlan for rows whose valid keys are positions [0, lengths[b]), built on the device.

    No device-to-host read, so it can sit inside a CUDA graph: `k` (the output width) is fixed by the
    caller and must be at least every row's token count (Budget.tokens_for of the largest length the
    plan will serve); rows that read fewer get -1 tails. `bounds` [B, 3] int32, if given, is written in
    place (a static buffer for graph replays).
    """
    k_rows = device_tokens_for(lengths, budget)  # [B]
    rows = torch.stack([torch.zeros_like(k_rows), lengths.to(torch.int64), k_rows], dim=1).to(torch.int32)
    if bounds is None:
        bounds = rows
    else:
        bounds.copy_(rows)
    return SelectPlan(budget, int(k), (int(k),) * lengths.shape[0], bounds, True)


@_triton.kernel
def _popc(v, HW: tl.constexpr):
    """Set bits of each int32 word: the hardware instruction, or SWAR under the interpreter."""
    if HW:
        return libdevice.popc(v)
    v = v - ((v >> 1) & 0x55555555)  # the masks keep arithmetic shifts exact
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    return (v + (v >> 16)) & 0x3F


@_triton.kernel
def _store_picked(ptr, value, picked, HW: tl.constexpr):
    """value (int64) at ptr where picked. On the GPU as inline PTX: a plain tl.store at data-dependent
    addresses makes the compiler move pointers, values and masks through shared memory into a layout
    of its own (three barriers and ~12 instructions a key, in SASS); the predicated store stays in the
    scan's layout."""
    if HW:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b64 [$1], $2; mov.u32 $0, 0; }",
            "=r,l,l,r", [ptr.to(tl.int64, bitcast=True), value, picked.to(tl.int32)], dtype=tl.int32,
            is_pure=False, pack=1)
    else:
        tl.store(ptr, value, mask=picked)


@_triton.kernel
def _load_codes(row_ptr, t, lo, hi, word, W: tl.constexpr, W_PAD: tl.constexpr):
    """Codes [BT, W_PAD] int32 of the keys at positions t in [lo, hi) (the scored ones); 0 elsewhere."""
    scored = (t >= lo) & (t < hi)
    if W == W_PAD:  # no word mask, so the loads stay 16-byte vectors
        mask = scored[:, None]
    else:
        mask = scored[:, None] & (word[None, :] < W)
    return tl.load(row_ptr + t[:, None] * W + word[None, :], mask=mask, other=0, eviction_policy="evict_first")


@_triton.kernel
def _block_scores(codes, majority, plane0, plane1, plane2, plane3, plane4, NP: tl.constexpr, HW_POPC: tl.constexpr):
    """Codes [BT, W_PAD] -> shifted scores x [BT] (module docstring)."""
    agree = ~(codes ^ majority[None, :])  # [BT, W_PAD]
    x = _sum(_popc(agree & plane0[None, :], HW_POPC), axis=1)  # [BT] in [0, bits * (G >> PAR)]
    if NP > 1:
        x += _sum(_popc(agree & plane1[None, :], HW_POPC), axis=1) * 2
    if NP > 2:
        x += _sum(_popc(agree & plane2[None, :], HW_POPC), axis=1) * 4
    if NP > 3:
        x += _sum(_popc(agree & plane3[None, :], HW_POPC), axis=1) * 8
    if NP > 4:
        x += _sum(_popc(agree & plane4[None, :], HW_POPC), axis=1) * 16
    return x


@_triton.kernel
def _packed_add(acc0, acc1, acc2, acc3, acc4, f, counted, N: tl.constexpr):
    """Add 1 per counted key to bin f (0 <= f < 4 N) of N packed counters [BT] int32: bin f is the 8-bit
    field f % 4 of counter f // 4, kept per key slot (a slot may count 255 keys at most). A few integer
    instructions a key, against tl.histogram's ballots per bit of the bin index (Triton 3.6)."""
    one = tl.where(counted, 1 << ((f & 3) * 8), 0)
    q = f >> 2
    acc0 += tl.where(q == 0, one, 0)
    if N > 1:
        acc1 += tl.where(q == 1, one, 0)
    if N > 2:
        acc2 += tl.where(q == 2, one, 0)
    if N > 3:
        acc3 += tl.where(q == 3, one, 0)
    if N > 4:
        acc4 += tl.where(q == 4, one, 0)
    return acc0, acc1, acc2, acc3, acc4


@_triton.kernel
def _packed_hist(acc0, acc1, acc2, acc3, acc4, NB: tl.constexpr, N: tl.constexpr):
    """The N packed counters of _packed_add -> their histogram [NB] int32 (NB >= 4 N): each field is
    unpacked per key slot first, then summed in int32."""
    bins = tl.arange(0, NB)
    hist = tl.full([NB], 0, tl.int32)
    for field in tl.static_range(4):
        hist += tl.where(bins == field, _sum((acc0 >> (8 * field)) & 0xFF, axis=0), 0)
        if N > 1:
            hist += tl.where(bins == 4 + field, _sum((acc1 >> (8 * field)) & 0xFF, axis=0), 0)
        if N > 2:
            hist += tl.where(bins == 8 + field, _sum((acc2 >> (8 * field)) & 0xFF, axis=0), 0)
        if N > 3:
            hist += tl.where(bins == 12 + field, _sum((acc3 >> (8 * field)) & 0xFF, axis=0), 0)
        if N > 4:
            hist += tl.where(bins == 16 + field, _sum((acc4 >> (8 * field)) & 0xFF, axis=0), 0)
    return hist


@_triton.kernel
def _nibble_add(acc, f, counted):
    """_packed_add with 4-bit fields in one int64 counter [BT]: bin f (0 <= f < 16) is field f, so a
    key slot may count 15 keys at most; one 64-bit shift and add a key."""
    return acc + tl.where(counted, tl.full(f.shape, 1, tl.int64) << ((f & 15) * 4).to(tl.int64), 0)


@_triton.kernel
def _nibble_hist(acc, NB: tl.constexpr):
    """The counter of _nibble_add -> its histogram [NB] int32 (NB <= 16)."""
    bins = tl.arange(0, NB)
    hist = tl.full([NB], 0, tl.int32)
    for field in tl.static_range(16):
        hist += tl.where(bins == field, _sum(((acc >> (4 * field)) & 15).to(tl.int32), axis=0), 0)
    return hist


@_triton.kernel
def _guess_bin(x, c, GUESS: tl.constexpr, SHIFT: tl.constexpr):
    """Pass 1's bin of scores x: x >> SHIFT, or with GUESS the bins around the predicted threshold c
    (GUESS 1: GUESS_EXACT, GUESS_BANDS; 2: GUESS_WIDE exact bins): ordered as the scores, so the bins
    above a bin hold the higher scores."""
    if GUESS == 2:
        return tl.minimum(tl.maximum(x - c + 9, 0), 18)  # 9: GUESS_CENTER
    elif GUESS == 1:
        d = x - c
        a = tl.abs(d)
        v = a - 4 + 1  # a - (GUESS_EXACT + 1) + 2: 2 at the first band's first score
        side = 4 + 1 + (v >= 4).to(tl.int32) + (v >= 8).to(tl.int32) + (v >= 16).to(tl.int32) + (v >= 32).to(tl.int32)
        return tl.where(a <= 4, 9 + d, tl.where(d > 0, 9 + side, 9 - side))  # 9: GUESS_CENTER
    else:
        return x >> SHIFT


@_triton.kernel
def _score_block_masked(
    k_row, score_row, t, start, end, lo, hi, T, sink, window, majority, plane0, plane1, plane2, plane3, plane4,
    hist, n_forced, word, c, W: tl.constexpr, W_PAD: tl.constexpr, NP: tl.constexpr, SHIFT: tl.constexpr,
    NBC: tl.constexpr, HW_POPC: tl.constexpr, FORCED: tl.constexpr, GUESS: tl.constexpr,
):
    """One block of keys t [BT] that may hold forced, padding or out-of-row keys -> (hist, n_forced)."""
    codes = _load_codes(k_row, t, lo, hi, word, W, W_PAD)
    valid = (t >= start) & (t < end)
    forced = valid & ((t < start + sink) | (t >= end - window))
    candidate = valid & ~forced
    x = _block_scores(codes, majority, plane0, plane1, plane2, plane3, plane4, NP, HW_POPC)
    stored = tl.where(forced, FORCED, tl.where(candidate, x, -1))
    tl.store(score_row + t, stored.to(tl.int16), mask=t < T)
    return hist + tl.histogram(_guess_bin(x, c, GUESS, SHIFT), NBC, mask=candidate), n_forced + forced.to(tl.int32)


@_triton.kernel
def _score_chunk(
    q_ptr, k_ptr, bounds_ptr, score_ptr, hist_ptr, forced_ptr, guess_ptr, row, chunk,
    stride_qb, stride_qk, stride_qg, stride_kb, stride_kh, stride_bb, stride_bh,
    num_kv_heads, T, score_stride, bits, sink, window, n_chunks, chunk_blocks,
    G: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, G_PAD: tl.constexpr,
    PAR: tl.constexpr, NP: tl.constexpr, SHIFT: tl.constexpr, NBC: tl.constexpr,
    BT: tl.constexpr, HW_POPC: tl.constexpr, FORCED: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
    CP: tl.constexpr, GUESS: tl.constexpr,
):
    """Pass 1's scoring of one chunk of row = b * Hkv + h: writes score[row, t] int16 (x, FORCED, or -1
    for padding), hist[row, chunk, NBC] and forced[row, chunk]; returns the row's k_row and, for
    GUESS, the predicted threshold c and the spread terms m, s it came from (0 without GUESS)."""
    b = row // num_kv_heads
    h = row % num_kv_heads
    bound = bounds_ptr + b * stride_bb + h * stride_bh  # [B, 3] (stride_bh 0) or per head [B, Hkv, 3]
    start = tl.load(bound)
    end = tl.load(bound + 1)
    k_row = tl.load(bound + 2)

    # Query side, once per program: majority bits and the |d| planes of this KV head's G query heads.
    g = tl.arange(0, G_PAD)
    word = tl.arange(0, W_PAD)
    bit = tl.arange(0, 32)
    q_off = b.to(tl.int64) * stride_qb + h * stride_qk + g[:, None] * stride_qg + word[None, :]
    q = tl.load(q_ptr + q_off, mask=(g[:, None] < G) & (word[None, :] < W), other=0)  # [G_PAD, W_PAD]
    n1 = _sum((q[:, :, None] >> bit[None, None, :]) & 1, axis=0)  # [W_PAD, 32]
    d = 2 * n1 - G
    real_bit = (word[:, None] * 32 + bit[None, :]) < bits
    one_at = 1 << bit[None, :]  # [1, 32]; distinct bits, so summing them packs a word
    majority = _sum(tl.where((d > 0) & real_bit, one_at, 0), axis=1)  # [W_PAD]
    e = tl.where(real_bit, tl.abs(d) >> PAR, 0)  # [W_PAD, 32], at most G >> PAR < 32
    # Planes as separate [W_PAD] words (not one [NP, W_PAD] tensor): the scoring below then stays 2-D
    # with each key's words in one thread, and needs no layout conversion.
    plane0 = _sum(tl.where((e & 1) != 0, one_at, 0), axis=1)
    plane1 = _sum(tl.where((e & 2) != 0, one_at, 0), axis=1)
    plane2 = _sum(tl.where((e & 4) != 0, one_at, 0), axis=1)
    plane3 = _sum(tl.where((e & 8) != 0, one_at, 0), axis=1)
    plane4 = _sum(tl.where((e & 16) != 0, one_at, 0), axis=1)
    m = tl.full([], 0.0, tl.float32)
    s = m
    c = tl.full([], 0, tl.int32)
    if GUESS:  # c = m + r s: m, s the mean and spread of x over random keys, r the row's residual last step
        ef = e.to(tl.float32)
        m = _sum(_sum(ef, axis=1), axis=0) * 0.5
        s = tl.sqrt(_sum(_sum(ef * ef, axis=1), axis=0)) * 0.5
        r = tl.load(guess_ptr + row)
        r = tl.where(r == r, tl.minimum(tl.maximum(r, -64.0), 64.0), 2.0)  # NaN: the start value
        c = tl.floor(m + r * s + 0.5).to(tl.int32)

    row_off = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    score_row = score_ptr + row.to(tl.int64) * score_stride
    hist = tl.full([NBC], 0, tl.int32)
    n_forced = tl.full([BT], 0, tl.int32)
    t0 = chunk * chunk_blocks * BT
    lo = start + sink  # scored keys: valid, past the sinks, before the window, inside this chunk
    hi = tl.minimum(end - window, t0 + chunk_blocks * BT)
    if SPLIT:
        # Blocks wholly inside [lo, hi) (almost all of them) hold no forced, padding or out-of-row key:
        # they run without the per-key masks. The blocks [0, first) and [last, chunk_blocks) run masked.
        first = tl.minimum(tl.maximum(lo - t0 + BT - 1, 0) // BT, chunk_blocks)
        last = tl.maximum(tl.minimum(tl.maximum(hi - t0, 0) // BT, chunk_blocks), first)
        for blk in range(0, first):
            hist, n_forced = _score_block_masked(
                k_ptr + row_off, score_row, t0 + blk * BT + tl.arange(0, BT), start, end, lo, hi, T, sink, window,
                majority, plane0, plane1, plane2, plane3, plane4, hist, n_forced, word, c,
                W, W_PAD, NP, SHIFT, NBC, HW_POPC, FORCED, GUESS)
        t_next = t0 + first * BT + tl.arange(0, BT)
        codes_next = _load_codes(k_ptr + row_off, t_next, lo, hi, word, W, W_PAD)
        c0 = tl.full([BT], 0, tl.int32)  # CP > 0: _packed_add's counters of the interior blocks
        c1 = c0
        c2 = c0
        c3 = c0
        c4 = c0
        for blk in range(first, last):
            t = t_next
            codes = codes_next
            t_next = t + BT
            codes_next = _load_codes(k_ptr + row_off, t_next, lo, hi, word, W, W_PAD)  # next block in flight
            x = _block_scores(codes, majority, plane0, plane1, plane2, plane3, plane4, NP, HW_POPC)
            tl.store(score_row + t, x.to(tl.int16))
            f = _guess_bin(x, c, GUESS, SHIFT)
            if CP > 0:
                c0, c1, c2, c3, c4 = _packed_add(c0, c1, c2, c3, c4, f, True, CP)
            else:
                hist += tl.histogram(f, NBC)
        if CP > 0:
            hist += _packed_hist(c0, c1, c2, c3, c4, NBC, CP)
        for blk in range(last, chunk_blocks):
            hist, n_forced = _score_block_masked(
                k_ptr + row_off, score_row, t0 + blk * BT + tl.arange(0, BT), start, end, lo, hi, T, sink, window,
                majority, plane0, plane1, plane2, plane3, plane4, hist, n_forced, word, c,
                W, W_PAD, NP, SHIFT, NBC, HW_POPC, FORCED, GUESS)
    else:
        t_next = t0 + tl.arange(0, BT)
        if PREFETCH:
            codes_next = _load_codes(k_ptr + row_off, t_next, lo, hi, word, W, W_PAD)
        for blk in range(0, chunk_blocks):
            t = t_next
            t_next = t + BT
            if PREFETCH:  # keep two blocks of codes in flight: issue the next loads before scoring this block
                codes = codes_next
                codes_next = _load_codes(k_ptr + row_off, t_next, lo, hi, word, W, W_PAD)
            else:
                codes = _load_codes(k_ptr + row_off, t, lo, hi, word, W, W_PAD)
            in_row = t < T
            valid = (t >= start) & (t < end)
            forced = valid & ((t < start + sink) | (t >= end - window))
            candidate = valid & ~forced
            x = _block_scores(codes, majority, plane0, plane1, plane2, plane3, plane4, NP, HW_POPC)
            stored = tl.where(forced, FORCED, tl.where(candidate, x, -1))
            tl.store(score_row + t, stored.to(tl.int16), mask=in_row)
            hist += tl.histogram(_guess_bin(x, c, GUESS, SHIFT), NBC, mask=candidate)
            n_forced += forced.to(tl.int32)

    cells = (row * n_chunks + chunk) * NBC
    tl.store(hist_ptr + cells + tl.arange(0, NBC), hist)
    tl.store(forced_ptr + row * n_chunks + chunk, _sum(n_forced, axis=0))
    return k_row, c, m, s


@_triton.kernel
def _split_ties(emit_ptr, row, n_chunks, c, c_ok, settled, tied, ties_taken):
    """Each chunk's output offset and tied keys to skip (emit[row, chunk, 0:2]), from its sure picks
    `settled` [MAXC] (forced keys and those above the threshold), its keys at the threshold `tied`
    [MAXC] and how many of all ties are taken: the most recent ones, so quotas go from the last chunk
    backwards."""
    later = _sum(tied, axis=0) - _cumsum(tied, axis=0)  # tied keys in later chunks
    take = tl.minimum(tl.maximum(ties_taken - later, 0), tied)
    picked = settled + take
    tl.store(emit_ptr + (row * n_chunks + c) * 2, _cumsum(picked, axis=0) - picked, mask=c_ok)
    tl.store(emit_ptr + (row * n_chunks + c) * 2 + 1, tied - take, mask=c_ok)


@_triton.kernel
def _update_guess(guess_ptr, row, threshold, need, m, s):
    """The row's running residual for the next step's prediction (GUESS): r += GUESS_SMOOTH (r_step - r)
    with r_step = (threshold - m) / s, or r = r_step on a fresh row (NaN). (0.4 written out: the kernels
    take no float globals.)"""
    if (need > 0) & (s > 0):
        old = tl.load(guess_ptr + row, cache_modifier=".cg")
        step = (threshold.to(tl.float32) - m) / s
        tl.store(guess_ptr + row, tl.where(old == old, old + 0.4 * (step - old), step))


@_triton.kernel
def _score_reduce(
    hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks, k_row, center, m, s,
    SHIFT: tl.constexpr, NBC: tl.constexpr, MAXC: tl.constexpr, FORCED: tl.constexpr, GUESS: tl.constexpr,
):
    """Pass 1's end, run by the row's last chunk: from every chunk's histogram, the bin holding the
    row's k-th best score. Writes base[row, chunk] (forced + keys above that bin) and state[row]:
    0 lo and 3 hi, the bin's scores [lo, hi); 1 keys still needed from it; 4 the mode of what
    follows: 1 exact counts inside [lo, hi) (pass 2), 0 nothing (GUESS, the bin held one score: the
    threshold, state 2, and the emit offsets are written here), 2 a recount in coarse buckets first
    (GUESS, the k-th score fell outside the bands around the prediction)."""
    c = tl.arange(0, MAXC)
    bins = tl.arange(0, NBC)
    c_ok = c < n_chunks
    counts = tl.load(
        hist_ptr + (row * n_chunks + c[:, None]) * NBC + bins[None, :], mask=c_ok[:, None], other=0,
        cache_modifier=".cg",
    )  # [MAXC, NBC]
    forced_c = tl.load(forced_ptr + row * n_chunks + c, mask=c_ok, other=0, cache_modifier=".cg")
    need = k_row - _sum(forced_c, axis=0)  # keys to pick by score
    total = _sum(counts, axis=0)  # [NBC]
    at_least = _sum(total, axis=0) - _cumsum(total, axis=0) + total  # keys in bucket >= each bin
    bucket = _max(tl.where(at_least >= need, bins, -1), axis=0)
    bucket = tl.where(need > 0, bucket, NBC)  # NBC: nothing to pick by score
    above = _sum(tl.where(bins[None, :] > bucket, counts, 0), axis=1)  # [MAXC]
    if GUESS:  # the bins of _guess_bin: GUESS_CENTER 9, GUESS_EXACT 4, GUESS_BANDS 4 (GUESS 1), GUESS_WIDE 8 (2)
        k = tl.abs(bucket - 9)
        if GUESS == 2:  # exact bins, then the open ones: past them, the recount
            exact = k <= 8
            lo = center + bucket - 9
            hi = lo + 1
            mode = tl.where(exact | (need <= 0), 0, 2)
        else:
            exact = k <= 4
            j = tl.minimum(tl.maximum(k - 5, 0), 4)  # the band: widths 2 << j
            a_lo = 3 + (2 << j)  # the band's distances from the center, [a_lo, a_hi)
            a_hi = 3 + (4 << j)
            up = bucket > 9
            lo = tl.where(exact, center + bucket - 9, tl.where(up, center + a_lo, center - a_hi + 1))
            hi = tl.where(exact, lo + 1, tl.where(up, center + a_hi, center - a_lo + 1))
            mode = tl.where(exact | (need <= 0), 0, tl.where(k - 5 < 4, 1, 2))
        lo = tl.maximum(lo, 0)  # padding's -1 stays outside
        hi = tl.minimum(hi, FORCED)
        tl.store(stats_ptr + row * 2, m)
        tl.store(stats_ptr + row * 2 + 1, s)
        if mode == 0:
            tied = _sum(tl.where(bins[None, :] == bucket, counts, 0), axis=1)  # [MAXC]
            threshold = tl.where(need > 0, lo, FORCED - 1)  # FORCED - 1: no score is that high
            _split_ties(emit_ptr, row, n_chunks, c, c_ok, forced_c + above, tied, need - _sum(above, axis=0))
            tl.store(state_ptr + row * 8 + 2, threshold)
            _update_guess(guess_ptr, row, threshold, need, m, s)
    else:
        lo = bucket << SHIFT
        hi = tl.minimum((bucket + 1) << SHIFT, FORCED)
        mode = tl.full([], 1, tl.int32)
    tl.store(base_ptr + row * n_chunks + c, forced_c + above, mask=c_ok)
    tl.store(state_ptr + row * 8, lo)
    tl.store(state_ptr + row * 8 + 1, need - _sum(above, axis=0))
    tl.store(state_ptr + row * 8 + 3, hi)
    tl.store(state_ptr + row * 8 + 4, mode)


@_triton.kernel
def _row_k(bounds_ptr, row, num_kv_heads, stride_bb, stride_bh):
    """Keys row = b * Hkv + h reads (its k_row in the plan's bounds, [B, 3] or per head [B, Hkv, 3])."""
    return tl.load(bounds_ptr + (row // num_kv_heads) * stride_bb + (row % num_kv_heads) * stride_bh + 2)


@_triton.kernel
def _last_arrival(counter, n_chunks):
    """Count this program in at its row's counter (after its own stores); whether it arrived last."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel") == n_chunks - 1


@_triton.kernel
def _score_kernel(
    q_ptr, k_ptr, bounds_ptr, score_ptr, hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr,
    counter_ptr, stride_qb, stride_qk, stride_qg, stride_kb, stride_kh, stride_bb, stride_bh,
    num_kv_heads, T, score_stride, bits, sink, window, n_chunks, chunk_blocks,
    G: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, G_PAD: tl.constexpr,
    PAR: tl.constexpr, NP: tl.constexpr, SHIFT: tl.constexpr, NBC: tl.constexpr, MAXC: tl.constexpr,
    BT: tl.constexpr, HW_POPC: tl.constexpr, FORCED: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
    CP: tl.constexpr, GUESS: tl.constexpr,
):
    """Pass 1 for chunk program_id(0) of row program_id(1) = b * Hkv + h (_score_chunk); the row's last
    chunk to finish reduces every chunk's counts (_score_reduce; release/acquire through the counter)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    k_row, center, m, s = _score_chunk(
        q_ptr, k_ptr, bounds_ptr, score_ptr, hist_ptr, forced_ptr, guess_ptr, row, chunk,
        stride_qb, stride_qk, stride_qg, stride_kb, stride_kh, stride_bb, stride_bh,
        num_kv_heads, T, score_stride, bits, sink, window, n_chunks, chunk_blocks,
        G, W, W_PAD, G_PAD, PAR, NP, SHIFT, NBC, BT, HW_POPC, FORCED, PREFETCH, SPLIT, CP, GUESS,
    )
    if _last_arrival(counter_ptr + row, n_chunks):
        _score_reduce(hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks, k_row,
                      center, m, s, SHIFT, NBC, MAXC, FORCED, GUESS)
        tl.atomic_xchg(counter_ptr + row, 0)


@_triton.kernel
def _recount_counts(
    score_row, t0, stop, SHIFT: tl.constexpr, NBC: tl.constexpr, BT: tl.constexpr, FORCED: tl.constexpr,
    RP: tl.constexpr,
):
    """The recount (GUESS mode 2): the coarse buckets x >> SHIFT of the keys of [t0, stop), from their
    scores -> hist [NBC]; in RP packed counters (_packed_add) where the launcher allows, else
    tl.histogram."""
    hist = tl.full([NBC], 0, tl.int32)
    acc = tl.full([BT], 0, tl.int32)
    c0 = acc
    c1 = acc
    c2 = acc
    c3 = acc
    c4 = acc
    for start in range(t0, stop, BT):
        t = start + tl.arange(0, BT)
        s = tl.load(score_row + t, mask=t < stop, other=-1).to(tl.int32)
        counted = (s >= 0) & (s < FORCED)
        if RP > 0:
            c0, c1, c2, c3, c4 = _packed_add(c0, c1, c2, c3, c4, tl.where(counted, s, 0) >> SHIFT, counted, RP)
        else:
            hist += tl.histogram(tl.maximum(s, 0) >> SHIFT, NBC, mask=counted)
    if RP > 0:
        hist = _packed_hist(c0, c1, c2, c3, c4, NBC, RP)
    return hist


@_triton.kernel
def _recount_reduce(
    hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, bounds_ptr, row, n_chunks,
    num_kv_heads, stride_bb, stride_bh, SHIFT: tl.constexpr, NBC: tl.constexpr, MAXC: tl.constexpr, FORCED: tl.constexpr,
):
    """The recount's end, run by the row's last chunk: the coarse bucket, as pass 1 finds it without
    GUESS (mode 1)."""
    zero = tl.full([], 0, tl.int32)
    _score_reduce(hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks,
                  _row_k(bounds_ptr, row, num_kv_heads, stride_bb, stride_bh), zero, zero.to(tl.float32),
                  zero.to(tl.float32), SHIFT, NBC, MAXC, FORCED, 0)


@_triton.kernel
def _recount_kernel(
    score_ptr, hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, bounds_ptr, counter_ptr,
    num_kv_heads, stride_bb, stride_bh, T, score_stride, n_chunks, chunk_tokens,
    SHIFT: tl.constexpr, NBC: tl.constexpr, MAXC: tl.constexpr, BT: tl.constexpr, FORCED: tl.constexpr,
    RP: tl.constexpr,
):
    """The recount for chunk program_id(0) of row program_id(1), where pass 1 left mode 2 (else
    nothing); the row's last chunk finds the coarse bucket as pass 1 does without GUESS (mode 1)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    if tl.load(state_ptr + row * 8 + 4) == 2:
        t0 = chunk * chunk_tokens
        hist = _recount_counts(score_ptr + row.to(tl.int64) * score_stride, t0, tl.minimum(t0 + chunk_tokens, T),
                               SHIFT, NBC, BT, FORCED, RP)
        tl.store(hist_ptr + (row * n_chunks + chunk) * NBC + tl.arange(0, NBC), hist)
        if _last_arrival(counter_ptr + row, n_chunks):
            _recount_reduce(hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, bounds_ptr, row,
                            n_chunks, num_kv_heads, stride_bb, stride_bh, SHIFT, NBC, MAXC, FORCED)
            tl.atomic_xchg(counter_ptr + row, 0)


@_triton.kernel
def _refine_counts(
    score_row, state_ptr, row, t0, stop,
    FB: tl.constexpr, BT: tl.constexpr, PACKED: tl.constexpr,
):
    """Pass 2's counting: the keys of [t0, stop) whose scores fall inside the row's threshold bucket,
    per exact score -> fine [FB]."""
    # .cg: in the fused kernels, written just now. The bucket's scores are [lo, hi) (hi - lo <= FB);
    # padding (-1) and FORCED fall outside.
    lo = tl.load(state_ptr + row * 8, cache_modifier=".cg")
    hi = tl.load(state_ptr + row * 8 + 3, cache_modifier=".cg")
    fine = tl.full([FB], 0, tl.int32)
    # PACKED (FB <= 16): counters kept per key slot across the loop and reduced once at the end,
    # _nibble_add's (PACKED 4: a slot sees at most 15 blocks, see the launcher) or _packed_add's
    # (PACKED 8: at most 255).
    acc0 = tl.full([BT], 0, tl.int32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    nib = tl.full([BT], 0, tl.int64)  # PACKED == 4: _nibble_add's counter
    t_next = t0 + tl.arange(0, BT)
    s_next = tl.load(score_row + t_next, mask=t_next < stop, other=-1)
    for _ in range(t0, stop, BT):
        s = s_next.to(tl.int32)
        t_next += BT
        s_next = tl.load(score_row + t_next, mask=t_next < stop, other=-1)  # next block in flight
        inside = (s >= lo) & (s < hi)
        f = s - lo
        if PACKED == 4:
            nib = _nibble_add(nib, f, inside)
        elif PACKED == 8:
            acc0, acc1, acc2, acc3, _ = _packed_add(acc0, acc1, acc2, acc3, acc0, f, inside, (FB + 3) // 4)
        else:
            fine += tl.histogram(f, FB, mask=inside)
    if PACKED == 4:
        fine = _nibble_hist(nib, FB)
    elif PACKED == 8:
        fine = _packed_hist(acc0, acc1, acc2, acc3, acc0, FB, (FB + 3) // 4)
    return fine


@_triton.kernel
def _refine_reduce(
    fine_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks,
    FB: tl.constexpr, MAXC: tl.constexpr, FORCED: tl.constexpr, GUESS: tl.constexpr,
):
    """Pass 2's end, run by the row's last chunk: from every chunk's fine counts, the threshold score
    (state[row, 2]) and each chunk's output offset and tied keys to skip (emit[row, chunk, 0:2]);
    with GUESS, the row's residual for the next step."""
    lo = tl.load(state_ptr + row * 8, cache_modifier=".cg")
    need = tl.load(state_ptr + row * 8 + 1, cache_modifier=".cg")
    fine_bins = tl.arange(0, FB)
    c = tl.arange(0, MAXC)
    c_ok = c < n_chunks
    counts = tl.load(
        fine_ptr + (row * n_chunks + c[:, None]) * FB + fine_bins[None, :], mask=c_ok[:, None], other=0,
        cache_modifier=".cg",
    )  # [MAXC, FB]
    base = tl.load(base_ptr + row * n_chunks + c, mask=c_ok, other=0, cache_modifier=".cg")
    total = _sum(counts, axis=0)
    at_least = _sum(total, axis=0) - _cumsum(total, axis=0) + total
    level = _max(tl.where(at_least >= need, fine_bins, -1), axis=0)  # need == 0: takes nothing
    above = _sum(tl.where(fine_bins[None, :] > level, counts, 0), axis=1)  # [MAXC]
    tied = _sum(tl.where(fine_bins[None, :] == level, counts, 0), axis=1)  # [MAXC]
    _split_ties(emit_ptr, row, n_chunks, c, c_ok, base + above, tied, need - _sum(above, axis=0))
    threshold = tl.where(need > 0, lo + level, FORCED - 1)  # FORCED - 1: no score is that high
    tl.store(state_ptr + row * 8 + 2, threshold)
    if GUESS:
        m = tl.load(stats_ptr + row * 2, cache_modifier=".cg")
        s = tl.load(stats_ptr + row * 2 + 1, cache_modifier=".cg")
        _update_guess(guess_ptr, row, threshold, need, m, s)


@_triton.kernel
def _refine_kernel(
    score_ptr, fine_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, counter_ptr,
    T, score_stride, n_chunks, chunk_tokens,
    FB: tl.constexpr, MAXC: tl.constexpr, BT: tl.constexpr, PACKED: tl.constexpr,
    FORCED: tl.constexpr, GUESS: tl.constexpr,
):
    """Pass 2 for chunk program_id(0) of row program_id(1): exact counts inside the threshold bucket,
    unless pass 1 settled the threshold (mode 0).

    Writes fine[row, chunk, FB]; the row's last chunk writes state[row, 2] = threshold x (FORCED - 1
    when nothing is picked by score) and emit[row, chunk, 0:2] = (output offset, tied keys to skip).
    """
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    if tl.load(state_ptr + row * 8 + 4) != 0:
        t0 = chunk * chunk_tokens
        score_row = score_ptr + row.to(tl.int64) * score_stride
        fine = _refine_counts(score_row, state_ptr, row, t0, tl.minimum(t0 + chunk_tokens, T), FB, BT, PACKED)
        tl.store(fine_ptr + (row * n_chunks + chunk) * FB + tl.arange(0, FB), fine)
        if _last_arrival(counter_ptr + row, n_chunks):
            _refine_reduce(fine_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks, FB, MAXC,
                           FORCED, GUESS)
            tl.atomic_xchg(counter_ptr + row, 0)


@_triton.kernel
def _emit_chunk(
    score_row, out_row, state_ptr, emit_ptr, bounds_ptr, row, chunk,
    num_kv_heads, stride_bb, stride_bh, T, k, chunk_tokens, n_chunks,
    BT: tl.constexpr, FORCED: tl.constexpr, HW: tl.constexpr,
):
    """Pass 3 for one chunk: out_row gets the chunk's picked positions (int64) at its offset, in
    position order; chunk 0 also fills the row's unused tail with -1. The row's threshold and the
    chunk's offset are read from L2 (.cg): in the fused kernel another program wrote them just now."""
    threshold = tl.load(state_ptr + row * 8 + 2, cache_modifier=".cg")
    offset = tl.load(emit_ptr + (row * n_chunks + chunk) * 2, cache_modifier=".cg")
    skip = tl.load(emit_ptr + (row * n_chunks + chunk) * 2 + 1, cache_modifier=".cg")  # the chunk's first `skip` ties stay out
    ties_seen = tl.full([], 0, tl.int32)
    t0 = chunk * chunk_tokens
    stop = tl.minimum(t0 + chunk_tokens, T)
    t_next = t0 + tl.arange(0, BT)
    s_next = tl.load(score_row + t_next, mask=t_next < stop, other=-1)
    for _ in range(t0, stop, BT):
        t = t_next
        s = s_next.to(tl.int32)
        t_next = t + BT
        s_next = tl.load(score_row + t_next, mask=t_next < stop, other=-1)  # next block in flight
        # 0 <= threshold < FORCED: padding (-1) is below it, sink/window keys (FORCED) above it.
        tie = s == threshold
        sure = s > threshold
        # One scan for both counts: ties in the high 16 bits, sure picks in the low 16 (BT <= 32768).
        both = (tie.to(tl.int32) << 16) | sure.to(tl.int32)
        running = _cumsum(both, axis=0)
        ties_upto = ties_seen + (running >> 16)  # ties of the chunk up to and including each key
        taken_before = tl.maximum(ties_seen - skip, 0)
        taken_upto = tl.maximum(ties_upto - skip, 0) - taken_before
        picked = sure | (tie & (ties_upto > skip))
        slot = offset + (running & 0xFFFF) + taken_upto - 1
        _store_picked(out_row + slot, t.to(tl.int64), picked, HW)
        total = _sum(both, axis=0)
        offset += (total & 0xFFFF) + tl.maximum(ties_seen + (total >> 16) - skip, 0) - taken_before
        ties_seen += total >> 16
    if chunk == 0:
        for tail in range(_row_k(bounds_ptr, row, num_kv_heads, stride_bb, stride_bh), k, BT):
            slot = tail + tl.arange(0, BT)
            tl.store(out_row + slot, tl.full([BT], -1, tl.int64), mask=slot < k)


@_triton.kernel
def _emit_kernel(
    score_ptr, state_ptr, emit_ptr, bounds_ptr, out_ptr,
    num_kv_heads, stride_bb, stride_bh, T, score_stride, k, chunk_tokens, n_chunks,
    BT: tl.constexpr, FORCED: tl.constexpr, HW: tl.constexpr,
):
    """Pass 3 for chunk program_id(0) of row program_id(1) (_emit_chunk)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    _emit_chunk(
        score_ptr + row.to(tl.int64) * score_stride, out_ptr + row.to(tl.int64) * k, state_ptr, emit_ptr, bounds_ptr,
        row, chunk, num_kv_heads, stride_bb, stride_bh, T, k, chunk_tokens, n_chunks, BT, FORCED, HW,
    )


@_triton.kernel
def _row_barrier(counters, flag, n_chunks):
    """Wait for every chunk of the row; returns whether this program arrived last (it then holds the
    row while the others wait: it reduces, then calls _row_release)."""
    last = _last_arrival(counters, n_chunks)
    if not last:
        while tl.atomic_add(counters + flag, 0, sem="acquire") == 0:
            pass
    return last


@_triton.kernel
def _row_release(counters, flag):
    """The last arrival's end of a barrier: reset the arrivals, raise the flag the others wait on."""
    tl.atomic_xchg(counters, 0)
    tl.debug_barrier()  # every thread's stores before the release
    tl.atomic_xchg(counters + flag, 1, sem="release")


@_triton.kernel
def _select_kernel(
    q_ptr, k_ptr, bounds_ptr, score_ptr, hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, fine_ptr,
    emit_ptr, out_ptr, counter_ptr, stride_qb, stride_qk, stride_qg, stride_kb, stride_kh, stride_bb, stride_bh,
    num_kv_heads, T, score_stride, bits, sink, window, k, n_chunks, chunk_blocks,
    G: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, G_PAD: tl.constexpr,
    PAR: tl.constexpr, NP: tl.constexpr, SHIFT: tl.constexpr, NBC: tl.constexpr, MAXC: tl.constexpr,
    BT: tl.constexpr, HW_POPC: tl.constexpr, FORCED: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
    CP: tl.constexpr,
    FB: tl.constexpr, BT_REFINE: tl.constexpr, BT_EMIT: tl.constexpr, PACKED: tl.constexpr, SCORE: tl.constexpr,
    ASM_STORE: tl.constexpr, GUESS: tl.constexpr, RP: tl.constexpr,
):
    """The passes in one launch (CUDA only; the launcher checks that every program is resident): all
    three with SCORE, else passes 2 and 3 after _score_kernel (the score arguments then go unused).

    Each chunk scores, waits for its row's bucket, counts inside it from the scores it has just
    written (in L2), waits for the threshold, emits; with GUESS the row's mode after pass 1 (the same
    for all its chunks) may skip the counts (0) or add a recount before them (2). At each wait the
    last chunk of the row to arrive reduces every chunk's counts and raises the row's flag; the
    others wait for it. Counters per row (COUNTERS): arrivals (reset by each barrier's last arrival
    before it raises its flag, so the next barrier counts from zero), flag 1, flag 2, departures,
    the recount's flag; the last chunk to leave lowers the flags, so the counters end at zero.
    """
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    counters = counter_ptr + row * 5
    if SCORE:
        k_row, center, m, s = _score_chunk(
            q_ptr, k_ptr, bounds_ptr, score_ptr, hist_ptr, forced_ptr, guess_ptr, row, chunk,
            stride_qb, stride_qk, stride_qg, stride_kb, stride_kh, stride_bb, stride_bh,
            num_kv_heads, T, score_stride, bits, sink, window, n_chunks, chunk_blocks,
            G, W, W_PAD, G_PAD, PAR, NP, SHIFT, NBC, BT, HW_POPC, FORCED, PREFETCH, SPLIT, CP, GUESS,
        )
        if _row_barrier(counters, 1, n_chunks):
            _score_reduce(hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks,
                          k_row, center, m, s, SHIFT, NBC, MAXC, FORCED, GUESS)
            _row_release(counters, 1)

    chunk_tokens = chunk_blocks * BT
    t0 = chunk * chunk_tokens
    stop = tl.minimum(t0 + chunk_tokens, T)
    score_row = score_ptr + row.to(tl.int64) * score_stride
    mode = tl.load(state_ptr + row * 8 + 4, cache_modifier=".cg")
    if GUESS:
        if mode == 2:
            hist = _recount_counts(score_row, t0, stop, SHIFT, NBC, BT_REFINE, FORCED, RP)
            tl.store(hist_ptr + (row * n_chunks + chunk) * NBC + tl.arange(0, NBC), hist)
            if _row_barrier(counters, 4, n_chunks):
                _recount_reduce(hist_ptr, forced_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, bounds_ptr,
                                row, n_chunks, num_kv_heads, stride_bb, stride_bh, SHIFT, NBC, MAXC, FORCED)
                _row_release(counters, 4)
    if mode != 0:
        fine = _refine_counts(score_row, state_ptr, row, t0, stop, FB, BT_REFINE, PACKED)
        tl.store(fine_ptr + (row * n_chunks + chunk) * FB + tl.arange(0, FB), fine)
        if _row_barrier(counters, 2, n_chunks):
            _refine_reduce(fine_ptr, base_ptr, state_ptr, stats_ptr, guess_ptr, emit_ptr, row, n_chunks, FB, MAXC,
                           FORCED, GUESS)
            _row_release(counters, 2)

    _emit_chunk(
        score_row, out_ptr + row.to(tl.int64) * k, state_ptr, emit_ptr, bounds_ptr,
        row, chunk, num_kv_heads, stride_bb, stride_bh, T, k, chunk_tokens, n_chunks, BT_EMIT, FORCED, ASM_STORE,
    )
    if _last_arrival(counters + 3, n_chunks):
        tl.atomic_xchg(counters + 1, 0)
        tl.atomic_xchg(counters + 2, 0)
        tl.atomic_xchg(counters + 4, 0)
        tl.atomic_xchg(counters + 3, 0)


def _score_select_triton(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    plan: SelectPlan,
    bits: int,
    *,
    block_tokens: int | None = None,
    emit_tokens: int = 1024,  # 56 registers fused at 8 warps: 4 programs per SM (4096-wide: 125, 2 per SM)
    emit_warps: int = 8,
    refine_tokens: int = 2048,
    refine_warps: int = 8,
    max_chunks: int = MAX_CHUNKS,
    programs_per_sm: int = 4,
    score_warps: int = 4,
    prefetch: bool = True,
    coarse_bins: int = COARSE_BINS,
    score_maxnreg: int | None = None,
    split_interior: bool = True,
    packed_coarse: bool = True,
    asm_store: bool = True,
    nibbles: bool = True,
    fuse: str = "all",
    guess: torch.Tensor | None = None,
    guess_bins: str = "bands",
) -> torch.Tensor:
    """Launcher: query_codes [B, Hq, 1, W] or grouped [B, Hkv, G, W] int32 (any strides but the last),
    key_codes [B, Hkv, T, W] int32 -> indices [B, Hkv, k]
    int64 (rows ascending, -1 tail). Needs plan.contiguous. The keyword arguments size the work of a
    program (tests shrink them to cover many chunks on small inputs; benchmarks tune them).

    fuse: "all" runs the three passes in one launch (_select_kernel), "tail" passes 2 and 3 (the
    same kernel, after _score_kernel), "none" three launches. Fusing is done only where it is safe: on a GPU, not
    in the interpreter (its programs run one after another, so one could never wait for another), and
    when the device holds every program of the launch at once (a program waits for its row's others);
    elsewhere the passes run as separate launches, with the same results.

    guess: each row's residual [B, Hkv] float32 (new_guess; read and updated in place), which predicts
    its threshold from the query before any key is read (module docstring). The picks are the same
    whatever it holds; a good prediction saves pass 2. guess_bins: "bands" (GUESS_EXACT exact bins, then
    bands) or "exact" (GUESS_WIDE exact bins a side, then the open bins)."""
    if fuse not in ("all", "tail", "none"):
        raise ValueError(f"fuse must be 'all', 'tail' or 'none', not {fuse!r}")
    _triton.bind(globals())
    b, w = query_codes.shape[0], query_codes.shape[-1]
    hkv, t = key_codes.shape[1], key_codes.shape[2]
    group = query_group(query_codes, hkv)
    device = key_codes.device
    out = torch.empty(b, hkv, plan.k, dtype=torch.int64, device=device)
    if plan.k == 0 or b == 0:
        return out
    if key_codes.stride(-1) != 1 or key_codes.stride(-2) != w:
        key_codes = key_codes.contiguous()
    if query_codes.stride(-1) != 1:
        query_codes = query_codes.contiguous()
    if query_codes.shape[2] == 1:  # per head [B, Hq, 1, W]: head h * G + g
        stride_qk, stride_qg = group * query_codes.stride(1), query_codes.stride(1)
    else:  # grouped [B, Hkv, G, W], read in place
        stride_qk, stride_qg = query_codes.stride(1), query_codes.stride(2)

    par = 1 if group % 2 == 0 else 0
    x_max = bits * (group >> par)
    shift = _shift_below(x_max, coarse_bins)
    packed_shift = _shift_below(x_max, 20)  # packed coarse counts: at most 20 bins (5 counters of four 8-bit fields)
    rows = b * hkv
    bt = block_tokens or (256 if device.type != "cuda" else 1024)
    blocks = cdiv(t, bt)
    target = _triton.num_programs_target(device) * programs_per_sm // 4
    gpu = device.type == "cuda" and not _triton.interpreting()
    # Fused, every program must be resident at once: whole chunks per row within the target (64 rows
    # on the H200: 8 chunks, 512 programs, where rounding up gave 576 and three launches).
    per_row = target // rows if gpu and fuse != "none" and target >= rows else cdiv(target, rows)
    chunks = max(1, min(per_row, max_chunks, blocks))
    chunk_blocks = cdiv(blocks, chunks)
    if chunk_blocks > 4:
        chunk_blocks = cdiv(chunk_blocks, 4) * 4  # lets passes 2 and 3 step 4 blocks at a time
    chunks = cdiv(blocks, chunk_blocks)
    chunk_tokens = chunk_blocks * bt
    bt_emit = bt * (chunk_blocks & -chunk_blocks)  # the largest power-of-two multiple of bt dividing a chunk
    bt_emit = max(min(bt_emit, emit_tokens), min(bt, emit_tokens))
    maxc = next_pow2(chunks)
    # Pass 1 counts its interior blocks in packed 8-bit fields (_packed_add) where a key slot sees at
    # most 255 of them and pass 2's bucket stays within its own packed counters (16 scores); then
    # its buckets are packed_shift's, and coarse_bins (tl.histogram's bins) does not apply.
    coarse_packed = 0
    if packed_coarse and chunk_blocks <= 255 and (1 << packed_shift) <= 16:
        coarse_packed = cdiv((x_max >> packed_shift) + 1, 4)
        shift, coarse_bins = packed_shift, next_pow2(4 * coarse_packed)
    fine_bins = max(1 << shift, 2)  # the scores of one bucket
    recount_packed = 0
    if guess_bins not in ("bands", "exact"):
        raise ValueError(f"guess_bins must be 'bands' or 'exact', not {guess_bins!r}")
    if guess is not None:
        if guess.shape != (b, hkv) or guess.dtype != torch.float32 or not guess.is_contiguous() or guess.device != device:
            raise ValueError(f"guess must be a contiguous float32 [{b}, {hkv}] tensor on {device}, "
                             f"not {guess.dtype} {tuple(guess.shape)} on {guess.device}")
        # Pass 1 counts GUESS_BINS bins around the prediction (packed where the plain pass would pack);
        # a recount falls back to the plain buckets (shift), and pass 2 takes the widest band (16 scores).
        coarse_bins = max(coarse_bins, next_pow2(GUESS_BINS))
        recount_packed = coarse_packed  # the recount's buckets are the plain pass 1's
        coarse_packed = cdiv(GUESS_BINS, 4) if coarse_packed else 0
        if guess_bins == "bands":
            fine_bins = max(fine_bins, 2 << (GUESS_BANDS - 1))

    i32 = dict(dtype=torch.int32, device=device)
    # Rows of the int16 score buffer start on 128-byte boundaries whatever T is: with an odd T the
    # compiler could not prove alignment and fell back to 2-byte stores and loads (2x slower, measured).
    t_stride = cdiv(t, 64) * 64
    scores = torch.empty(rows, t_stride, dtype=torch.int16, device=device)
    hist = torch.empty(rows, chunks, coarse_bins, **i32)
    forced = torch.empty(rows, chunks, **i32)
    base = torch.empty(rows, chunks, **i32)
    fine = torch.empty(rows, chunks, fine_bins, **i32)
    emit = torch.empty(rows, chunks, 2, **i32)
    state = torch.empty(rows, 8, **i32)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=device)
    guessing = 0 if guess is None else 1 if guess_bins == "bands" else 2
    guess = guess if guessing else stats  # unread without GUESS
    budget = plan.budget
    grid = (chunks, rows)
    score_meta = dict(
        G=group, W=w, W_PAD=next_pow2(w), G_PAD=next_pow2(group), PAR=par,
        NP=(group >> par).bit_length(), SHIFT=shift, NBC=coarse_bins, MAXC=maxc, BT=bt,
        HW_POPC=gpu, FORCED=FORCED, PREFETCH=prefetch, SPLIT=split_interior, CP=coarse_packed, GUESS=guessing,
        num_warps=score_warps, **({"maxnreg": score_maxnreg} if score_maxnreg else {}),
    )
    bounds = plan.bounds  # [B, 3], or per KV head [B, Hkv, 3]
    bound_strides = (bounds.stride(0), bounds.stride(1) if bounds.dim() == 3 else 0)
    strides = (query_codes.stride(0), stride_qk, stride_qg, key_codes.stride(0), key_codes.stride(1), *bound_strides)
    bt_refine = min(bt_emit, refine_tokens)
    # Pass 2's packed counts (a key slot counts one key a block): 4-bit fields where a chunk has at most
    # 15 blocks, else 8-bit fields up to 255 blocks, else tl.histogram.
    refine_blocks = cdiv(chunk_tokens, bt_refine)
    packed = 0 if fine_bins > 16 else 4 if nibbles and refine_blocks <= 15 else 8 if refine_blocks <= 255 else 0
    recount_packed = recount_packed if refine_blocks <= 255 else 0
    fusing = gpu and fuse != "none"
    if fusing:
        fused_args = (query_codes, key_codes, bounds, scores, hist, forced, base, state, stats, guess, fine, emit, out,
                      _triton.zeroed_counters(device, COUNTERS * rows), *strides,
                      hkv, t, t_stride, bits, budget.sink, budget.window, plan.k, chunks, chunk_blocks)
        fused_meta = dict(score_meta, FB=fine_bins, BT_REFINE=bt_refine, BT_EMIT=bt_emit, PACKED=packed,
                          ASM_STORE=gpu and asm_store, RP=recount_packed)
    if fusing and fuse == "all":
        meta = dict(fused_meta, SCORE=True)
        if chunks * rows <= _triton.resident_programs(_select_kernel, fused_args, meta, device):
            _select_kernel[grid](*fused_args, **meta)
            return out
    counters = _triton.zeroed_counters(device, rows)  # passes 1 and 2 each leave them at zero
    _score_kernel[grid](
        query_codes, key_codes, bounds, scores, hist, forced, base, state, stats, guess, emit, counters,
        *strides, hkv, t, t_stride, bits, budget.sink, budget.window, chunks, chunk_blocks, **score_meta,
    )
    if fusing:  # "tail", or "all" where the whole kernel did not fit
        meta = dict(fused_meta, SCORE=False, num_warps=emit_warps)
        meta.pop("maxnreg", None)
        if chunks * rows <= _triton.resident_programs(_select_kernel, fused_args, meta, device):
            _select_kernel[grid](*fused_args, **meta)
            return out
    if guessing:
        _recount_kernel[grid](
            scores, hist, forced, base, state, stats, guess, emit, bounds, counters, hkv, *bound_strides, t, t_stride,
            chunks, chunk_tokens, SHIFT=shift, NBC=coarse_bins, MAXC=maxc, BT=bt_refine, FORCED=FORCED,
            RP=recount_packed, num_warps=refine_warps,
        )
    _refine_kernel[grid](
        scores, fine, base, state, stats, guess, emit, counters, t, t_stride, chunks, chunk_tokens,
        FB=fine_bins, MAXC=maxc, BT=bt_refine, PACKED=packed, FORCED=FORCED, GUESS=guessing, num_warps=refine_warps,
    )
    _emit_kernel[grid](
        scores, state, emit, bounds, out, hkv, *bound_strides, t, t_stride, plan.k, chunk_tokens, chunks,
        BT=bt_emit, FORCED=FORCED, HW=gpu and asm_store, num_warps=emit_warps,
    )
    return out


def new_guess(batch: int, num_kv_heads: int, device: torch.device | str) -> torch.Tensor:
    """A fresh per-row residual buffer for score_select's `guess`: NaN, a row with no residual yet, which
    predicts from GUESS_START and then keeps the first residual it measures."""
    return torch.full((batch, num_kv_heads), float("nan"), dtype=torch.float32, device=device)


def _shift_below(x_max: int, bins: int) -> int:
    """The fewest right shifts that take every score in [0, x_max] below `bins` buckets."""
    shift = 0
    while (x_max >> shift) >= bins:
        shift += 1
    return shift


def kernel_serves(group: int, bits: int) -> bool:
    """Whether the kernels' shifted scores fit: int16 scores and at most 5 |d| planes (G < 64)."""
    scaled = group >> (1 - group % 2)
    return bits * scaled < FORCED - 1 and scaled < 32


def score_select(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    key_valid: torch.Tensor,
    budget: Budget,
    bits: int,
    *,
    plan: SelectPlan | None = None,
    use_kernel: bool | None = None,
    force_reference: bool = False,
) -> torch.Tensor:
    """Top-k by summed Hamming agreement. Shapes as in score_select_reference.

    The Triton kernels on CUDA tensors, the reference elsewhere (see _triton.use_kernel for the
    overrides) and whenever a row's valid keys are not one contiguous run. Pass `plan` (from
    plan_select(key_valid, budget), built once per decode step) to skip its device-to-host read.
    """
    if not _triton.use_kernel((query_codes, key_codes, key_valid), use_kernel, force_reference):
        return score_select_reference(query_codes, key_codes, key_valid, budget, bits)
    if not kernel_serves(query_group(query_codes, key_codes.shape[1]), bits):
        return score_select_reference(query_codes, key_codes, key_valid, budget, bits)
    plan = plan if plan is not None else plan_select(key_valid, budget, key_codes.shape[1])
    if plan.budget != budget:
        raise ValueError(f"plan was built for {plan.budget}, not {budget}")
    if not plan.contiguous:
        return score_select_reference(query_codes, key_codes, key_valid, budget, bits)
    return _score_select_triton(query_codes, key_codes, plan, bits)
