"""Time launch variants of the Triton kernels (block sizes, warps, programs per SM) on one CUDA device.

    PYTHONPATH=src python benchmarks/tune_kernels.py [--out DIR]

For each variant: CUDA-graph median time at 512K tokens (Llama-3-8B geometry, batch 1 and 8; smollm2,
batch 1) and, for batch 1 Llama, the GPU time of each kernel (torch profiler). Prints a table last;
writes DIR/tune_kernels.log. Used to pick the launchers' defaults (see docs/kernels-notes.md).
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
from spotlight_attn.kernels.score_select import _score_select_triton, plan_select
from spotlight_attn.kernels.sparse_decode import _sparse_decode_triton

T = 524288
SELECT_VARIANTS = [  # keyword arguments of _score_select_triton
    dict(),
    dict(block_tokens=512, score_warps=4),
]
DECODE_VARIANTS = [  # keyword arguments of _sparse_decode_triton
    dict(),
    dict(programs_per_sm=4, max_splits=64),
    dict(block_n=32),
    dict(programs_per_sm=1),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, log_file = open_tee(out / "tune_kernels.log")

    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    log(f"# {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, T={T}")
    budget = Budget(0.02, 20, 4, 16)
    k = budget.tokens_for(T)
    table = []
    select_cases, decode_cases = [], []
    for name, b in (("llama3-8b", 1), ("llama3-8b", 8), ("smollm2", 1)):
        geo = GEOMETRIES[name]
        words = geo.bits // 32
        q = torch.randint(-(2**31), 2**31 - 1, (b, geo.q_heads, 1, words), dtype=torch.int32, device=device)
        codes = torch.randint(-(2**31), 2**31 - 1, (b, geo.kv_heads, T, words), dtype=torch.int32, device=device)
        plan = plan_select(torch.ones(b, T, dtype=torch.bool, device=device), budget)
        floor = (codes.numel() * 4 + b * geo.kv_heads * k * 8) / bandwidth * 1e6
        select_cases.append((name, b, q, codes, plan, floor, geo.bits))
        query = torch.randn(b, geo.q_heads, 1, geo.head_dim, device=device, dtype=torch.float16)
        keys = torch.randn(b, geo.kv_heads, T, geo.head_dim, device=device, dtype=torch.float16)
        values = torch.randn_like(keys)
        picks = torch.rand(b, geo.kv_heads, T, device=device).topk(k, dim=-1).indices.sort(dim=-1).values
        floor = (2 * b * geo.kv_heads * k * geo.head_dim * 2 + picks.numel() * 8) / bandwidth * 1e6
        decode_cases.append((name, b, (query, keys, values, picks), floor, geo.head_dim**-0.5))

    for variant in SELECT_VARIANTS:
        cells = []
        for name, b, q, codes, plan, floor, bits in select_cases:
            call = lambda: _score_select_triton(q, codes, plan, bits, **variant)  # noqa: E731
            us, again = _median_graph_us([call]), _median_graph_us([call])  # twice: the spread is the noise
            cells.append(f"{name} B={b}: {us:6.1f}/{again:6.1f} us {min(us, again) / floor:4.2f}x")
            if (name, b) == ("llama3-8b", 1):
                split = kernel_times(call)
        line = f"score_select  {str(variant):70s} " + " | ".join(cells) + f" | {split}"
        log(line)
        table.append(line)
    for variant in DECODE_VARIANTS:
        cells = []
        for name, b, inputs, floor, scaling in decode_cases:
            call = lambda: _sparse_decode_triton(*inputs, scaling, **variant)  # noqa: E731
            us, again = _median_graph_us([call]), _median_graph_us([call])
            cells.append(f"{name} B={b}: {us:6.1f}/{again:6.1f} us {min(us, again) / floor:4.2f}x")
        line = f"sparse_decode {str(variant):70s} " + " | ".join(cells)
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
