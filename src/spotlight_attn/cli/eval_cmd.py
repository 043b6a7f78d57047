"""`spotlight eval retrieval|ppl|needle|fidelity` and `spotlight report`.

    spotlight eval ppl --model smollm2-135m --methods dense,oracle,spotlight,linear1024 --budgets 0.1,0.02 --out results/ppl.json
    spotlight eval needle --kinds passkey,single --lengths 4096,8192 --depths 0.1,0.5,0.9 --out results/needle.json
    spotlight report results/ppl.json results/needle.json

Each eval writes its results JSON, a markdown table beside it (same name, .md) and its plots (PNG,
same stem), and prints the table. --limit caps the chunks / prompts / tasks for a quick run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_METHODS = "dense,oracle,spotlight,linear128,linear1024,quest,streaming"
KINDS = ("retrieval", "ppl", "needle", "fidelity")


def _ints(text: str) -> list[int]:
    from spotlight_attn.errors import SpotlightError

    try:
        return [int(float(w[:-1]) * 1024) if w.lower().endswith("k") else int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SpotlightError(f"{text!r} is not a comma-separated list of integers (4096 or 4K)") from None


def _floats(text: str) -> list[float]:
    from spotlight_attn.errors import SpotlightError

    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SpotlightError(f"{text!r} is not a comma-separated list of numbers") from None


def add_parser(subparsers, parents=()) -> None:
    from spotlight_attn.cli.main import _model_args

    evaluate = subparsers.add_parser("eval", help="evaluate methods side by side: retrieval, ppl, needle, fidelity",
                                     description=__doc__.split("\n")[0])
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in [
        ("retrieval", "IoU and attention-mass recall vs the oracle, per layer and KV head"),
        ("ppl", "perplexity of held-out text with retrieval active"),
        ("needle", "passkey and RULER-style needle tasks, accuracy per length x depth"),
        ("fidelity", "greedy answers vs the dense model's: exact match, token agreement, ROUGE-L"),
    ]:
        p = kinds.add_parser(kind, parents=list(parents), help=text, description=text)
        _model_args(p, "smollm2-135m")
        p.add_argument("--hasher", metavar="FILE", help="learned hasher for 'spotlight' (default: the one shipped for the model)")
        p.add_argument("--methods", default=DEFAULT_METHODS,
                       help="comma-separated: dense, oracle, streaming, spotlight[=FILE], linear<bits>, quest[:<page>] (default: %(default)s)")
        p.add_argument("--budgets", default="0.1,0.02", help="comma-separated fractions ('0.1', '2%%') or counts (default: %(default)s)")
        p.add_argument("--head-budgets", metavar="METHOD=FILE,...",
                       help="also run these methods with a head budget profile (`spotlight calibrate`), as METHOD+heads")
        p.add_argument("--out", type=Path, default=Path(f"results/{kind}.json"), help="results JSON; .md and .png beside it (default: %(default)s)")
        p.add_argument("--limit", type=int, metavar="N", help="at most N chunks / prompts / tasks, for a quick run")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, help="CPU threads for torch")
        p.add_argument("--sink", type=int, help="first tokens always read (default: SpotlightConfig's)")
        p.add_argument("--window", type=int, help="most recent tokens always read (default: SpotlightConfig's)")
        p.add_argument("--min-tokens", type=int, help="fewest tokens a step reads (default: SpotlightConfig's)")
        p.add_argument("--dense-layers", metavar="I,J", help="layers that always read every key (default: SpotlightConfig's)")
        if kind in ("retrieval", "ppl", "fidelity"):
            p.add_argument("--data", default="kjv", help="corpus: a built-in name, or your own text file, folder, .jsonl or .parquet "
                                                         "(default: %(default)s; see `spotlight train --help`)")
            p.add_argument("--split", choices=("auto", "heldout", "all"), default="auto",
                           help="which documents of --data: 'heldout' (never in `spotlight train`'s split of the same corpus), "
                                "'all'; auto = heldout for a built-in corpus, all for your own files (default: %(default)s)")
        if kind == "retrieval":
            p.add_argument("--contexts", default="2048,4096", help="context lengths (default: %(default)s)")
            p.add_argument("--chunks", type=int, default=2, help="held-out chunks per context (default: %(default)s)")
            p.add_argument("--steps", type=int, default=16, help="decode steps measured per chunk (default: %(default)s)")
        if kind == "ppl":
            p.add_argument("--length", default="4096", help="tokens per held-out chunk (default: %(default)s)")
            p.add_argument("--prefix", type=int, default=1024, help="tokens prefilled before retrieval starts (default: %(default)s)")
            p.add_argument("--chunks", type=int, default=4, help="held-out chunks (default: %(default)s)")
            p.add_argument("--mode", choices=("fast", "decode"), default="fast",
                           help="fast: one teacher-forced pass; decode: token by token (same numbers, slower) (default: %(default)s)")
        if kind == "needle":
            p.add_argument("--kinds", default="passkey,single", help="passkey, single, multikey, multivalue, multiquery (default: %(default)s)")
            p.add_argument("--lengths", default="4096,8000", help="prompt lengths in tokens, e.g. 1K,4K (default: %(default)s)")
            p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths 0..1 (default: %(default)s)")
            p.add_argument("--seeds", default="0,1", help="task seeds (default: %(default)s)")
            p.add_argument("--max-new-tokens", type=int, default=24, help="(default: %(default)s)")
        if kind == "fidelity":
            p.add_argument("--length", default="2048", help="passage tokens (default: %(default)s)")
            p.add_argument("--prompts", type=int, default=8, help="prompts (default: %(default)s)")
            p.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
        p.set_defaults(run=run_eval)

    report = subparsers.add_parser("report", parents=list(parents), help="results files -> markdown tables and plots",
                                   description="Print each results file's markdown table and draw its plots.")
    report.add_argument("files", nargs="+", type=Path, metavar="RESULTS.json")
    report.add_argument("--out", type=Path, help="folder for the plots (default: beside each file)")
    report.add_argument("--summary", type=Path, metavar="SUMMARY.json",
                        help="also write one row per (domain, method, budget) of these files into SUMMARY.json "
                             "(mass, ppl_vs_dense, needle_acc with 95%% bounds; rows of other domains there are kept)")
    report.add_argument("--domain", help="the domain of every file given (default: each file's data spec)")
    report.add_argument("--merge", type=Path, metavar="MERGED.json",
                        help="first merge the files (one evaluation run as several processes, each over its own methods) "
                             "into MERGED.json, intervals and pairings with dense recomputed, and report that")
    report.set_defaults(run=run_report)


def _base_config(args):
    from spotlight_attn.cli.main import parse_layers
    from spotlight_attn.config import SpotlightConfig

    kwargs = {name: getattr(args, name) for name in ("sink", "window", "min_tokens") if getattr(args, name) is not None}
    if args.dense_layers is not None:
        kwargs["dense_layers"] = parse_layers(args.dense_layers, "--dense-layers")
    return SpotlightConfig(**kwargs)


def _limit(n: int, args) -> int:
    return n if args.limit is None else max(1, min(n, args.limit))


def load_reporting(spec, tokenizer, length: int, wanted: int, split, what: str, seed: int):
    """load_chunks, saying on stderr when the corpus holds fewer chunks of `length` tokens than asked for."""
    import sys

    from spotlight_attn.data import load_chunks

    chunks = load_chunks(spec, tokenizer, length, wanted, split=split, seed=seed)
    if len(chunks) < wanted:
        print(f"spotlight: {spec} ({split or 'all'} split) holds {len(chunks)} chunks of {length} tokens, fewer "
              f"than the {wanted} {what} asked for: running {len(chunks)}", file=sys.stderr)
    return chunks


def run_eval(args) -> int:
    import torch

    from spotlight_attn.cli.main import torch_dtype
    from spotlight_attn.errors import SpotlightError
    from spotlight_attn.eval import common, report
    from spotlight_attn.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = common.with_head_budgets(common.parse_methods(args.methods, args.hasher), args.head_budgets)
    budgets = common.parse_budgets(args.budgets)
    base = _base_config(args)
    if args.out.suffix != ".json":
        raise SpotlightError(f"--out must name a .json file, got {args.out}")
    model, tokenizer = load_model(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    methods = common.Methods(model, args.model, base)
    for spec in specs:
        if spec.method.value == "spotlight":
            methods.hasher_path(spec)  # fail now, not after an hour of other methods
    limit_positions = getattr(model.config, "max_position_embeddings", None)
    started = time.perf_counter()

    def fits(n: int, what: str) -> int:
        if limit_positions is not None and n > limit_positions:
            raise SpotlightError(f"{what} {n} exceeds the model's context of {limit_positions} tokens")
        return n

    split = None
    if args.kind in ("retrieval", "ppl", "fidelity"):
        from spotlight_attn.data import default_split

        split = default_split(args.data) if args.split == "auto" else args.split
    if args.kind == "retrieval":
        from spotlight_attn.eval.retrieval import evaluate_retrieval

        contexts = _ints(args.contexts)
        chunks = {c: load_reporting(args.data, tokenizer, fits(c + args.steps, "context + steps"), _limit(args.chunks, args),
                                    split, "chunks", args.seed)
                  for c in contexts}
        results = evaluate_retrieval(model, methods, specs, budgets, chunks, args.steps, data=args.data, seed=args.seed)
    elif args.kind == "ppl":
        from spotlight_attn.eval.ppl import evaluate_ppl

        length = fits(_ints(args.length)[0], "--length")
        chunks = load_reporting(args.data, tokenizer, length, _limit(args.chunks, args), split, "chunks", args.seed)
        results = evaluate_ppl(model, methods, specs, budgets, chunks, args.prefix, args.mode, data=args.data, seed=args.seed)
    elif args.kind == "needle":
        from spotlight_attn.eval.needle import evaluate_needle

        lengths = [fits(n, "needle length") for n in _ints(args.lengths)]
        seeds = _ints(args.seeds)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        depths = _floats(args.depths)
        if args.limit is not None:  # the fewest tasks that still cover each kind and length
            depths, seeds = depths[: max(1, args.limit)], seeds[:1]
        results = evaluate_needle(model, tokenizer, methods, specs, budgets, kinds, lengths, depths, seeds, args.max_new_tokens)
    else:
        from spotlight_attn.eval.fidelity import evaluate_fidelity

        length = fits(_ints(args.length)[0], "--length")
        chunks = load_reporting(args.data, tokenizer, length, _limit(args.prompts, args), split, "prompts", args.seed)
        passages = [tokenizer.decode(chunk, skip_special_tokens=True) for chunk in chunks]
        results = evaluate_fidelity(model, tokenizer, methods, specs, budgets, passages, args.max_new_tokens, data=args.data, seed=args.seed)
        results["meta"]["settings"]["passage_tokens"] = length

    if split is not None:
        results["meta"]["split"] = split
    results["meta"]["seconds"] = time.perf_counter() - started
    results["meta"]["hashers"] = methods.hasher_digests()
    results["meta"]["hasher_bits"] = methods.hasher_bits()
    path = common.write_results(results, args.out)
    plots = report.plot(results, path.parent, path.stem)
    print(report.markdown(results))
    print(f"\nwrote {path}, {path.with_suffix('.md')}, " + ", ".join(str(p) for p in plots))
    return 0


def run_report(args) -> int:
    from spotlight_attn.eval import common, report, summary

    loaded = [(path, common.read_results(path)) for path in args.files]
    if args.merge is not None:
        merged = common.merge_results([r for _, r in loaded], [str(p) for p, _ in loaded])
        loaded = [(common.write_results(merged, args.merge), merged)]
        print(f"merged {len(args.files)} files into {args.merge}")
    every = []
    for path, results in loaded:
        every.append(results)
        plots = report.plot(results, args.out or path.parent, path.stem)
        print(f"## {results['kind']}: {path}\n\n{report.markdown(results)}\n\nplots: " + ", ".join(str(p) for p in plots) + "\n")
    if args.summary is not None:
        rows = summary.quality_summary(every, args.domain)
        summary.write_summary(args.summary, rows)
        print(f"wrote {len(rows)} rows to {args.summary}")
    return 0
