"""Benchmark the Triton kernels against the torch paths they replace, on one CUDA device.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--out DIR] [--contexts 4096,524288] [--batches 1]

Prints every row as it is measured, a per-kernel time breakdown (torch profiler) for the Llama-3-8B
geometry at 512K tokens, and last a short table with the issue's targets. Writes DIR/bench_kernels.log
(everything printed), DIR/bench_kernels.json (every row) and DIR/profile.txt. DIR defaults to $OUT,
else ./bench-out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import torch

from _tee import open_tee

from spotlight_attn.bench import CONTEXTS, GEOMETRIES, copy_bandwidth, rows_as_dicts, run_bench
from spotlight_attn.config import Budget
from spotlight_attn.kernels.score_select import plan_select, score_select
from spotlight_attn.kernels.sparse_decode import sparse_decode

TARGET_T = 524288


def profile_breakdown(device, log) -> None:
    """Per-kernel GPU time of score_select and sparse_decode, Llama-3-8B geometry, batch 1, 512K."""
    from torch.profiler import ProfilerActivity, profile

    geo, budget, t = GEOMETRIES["llama3-8b"], Budget(0.02, 20, 4, 16), TARGET_T
    words = geo.bits // 32
    q = torch.randint(-(2**31), 2**31 - 1, (1, geo.q_heads, 1, words), dtype=torch.int32, device=device)
    codes = torch.randint(-(2**31), 2**31 - 1, (1, geo.kv_heads, t, words), dtype=torch.int32, device=device)
    valid = torch.ones(1, t, dtype=torch.bool, device=device)
    plan = plan_select(valid, budget)
    query = torch.randn(1, geo.q_heads, 1, geo.head_dim, device=device, dtype=torch.float16)
    keys = torch.randn(1, geo.kv_heads, t, geo.head_dim, device=device, dtype=torch.float16)
    values = torch.randn_like(keys)
    picks = score_select(q, codes, valid, budget, geo.bits, plan=plan)
    for name, fn in [
        ("score_select", lambda: score_select(q, codes, valid, budget, geo.bits, plan=plan)),
        ("sparse_decode", lambda: sparse_decode(query, keys, values, picks, geo.head_dim**-0.5)),
    ]:
        fn()
        torch.cuda.synchronize()
        reps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        log(f"# {name}, llama3-8b B=1 T=512K: GPU time per call by kernel (profiler, {reps} calls)")
        for evt in prof.key_averages():
            total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if total > 0 and evt.count >= reps:
                log(f"  {evt.key[:60]:60s} {total / reps:8.1f} us  ({evt.count // reps} per call)")


def summary(rows, bandwidth, log) -> None:
    """The short table (printed last): 512K rows and the issue's targets."""

    def find(kind, geo, b, t, method):
        key = (kind, geo, b, t, method)
        return next((r for r in rows if (r.kind, r.geometry, r.batch, r.context, r.method) == key), None)

    log("")
    log(
        f"SUMMARY  {torch.cuda.get_device_name(0)}  copy bandwidth {bandwidth / 1e9:.0f} GB/s"
        "  (graph-replay medians; eager in brackets)"
    )
    log(
        f"{'kind':9s} {'geometry':9s} {'B':>2s} {'T':>5s} {'method':18s} {'us':>8s} {'(eager)':>9s}"
        f" {'GB/s':>6s} {'xfloor':>6s} {'xslower':>7s}"
    )
    for geo in GEOMETRIES:
        for b in (1, 8):
            for kind, methods in (
                ("retrieval", ("score_select", "sign-matmul+topk")),
                ("attention", ("sparse_decode", "gather+SDPA", "dense SDPA")),
            ):
                for m in methods:
                    r = find(kind, geo, b, TARGET_T, m)
                    if r is not None:
                        log(
                            f"{kind:9s} {geo:9s} {b:2d} {'512K':>5s} {m:18s} {r.graph_us:8.1f} ({r.eager_us:7.1f})"
                            f" {r.gbps:6.0f} {r.x_floor:6.2f} {r.speedup:7.2f}"
                        )
    sel = find("retrieval", "llama3-8b", 1, TARGET_T, "score_select")
    ref = find("retrieval", "llama3-8b", 1, TARGET_T, "sign-matmul+topk")
    dec = find("attention", "llama3-8b", 1, TARGET_T, "sparse_decode")
    dense = find("attention", "llama3-8b", 1, TARGET_T, "dense SDPA")
    if sel and ref:
        ok = sel.x_floor <= 1.3 and ref.graph_us / sel.graph_us >= 15
        log(
            f"TARGET score_select 512K x 8 heads x 128 bits, B=1: {sel.graph_us:.1f} us = {sel.x_floor:.2f}x floor"
            f" (<= 1.3), {ref.graph_us / sel.graph_us:.1f}x faster than sign-matmul+topk (>= 15):"
            f" {'MET' if ok else 'MISSED'}"
        )
    if dec and dense:
        ok = dec.x_floor <= 1.5 and dense.graph_us / dec.graph_us >= 10
        log(
            f"TARGET sparse_decode 2% of 512K, B=1: {dec.graph_us:.1f} us = {dec.x_floor:.2f}x floor (<= 1.5),"
            f" {dense.graph_us / dec.graph_us:.1f}x faster than dense SDPA (>= 10): {'MET' if ok else 'MISSED'}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--kinds", default="retrieval,attention")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, log_file = open_tee(out / "bench_kernels.log")

    import triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    log(
        f"# {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB;"
        f" torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
    )
    log(f"# command: {' '.join([sys.executable, *sys.argv])}")
    bandwidth = copy_bandwidth(device)
    contexts = tuple(int(c) for c in args.contexts.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = []
    for kind in args.kinds.split(","):
        rows += run_bench(kind, contexts=contexts, batches=batches, bandwidth=bandwidth, device=device, log=log)
        (out / "bench_kernels.json").write_text(json.dumps(rows_as_dicts(rows), indent=1, allow_nan=True))
    if not args.no_profile:
        lines = []
        profile_breakdown(device, lambda line: (log(line), lines.append(line)))
        (out / "profile.txt").write_text("\n".join(lines) + "\n")
    summary(rows, bandwidth, log)
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
