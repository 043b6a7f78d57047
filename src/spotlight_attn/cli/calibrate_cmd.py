"""`spotlight calibrate`: a head budget profile (budgets.py) for one method on a model.

    spotlight calibrate --model M --method spotlight [--hasher H] --data manpages,stdlib
        --out heads.safetensors [--context 4096] [--chunks 4] [--steps 16] [--fractions 0.005,...,0.3]

Decodes `--steps` tokens of each calibration chunk (teacher forcing, after a dense prefill of
`--context` tokens) through the method at every fraction of the grid and records, per (layer, KV
head), the attention mass its selection recovers: the curves `enable(..., SpotlightConfig(head_budgets=
FILE))` shares a budget out by. Calibrate on text of the kind you serve, not on the text you evaluate
on. Prints, per budget of `--show`, the calibration set's mass with the budget shared evenly and
shared by the profile (interpolated from the curves). Writes FILE and, beside it, FILE's
retrieval results (.json).
"""

from __future__ import annotations

import time
from pathlib import Path

GRID = "0.005,0.0075,0.01,0.015,0.02,0.03,0.04,0.055,0.07,0.1,0.13,0.17,0.22,0.3"


def add_parser(subparsers, parents=()) -> None:
    from spotlight_attn.cli.main import _model_args

    p = subparsers.add_parser("calibrate", parents=list(parents), help="a head budget profile: budgets that follow the attention",
                              description=__doc__.split("\n")[0])
    _model_args(p, "smollm2-135m")
    p.add_argument("--method", default="spotlight", help="whose selection to measure: spotlight[=FILE], linear<bits>, oracle (default: %(default)s)")
    p.add_argument("--hasher", metavar="FILE", help="learned hasher for spotlight (default: the one shipped for the model)")
    p.add_argument("--data", default="manpages,stdlib", help="comma-separated calibration corpora or data specs (default: %(default)s)")
    p.add_argument("--split", choices=("train", "heldout", "all"), default="train", help="which documents of each corpus (default: %(default)s)")
    p.add_argument("--context", type=int, default=4096, help="tokens prefilled before the measured steps (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=4, help="chunks per corpus (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="decode steps measured per chunk (default: %(default)s)")
    p.add_argument("--fractions", default=GRID, help="the grid of fractions (default: %(default)s)")
    p.add_argument("--show", default="0.02,0.1", help="budgets whose allocation to summarise (default: %(default)s)")
    p.add_argument("--dense-layers", metavar="I,J", help="layers that always read every key (default: SpotlightConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--out", type=Path, required=True, help="the profile (.safetensors)")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args) -> int:
    import torch

    from spotlight_attn.budgets import profile_from_retrieval, save_profile, selector_key
    from spotlight_attn.cli.main import parse_layers, torch_dtype
    from spotlight_attn.config import SpotlightConfig
    from spotlight_attn.cli.eval_cmd import load_reporting
    from spotlight_attn.errors import SpotlightError
    from spotlight_attn.eval import common
    from spotlight_attn.eval.retrieval import evaluate_retrieval
    from spotlight_attn.identity import model_identity
    from spotlight_attn.models import ModelGeometry, load_model

    if args.out.suffix != ".safetensors":
        raise SpotlightError(f"--out must name a .safetensors file, got {args.out}")
    specs = common.parse_methods(args.method, args.hasher)
    if len(specs) != 1 or specs[0].method.value not in ("spotlight", "linear", "oracle"):
        raise SpotlightError(f"--method takes one of spotlight[=FILE], linear<bits>, oracle; got {args.method!r}")
    fractions = common.parse_budgets(args.fractions)
    if any(not isinstance(f, float) or not 0 < f < 1 for f in fractions) or len(set(fractions)) < 2:
        raise SpotlightError(f"--fractions needs two or more fractions inside (0, 1), got {args.fractions!r}")
    shows = common.parse_budgets(args.show)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = SpotlightConfig(**({} if args.dense_layers is None else {"dense_layers": parse_layers(args.dense_layers, "--dense-layers")}))
    model, tokenizer = load_model(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    methods = common.Methods(model, args.model, base)
    spec = specs[0]
    installed = methods.enable(spec, fractions[0])
    selector = selector_key(installed.config, getattr(installed.selector, "hasher", None))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.context + args.steps > limit:
        raise SpotlightError(f"--context + --steps ({args.context + args.steps}) exceed the model's context of {limit} tokens")

    started = time.perf_counter()
    sources = [s.strip() for s in args.data.split(",") if s.strip()]
    parts = []
    for source in sources:
        parts.append(load_reporting(source, tokenizer, args.context + args.steps, args.chunks, args.split, "chunks", args.seed))
    chunks = torch.cat(parts) if parts else torch.empty(0)
    if not len(chunks):
        raise SpotlightError(f"no calibration chunks of {args.context + args.steps} tokens in {args.data!r}")
    results = evaluate_retrieval(model, methods, specs, sorted(set(fractions)), {args.context: chunks}, args.steps, data=args.data, seed=args.seed)
    geometry = ModelGeometry.from_model(model)
    profile = profile_from_retrieval(results, geometry, selector, model_identity(model), spec.label)
    profile.calibration = {
        "data": sources, "split": args.split, "context": args.context, "chunks": int(len(chunks)), "steps": args.steps,
        "dense_layers": list(base.dense_layers), "model": args.model, "seconds": round(time.perf_counter() - started, 1),
    }
    path = save_profile(profile, args.out)
    results["meta"]["seconds"] = time.perf_counter() - started
    results["meta"]["hashers"] = methods.hasher_digests()
    common.write_results(results, path.with_suffix(".json"))

    layers = [i for i in range(geometry.num_layers) if i not in base.dense_layers]
    print("| budget | mass, even | mass, by the profile | smallest / largest head share |")
    print("|---:|---:|---:|---|")
    for budget in shows:
        if not isinstance(budget, float):
            raise SpotlightError(f"--show takes fractions, got {budget!r}")
        shares = profile.allocate(budget, layers)
        even = profile.mass_at(torch.full_like(shares, budget), layers).mean()
        shared = profile.mass_at(shares, layers).mean()
        print(f"| {budget:g} | {even:.4f} | {shared:.4f} | {shares.min():.4f} / {shares.max():.4f} |")
    print(f"\nwrote {path} ({len(chunks)} chunks of {args.data}, {time.perf_counter() - started:.0f} s) and {path.with_suffix('.json')}")
    return 0
