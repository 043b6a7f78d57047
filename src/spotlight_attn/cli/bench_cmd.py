"""`spotlight bench`: GPU benchmarks of the kernels and of end-to-end decoding.

    spotlight bench retrieval [--geometry llama3-8b,smollm2] [--context 4K,16K,64K,256K,512K,1M] [--batch 1,8]
    spotlight bench attention [same options] [--dtype float16|bfloat16]
    spotlight bench decode --shape llama3-8b --context 32K,128K --batch 1,3,8 --budget 0.02,0.1
        [--hasher linear,mlp] [--bits 128] [--steps 32] [--dense-kernel auto] [--no-compile] [--plot decode.png]

Each prints a table (the measured copy bandwidth first) and, with --json FILE, writes the rows.
They need a CUDA GPU: without one they end with `spotlight: error: ...` naming what is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from spotlight_attn.errors import SpotlightError


def parse_tokens(text: str) -> list[int]:
    """'32K,128K,1M,4096' -> [32768, 131072, 1048576, 4096]."""
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(item[-1], 1)
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) < 1:
            raise SpotlightError(f"{item!r} is not a token count: use numbers like 4096, 32K or 1M")
        out.append(int(digits) * scale)
    if not out:
        raise SpotlightError(f"no token counts in {text!r}")
    return out


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpotlightError(f"--{what} {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise SpotlightError(f"--{what} needs positive integers, got {text!r}")
    return values


def parse_budgets(text: str) -> list[float | int]:
    from spotlight_attn.config import Budget, parse_budget

    budgets = [parse_budget(x) for x in text.split(",") if x.strip()]
    for b in budgets:
        Budget(b)  # validates the range
    return budgets


def _names(text: str, known, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SpotlightError(f"unknown {what} {bad or text!r}; choose from: {', '.join(known)}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="GPU benchmarks: retrieval, attention, decode", description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")

    for kind, text in [
        ("retrieval", "score_select vs sign-matmul + torch.topk"),
        ("attention", "sparse_decode vs gather + SDPA vs dense SDPA"),
    ]:
        sub = kinds.add_parser(kind, help=text, description=f"Kernel benchmark: {text}.")
        sub.add_argument("--geometry", default="llama3-8b,smollm2", help="comma-separated: llama3-8b, smollm2 (default: %(default)s)")
        sub.add_argument("--context", default="4K,16K,64K,256K,512K,1M", help="cached tokens (default: %(default)s)")
        sub.add_argument("--batch", default="1,8", help="(default: %(default)s)")
        sub.add_argument("--budget", default="0.02", help="keys read: a fraction, a percentage or a count (default: %(default)s)")
        sub.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="K/V dtype (attention; default: %(default)s)")
        sub.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
        sub.set_defaults(run=run_kernels, kind=kind)

    dec = kinds.add_parser("decode", help="end-to-end decode tokens/s, spotlight vs dense",
                           description="End-to-end greedy decode throughput of a random-weight model of a given shape.")
    dec.add_argument("--shape", default="llama3-8b", help="comma-separated: llama3-8b, smollm2-135m (default: %(default)s)")
    dec.add_argument("--context", default="32K,128K", help="cached tokens before decoding (default: %(default)s)")
    dec.add_argument("--batch", default="1,3,8", help="(default: %(default)s)")
    dec.add_argument("--budget", default="0.02,0.1", help="comma-separated budgets (default: %(default)s)")
    dec.add_argument("--hasher", default="linear", help="linear (SimHash) and/or mlp (learned-hash shape, untrained: speed only) (default: %(default)s)")
    dec.add_argument("--bits", type=int, default=128, help="code bits (default: %(default)s)")
    dec.add_argument("--steps", type=int, default=32, help="timed decode steps (default: %(default)s)")
    dec.add_argument("--warmup", type=int, default=4, help="(default: %(default)s)")
    dec.add_argument("--dense-kernel", choices=("auto", "flash-varlen", "sdpa", "sdpa-masked"), default="auto",
                     help="dense attention kernel; auto measures flash-varlen and exact-length SDPA and keeps the faster (default: %(default)s)")
    dec.add_argument("--dense-layers", default="0,1", help="layers the sparse rows keep dense, '' for none (default: %(default)s)")
    dec.add_argument("--no-compile", dest="compile", action="store_false",
                     help="skip torch.compile of the per-layer math (norms, RoPE, hashing); it is on by default, for dense and spotlight alike")
    dec.add_argument("--profile", action="store_true", help="also print GPU time per kernel of a few eager steps (torch profiler)")
    dec.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    dec.add_argument("--plot", type=Path, metavar="PNG", help="also draw tokens/s per configuration (needs matplotlib)")
    dec.set_defaults(run=run_decode)
    return parser


def _write_json(path: Path | None, rows: list[dict]) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=1))
        print(f"wrote {path}")


def run_kernels(args) -> int:
    import torch

    from spotlight_attn.bench import GEOMETRIES, require_cuda, rows_as_dicts, run_bench
    from spotlight_attn.config import Budget

    geometries = {name: GEOMETRIES[name] for name in _names(args.geometry, GEOMETRIES, "geometry")}
    contexts, batches = tuple(parse_tokens(args.context)), tuple(parse_ints(args.batch, "batch"))
    budgets = parse_budgets(args.budget)
    if len(budgets) != 1:
        raise SpotlightError("bench retrieval|attention takes one --budget")
    require_cuda()
    rows = run_bench(
        args.kind, geometries=geometries, contexts=contexts, batches=batches, budget=Budget(budgets[0], 20, 4, 16),
        dtype=getattr(torch, args.dtype), log=lambda line: print(line, flush=True),
    )
    _write_json(args.json, rows_as_dicts(rows))
    return 0


def run_decode(args) -> int:
    from spotlight_attn.bench import require_cuda
    from spotlight_attn.engine.bench import SHAPES, DecodeSettings, rows_as_dicts, run_decode_bench

    shapes = _names(args.shape, SHAPES, "shape")
    hashers = tuple(_names(args.hasher, ("linear", "mlp"), "hasher"))
    contexts, batches = parse_tokens(args.context), parse_ints(args.batch, "batch")
    budgets = parse_budgets(args.budget)
    try:
        dense_layers = tuple(int(i) for i in args.dense_layers.split(",") if i.strip())
    except ValueError:
        raise SpotlightError(f"--dense-layers {args.dense_layers!r} is not a comma-separated list of layer indices") from None
    if args.steps < 1 or args.warmup < 1:
        raise SpotlightError("--steps and --warmup must be >= 1")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise SpotlightError("--plot needs matplotlib: pip install matplotlib")
    require_cuda()
    settings = DecodeSettings(
        budgets, hashers, bits=args.bits, steps=args.steps, warmup=args.warmup, dense_kernel=args.dense_kernel,
        dense_layers=dense_layers, compile=args.compile, profile=args.profile,
    )
    rows = run_decode_bench(shapes, contexts, batches, settings, log=lambda line: print(line, flush=True))
    _write_json(args.json, rows_as_dicts(rows))
    if args.plot is not None and rows:
        import torch

        from spotlight_attn.engine.plot import plot

        plot(rows, args.plot, f"decode tokens/s, {torch.cuda.get_device_name()}, random-weight models")
        print(f"wrote {args.plot}")
    return 0
