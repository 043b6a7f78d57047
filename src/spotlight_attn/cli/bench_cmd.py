"""`spotlight bench`: GPU benchmarks of the kernels and of end-to-end decoding.

    spotlight bench retrieval [--geometry llama3-8b,smollm2] [--context 4K,16K,64K,256K,512K,1M] [--batch 1,8]
    spotlight bench attention [same options] [--dtype float16|bfloat16]
    spotlight bench decode --shape llama3-8b --context 128K --batch 6 --budget 0.02 [--hasher linear,mlp]
        [--baselines hf-static,dense] [--bits 128] [--steps 32] [--model smollm2.gguf] [--json F] [--plot decode.png]

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

    dec = kinds.add_parser("decode", help="decode tokens/s through model.generate(), spotlight vs the strongest dense",
                           description="Decode throughput through model.generate() (see spotlight_attn/decode_bench.py).")
    dec.add_argument("--shape", default="llama3-8b", help="comma-separated: llama3-8b, smollm2-135m (random weights) (default: %(default)s)")
    dec.add_argument("--model", help="a real model instead (local HF folder, .gguf, smollm2-135m): generate() prefills real prompts")
    dec.add_argument("--context", default="32K,128K", help="tokens held per row when decoding starts (default: %(default)s)")
    dec.add_argument("--batch", default="1,6", help="(default: %(default)s)")
    dec.add_argument("--budget", default="0.02", help="comma-separated budgets (default: %(default)s)")
    dec.add_argument("--hasher", default="linear,mlp",
                     help="linear (SimHash), mlp (learned-hash shape, untrained: speed only), learned (the hasher shipped for --model) (default: %(default)s)")
    dec.add_argument("--baselines", default="hf-static,dense",
                     help="dense rows: hf-static (transformers' StaticCache + sdpa), dense (ours, flash varlen) (default: %(default)s)")
    dec.add_argument("--bits", type=int, default=128, help="code bits (default: %(default)s)")
    dec.add_argument("--steps", type=int, default=32, help="new tokens of the timed generate() call (default: %(default)s)")
    dec.add_argument("--warmup", type=int, default=8, help="new tokens of the warm-up call (default: %(default)s)")
    dec.add_argument("--dense-layers", default="0,1", help="layers the spotlight rows keep dense, '' for none (default: %(default)s)")
    dec.add_argument("--no-fuse-projections", dest="fuse_projections", action="store_false",
                     help="q/k/v and gate/up as separate GEMMs (SpotlightConfig(fuse_projections=False)) in every row")
    dec.add_argument("--head-spread", type=float, metavar="R",
                     help="hash rows with head budgets: one KV head a layer reads R times the budget, the others the rest "
                          "(the mean stays the budget; a speed stand-in for a calibrated profile on random weights)")
    dec.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    dec.add_argument("--plot", type=Path, metavar="PNG", help="also draw tokens/s per configuration (needs matplotlib)")
    dec.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="measure every row in this process (default: each row in a fresh process of its own)")
    dec.set_defaults(run=run_decode)
    return parser


def _write_json(path: Path | None, rows: list[dict]) -> None:
    """Rows as strict JSON (a figure not measured, NaN in the row, is written as null), atomically."""
    if path is not None:
        clean = [{k: None if isinstance(v, float) and v != v else v for k, v in row.items()} for row in rows]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(clean, indent=1, allow_nan=False))
        tmp.replace(path)
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
    import sys

    from spotlight_attn.bench import require_cuda
    from spotlight_attn.cli.main import parse_layers
    from spotlight_attn.decode_bench import SHAPES, Settings, plot, rows_as_dicts, run_decode_bench

    shapes = _names(args.shape, SHAPES, "shape") if args.model is None else [Path(str(args.model)).stem]
    hashers = tuple(_names(args.hasher, ("linear", "mlp", "learned"), "hasher")) if args.hasher.strip() else ()
    baselines = tuple(_names(args.baselines, ("hf-static", "dense"), "baseline")) if args.baselines.strip() else ()
    contexts, batches = parse_tokens(args.context), parse_ints(args.batch, "batch")
    budgets = parse_budgets(args.budget)
    dense_layers = parse_layers(args.dense_layers, "--dense-layers")
    if args.steps < 2 or args.warmup < 1:
        raise SpotlightError("--steps must be >= 2 and --warmup >= 1")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise SpotlightError("--plot needs matplotlib: pip install matplotlib")
    require_cuda()
    settings = Settings(budgets, hashers, bits=args.bits, steps=args.steps, warmup=args.warmup, dense_layers=dense_layers,
                        baselines=baselines, fuse_projections=args.fuse_projections, head_spread=args.head_spread)
    command = "spotlight " + " ".join(sys.argv[1:])
    if not baselines and not hashers:
        raise SpotlightError("nothing to measure: give --hasher or --baselines")
    rows = run_decode_bench(shapes, contexts, batches, settings, model_spec=args.model, command=command,
                            log=lambda line: print(line, flush=True), isolate=args.isolate)
    _write_json(args.json, rows_as_dicts(rows))
    if args.plot is not None and rows:
        import torch

        plot(rows, args.plot, f"decode tokens/s through generate(), {torch.cuda.get_device_name()}")
        print(f"wrote {args.plot}")
    return 0
