"""The decode step's GEMMs alone: how close each BLAS choice comes to the weights' bytes floor.

A decode step of the Llama-3-8B shape multiplies B = 1..8 rows by every weight matrix once; the
weights (15 GB) are cold, so each GEMM's floor is its weight bytes over the copy bandwidth. The
profile (docs/BENCHMARKS.md) puts the model's GEMMs at 80% of it, in the dense and sparse rows alike.
This times, per weight shape and batch, F.linear through cuBLAS and cuBLASLt (torch's
preferred_blas_library) and through inductor's max-autotune GEMM templates, each in a CUDA graph
that walks over enough weight copies to defeat L2.

    python3 benchmarks/gemm_probe.py [--batch 1,6] [--autotune] --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, in, out) of the Llama-3-8B shape's projections (transformers' LlamaForCausalLM keeps them apart)
SHAPES = [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024), ("gate/up", 4096, 14336),
          ("down", 14336, 4096), ("lm_head", 4096, 128256),
          ("qkv fused", 4096, 6144), ("gate/up fused", 4096, 28672)]  # SpotlightConfig(fuse_projections=True)
# How many of each the step runs: 32 layers x (q, o), x (k, v), x (gate, up), x down, and one lm_head.
PER_STEP = {"q_proj/o_proj": 64, "k_proj/v_proj": 64, "gate/up": 64, "down": 32, "lm_head": 1, "qkv fused": 0, "gate/up fused": 0}


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return 2 * src.numel() / times[len(times) // 2]


def graph_time(fn, xs, ws) -> float:
    """Median seconds per call of fn over the (x, w) copies, replayed in one CUDA graph."""
    reps = len(ws)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, w in zip(xs, ws):  # warm-up (and inductor's compile) outside the capture
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, w in zip(xs, ws):
            fn(x, w)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,6")
    parser.add_argument("--autotune", action="store_true", help="also inductor max-autotune (minutes of tuning)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for m in (int(b) for b in args.batch.split(",")):
        for name, k, n in SHAPES:
            nbytes = k * n * 2
            copies = max(2, math.ceil(400e6 / nbytes))  # 400 MB of weights: eight times the L2
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            floor = nbytes / bandwidth
            row = {"batch": m, "shape": name, "k": k, "n": n, "floor_us": floor * 1e6, "per_step": PER_STEP[name]}
            for backend in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(backend)
                row[f"{backend}_us"] = graph_time(F.linear, xs, ws) * 1e6
            torch.backends.cuda.preferred_blas_library("default")
            if args.autotune:
                torch._dynamo.reset()
                compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                row["autotune_us"] = graph_time(compiled, xs, ws) * 1e6
            rows.append(row)
            cells = "  ".join(f"{key[:-3]} {row[key]:7.1f} us ({floor * 1e6 / row[key]:.0%})"
                              for key in row if key.endswith("_us") and key != "floor_us")
            print(f"B={m} {name:14s} floor {floor * 1e6:7.1f} us  {cells}", flush=True)
            del ws, xs
    for m in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == m]
        keys = [key for key in mine[0] if key.endswith("_us")]
        totals = {key: sum(r[key] * r["per_step"] for r in mine) / 1e3 for key in keys}
        print(f"B={m} per step (ms): " + "  ".join(f"{key[:-3]} {v:.2f}" for key, v in totals.items()))
    (args.out / "gemm_probe.json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
