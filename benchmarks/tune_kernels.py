"""Time launch variants of the Triton kernels (block sizes, warps, programs per SM) on one CUDA device.

    PYTHONPATH=src python benchmarks/tune_kernels.py [--cases generate|kernels] [--out DIR]

`--cases generate` (default): the decode step's own shapes through generate(), Llama-3-8B geometry at
128K x 6 and 512K x 1, with the static cache's layouts (K/V token-major [B, T_max, Hkv, D] read as
[B, Hkv, T, D] views, T_max = context + 64 steps, the index width of the budget at T_max); also the
hash of a step's queries and new key (SimHash and the learned-hash shape, torch path against the
fused kernel). `--cases kernels`: the kernel benchmark's shapes (512K tokens; Llama-3-8B batch 1 and 8,
smollm2 batch 1), contiguous [B, Hkv, T, *].

For each variant: CUDA-graph median time (twice: the spread is the noise) and, for the first case,
the GPU time of each kernel (torch profiler). Prints a table last; writes DIR/tune_kernels.log. Used
to pick the launchers' defaults (see docs/kernels-notes.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

from _tee import open_tee

from spotlight_attn.bench import GEOMETRIES, _median_graph_us, copy_bandwidth
from spotlight_attn.config import Budget
from spotlight_attn.kernels.hash import _hash_codes_triton, hash_codes_reference
from spotlight_attn.kernels.score_select import _score_select_triton, new_guess, plan_from_lengths, plan_select
from spotlight_attn.kernels.sparse_decode import _sparse_decode_triton

T = 524288
SELECT_VARIANTS = [  # keyword arguments of _score_select_triton (earlier variants: the gen23 and gen28 logs)
    dict(),  # fuse="all": one launch
    dict(fuse="none"),  # three launches: each pass's own time
    dict(nibbles=False),  # pass 2 counts in 8-bit fields, not 4-bit ones
    dict(packed_coarse=False, asm_store=False, nibbles=False),  # pass 1 through tl.histogram, pass 3 through tl.store (as before gen28)
    dict(emit_tokens=2048),
    dict(block_tokens=512),
    dict(score_warps=8),
    # A threshold prediction (guess): "steady" keeps one buffer across the timed calls, so after the
    # first call each row's prediction is exact (the same query every call): pass 2 never runs;
    # "far" sets it far off before every call (a fill launch included): the recount every call.
    dict(guess="steady"),
    dict(guess="far"),
    dict(guess="steady", fuse="none"),
    dict(guess="steady", block_tokens=512),
    dict(guess="steady", guess_bins="exact"),  # 17 exact bins, no bands (kernels-notes: the next variant to time)
    dict(guess="far", guess_bins="exact"),
]
HASH_VARIANTS = [  # keyword arguments of _hash_codes_triton
    dict(),
    dict(prefetch_l2=False),  # the default setting, each weight slice read only when its matmul reaches it
    dict(num_warps=4, bk=64),  # SimHash's default; the learned hash's setting in run gen20
    dict(bk=16, num_warps=4),  # the few-row kernel's setting at 2df4409 (which had no prefetch)
    dict(block_m=16),  # the tl.dot kernel
    dict(num_warps=8, bk=64),
    dict(num_warps=8, bk=128),
    dict(num_warps=2, bk=32),
    dict(block_m=1, bk=64),
    dict(block_m=1, bk=128, num_warps=8),
    dict(block_m=4, bk=64, num_warps=8),
]
DECODE_VARIANTS = [  # keyword arguments of _sparse_decode_triton
    dict(),
    dict(programs_per_sm=4, max_splits=64),
    dict(programs_per_sm=8, max_splits=64),
    dict(block_n=32),
    dict(block_n=32, programs_per_sm=4, max_splits=64),
    dict(programs_per_sm=1),
    dict(num_warps=8),
    dict(num_stages=3),
]


def kernel_times(fn, reps=10) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    parts = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0 and evt.count >= reps and evt.key.startswith("_"):
            parts.append(f"{evt.key.strip('_').replace('_kernel', '')} {total / reps:.1f}")
    return " ".join(parts)


def kernel_cases(device, bandwidth, budget):
    """The kernel benchmark's shapes: 512K tokens, contiguous codes and K/V."""
    k = budget.tokens_for(T)
    select_cases, decode_cases = [], []
    for name, b in (("llama3-8b", 1), ("llama3-8b", 8), ("smollm2", 1)):
        geo = GEOMETRIES[name]
        words = geo.bits // 32
        q = torch.randint(-(2**31), 2**31 - 1, (b, geo.q_heads, 1, words), dtype=torch.int32, device=device)
        codes = torch.randint(-(2**31), 2**31 - 1, (b, geo.kv_heads, T, words), dtype=torch.int32, device=device)
        plan = plan_select(torch.ones(b, T, dtype=torch.bool, device=device), budget)
        floor = (codes.numel() * 4 + b * geo.kv_heads * k * 8) / bandwidth * 1e6
        select_cases.append((f"{name} B={b}", q, codes, plan, floor, geo.bits))
        query = torch.randn(b, geo.q_heads, 1, geo.head_dim, device=device, dtype=torch.float16)
        keys = torch.randn(b, geo.kv_heads, T, geo.head_dim, device=device, dtype=torch.float16)
        values = torch.randn_like(keys)
        picks = torch.rand(b, geo.kv_heads, T, device=device).topk(k, dim=-1).indices.sort(dim=-1).values
        floor = (2 * b * geo.kv_heads * k * geo.head_dim * 2 + picks.numel() * 8) / bandwidth * 1e6
        decode_cases.append((f"{name} B={b}", (query, keys, values, picks), floor, geo.head_dim**-0.5))
    return select_cases, decode_cases


def generate_cases(device, bandwidth, budget):
    """The decode step's shapes and layouts through generate() (see the module docstring)."""
    geo = GEOMETRIES["llama3-8b"]
    select_cases, decode_cases = [], []
    for context, b in ((131072, 6), (524288, 1)):
        t_max = context + 64
        n = context + 32  # the timed call's middle step, as the decode bench counts its floor
        k_width, k = budget.tokens_for(t_max), budget.tokens_for(n)
        words = geo.bits // 32
        q = torch.randint(-(2**31), 2**31 - 1, (b, geo.q_heads, 1, words), dtype=torch.int32, device=device)
        codes = torch.randint(-(2**31), 2**31 - 1, (b, geo.kv_heads, t_max, words), dtype=torch.int32, device=device)
        lengths = torch.full((b,), n, device=device)
        plan = plan_from_lengths(lengths, budget, k_width)
        label = f"{context // 1024}K x {b}"
        floor = (b * geo.kv_heads * n * words * 4 + b * geo.kv_heads * k * 8) / bandwidth * 1e6
        select_cases.append((label, q, codes, plan, floor, geo.bits))
        query = torch.randn(b, geo.q_heads, 1, geo.head_dim, device=device, dtype=torch.bfloat16)
        by_token = torch.randn(b, t_max, geo.kv_heads, geo.head_dim, device=device, dtype=torch.bfloat16)
        keys, values = by_token.transpose(1, 2), torch.randn_like(by_token).transpose(1, 2)
        picks = torch.rand(b, geo.kv_heads, n, device=device).topk(k, dim=-1).indices.sort(dim=-1).values
        picks = torch.nn.functional.pad(picks, (0, k_width - k), value=-1)
        floor = (2 * b * geo.kv_heads * k * geo.head_dim * 2 + b * geo.kv_heads * k * 8) / bandwidth * 1e6
        decode_cases.append((label, (query, keys, values, picks), floor, geo.head_dim**-0.5))
    return select_cases, decode_cases


def hash_rows(device, log) -> list[str]:
    """A step's hash (queries and new key of one layer) at 128K x 6's batch: torch path vs fused kernel."""
    from spotlight_attn.config import HasherConfig
    from spotlight_attn.hashing import hasher as hashing
    from spotlight_attn.models import ModelGeometry

    geo = GEOMETRIES["llama3-8b"]
    geometry = ModelGeometry("llama", 3, geo.q_heads, geo.kv_heads, geo.head_dim, 500000.0, 1 << 20)
    b = 6
    query = torch.randn(b, geo.q_heads, 1, geo.head_dim, device=device, dtype=torch.bfloat16)
    key = torch.randn(b, geo.kv_heads, 1, geo.head_dim, device=device, dtype=torch.bfloat16)
    hashers = {
        "linear": hashing.LinearHasher(geometry, bits=geo.bits, layers=[2]),
        "mlp": hashing.MLPHasher(geometry, HasherConfig(bits=geo.bits, depth=2, width=geo.head_dim), layers=[2]),
    }
    # A decode step streams far more than L2 holds between two layers' hashes, so the hash meets its
    # weights cold: "cold" times a call after a write of 256 MB (that write's own time taken off).
    flush_buf = torch.empty(1 << 26, dtype=torch.float32, device=device)
    flush = lambda: flush_buf.fill_(1.0)  # noqa: E731
    flush_us = _median_graph_us([flush])

    def cold_us(call) -> float:
        return 2 * _median_graph_us([flush, call]) - flush_us  # the median is per call of the pair

    lines, saved = [], hashing.FUSED_KERNEL
    try:
        for name, h in hashers.items():
            h = h.to(device)
            cells, codes = [], []
            for fused in (False, None):
                hashing.FUSED_KERNEL = fused
                call = lambda: h.step_codes(2, query, key)  # noqa: E731
                codes.append(call())
                us, again = _median_graph_us([call]), _median_graph_us([call])
                cells.append(f"{'fused' if fused is None else 'torch'} {us:6.1f}/{again:6.1f} us, cold {cold_us(call):6.1f}")
            same = all(torch.equal(a, c) for a, c in zip(codes[0], codes[1]))
            line = f"hash {name:6s} B={b}: step_codes " + " | ".join(cells) + f" | codes equal: {same}"
            log(line)
            lines.append(line)
            both = torch.cat([query.reshape(b, geo.kv_heads, -1, geo.head_dim), key], dim=2)  # as step_codes builds it
            folded, _ = hashing._heads_first(both)
            weights = h._bank("k", 2).kernel_weights()
            want = hash_codes_reference(folded, *weights)
            cells = [f"torch {_median_graph_us([lambda: hash_codes_reference(folded, *weights)]):6.1f} us"]
            for variant in HASH_VARIANTS:
                call = lambda: _hash_codes_triton(folded, *weights, **variant)  # noqa: E731
                same = torch.equal(call(), want)
                cells.append(f"{variant}: {_median_graph_us([call]):6.1f} us, cold {cold_us(call):6.1f}"
                             f"{'' if same else ' DIFFERS'}")
            line = f"hash {name:6s} {tuple(folded.shape)} kernel alone: " + " | ".join(cells)
            log(line)
            lines.append(line)
    finally:
        hashing.FUSED_KERNEL = saved
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", choices=("generate", "kernels"), default="generate")
    parser.add_argument("--only", choices=("hash", "select", "decode"), help="time one kernel's variants only")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, log_file = open_tee(out / f"tune_kernels_{args.cases}{'_' + args.only if args.only else ''}.log")

    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    log(f"# {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, cases {args.cases}")
    budget = Budget(0.02, 20, 4, 16)
    cases = generate_cases if args.cases == "generate" else kernel_cases
    select_cases, decode_cases = cases(device, bandwidth, budget)
    wanted = lambda part: args.only in (None, part)  # noqa: E731
    table = hash_rows(device, log) if args.cases == "generate" and wanted("hash") else []

    for variant in SELECT_VARIANTS if wanted("select") else []:
        cells = []
        for i, (label, q, codes, plan, floor, bits) in enumerate(select_cases):
            kw = dict(variant)
            guessing = kw.pop("guess", None)
            if guessing:
                kw["guess"] = new_guess(q.shape[0], codes.shape[1], device)
            if guessing == "far":
                call = lambda: (kw["guess"].fill_(90.0), _score_select_triton(q, codes, plan, bits, **kw))[1]  # noqa: E731
            else:
                call = lambda: _score_select_triton(q, codes, plan, bits, **kw)  # noqa: E731
            same = torch.equal(call(), _score_select_triton(q, codes, plan, bits))  # every variant selects the same keys
            us, again = _median_graph_us([call]), _median_graph_us([call])  # twice: the spread is the noise
            cells.append(f"{label}: {us:6.1f}/{again:6.1f} us {min(us, again) / floor:4.2f}x{'' if same else ' DIFFERS'}")
            if i == 0:
                split = kernel_times(call)
        line = f"score_select  {str(variant):62s} " + " | ".join(cells) + f" | {split}"
        log(line)
        table.append(line)
    for variant in DECODE_VARIANTS if wanted("decode") else []:
        cells = []
        for label, inputs, floor, scaling in decode_cases:
            call = lambda: _sparse_decode_triton(*inputs, scaling, **variant)  # noqa: E731
            ref = _sparse_decode_triton(*inputs, scaling).float()
            err = float((call().float() - ref).abs().max() / ref.abs().max())
            us, again = _median_graph_us([call]), _median_graph_us([call])
            cells.append(f"{label}: {us:6.1f}/{again:6.1f} us {min(us, again) / floor:4.2f}x{'' if err < 1e-2 else f' ERR {err:.1e}'}")
        line = f"sparse_decode {str(variant):62s} " + " | ".join(cells)
        log(line)
        table.append(line)
    log("")
    log("TUNING TABLE (graph-replay medians, x = time over the bytes floor)")
    for line in table:
        log(line)
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
