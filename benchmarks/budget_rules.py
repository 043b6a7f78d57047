"""Budget rules at the same mean number of keys read: a fixed fraction per head against top-p (issue 14, item 4).

    PYTHONPATH=src python benchmarks/budget_rules.py [--tasks 20] [--length 4096] [--out DIR]

A fixed fraction gives every (layer, KV head) the same share of the cache, however concentrated its
attention is; top-p reads, per head and step, the fewest keys whose attention mass reaches p (as
Twilight and SpotAttention do). This script asks whether the rule is worth building for the hashes
by measuring it with the exact oracle first, where the mass is known: if top-p does not beat a fixed
fraction at the same keys read with exact scores, calibrated hash scores will not either.

Needle tasks (tasks.py passkey, `--tasks` seeds, depths spread over the haystack) on the real
SmolLM2-135M on the CPU, each context prefilled densely once and shared by every rule; the question
and answer are decoded through the rule under test (as `spotlight eval needle` does), layers 0-1
dense. For each rule: accuracy with a 95% bootstrap interval over tasks (eval/stats.py), and the
mean fraction of the valid keys its decode steps read (attention.read_fraction, over all layers:
the 2 dense ones count as read in full, so a fixed 10% reads 0.16 of the keys in all). Writes DIR/budget_rules.json and .md, and a PNG
of accuracy against keys read; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

from spotlight_attn.attention import index_cache, read_fraction
from spotlight_attn.config import Method, SpotlightConfig
from spotlight_attn.eval.common import MethodSpec, Methods, decode_tokens, dense_prefill, greedy, machine
from spotlight_attn.eval.needle import stop_ids
from spotlight_attn.eval.stats import mean_interval
from spotlight_attn.models import load_model
from spotlight_attn.selection.selectors import OracleSelector
from spotlight_attn.selection.topk import forced_mask
from spotlight_attn.tasks import encode_task, make_task


class OracleTopP(OracleSelector):
    """The oracle's exact attention mass, read per (batch row, KV head) until it reaches `mass`.

    Per head: the sink and window keys first (always read, their mass counts), then keys by mass,
    highest first, until the running mass (the group-summed softmax over G, so a head's valid keys
    sum to 1) reaches `mass`; at least the budget's `min_tokens`. Unused slots hold -1, so the
    cache's read counter counts exactly the keys read."""

    def __init__(self, mass: float):
        self.mass = mass

    def select(self, query, layer, budget, scaling):
        probs = self.scores(query, layer, scaling)  # [B, Hkv, T], each head's valid keys sum to G
        group = query.shape[1] // probs.shape[1]
        valid = layer.key_valid[:, None, :]  # [B, 1, T]
        share = (probs.double() / group).masked_fill(~valid, 0.0)
        forced = forced_mask(layer.key_valid, budget.sink, budget.window)[:, None, :]
        priority = share.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices  # [B, Hkv, T]
        covered = share.gather(-1, order).cumsum(-1)  # mass of the first j + 1 keys in that order
        need = (covered < self.mass).sum(-1) + 1  # [B, Hkv]: keys until the mass is reached
        n_valid = layer.key_valid.sum(-1)[:, None]  # [B, 1]
        floor = torch.clamp(forced.sum(-1), min=budget.min_tokens)  # [B, 1]
        need = torch.minimum(torch.maximum(need, floor), n_valid)
        k = int(need.max())
        picked = order[..., :k]
        t = probs.shape[-1]
        picked = picked.masked_fill(torch.arange(k, device=picked.device) >= need[..., None], t).sort(-1).values
        return picked.masked_fill(picked == t, -1)


def rules(args) -> list[tuple[str, float | None, OracleSelector | None]]:
    """(label, fixed fraction or None, top-p selector or None)."""
    out = [(f"fixed {f:.0%}", f, None) for f in args.fractions]
    out += [(f"top-p {p:g}", None, OracleTopP(p)) for p in args.masses]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--length", type=int, default=4096, help="context tokens of each task")
    parser.add_argument("--kind", default="passkey")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--masses", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("budget-rules"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    methods = Methods(model, "smollm2-135m", SpotlightConfig())
    oracle = MethodSpec(Method.ORACLE)
    stops = stop_ids(tokenizer)
    table = rules(args)
    rows = []
    started = time.perf_counter()
    for n in range(args.tasks):
        depth = (n + 0.5) / args.tasks
        task = make_task(tokenizer, args.kind, args.length, depth, seed=n)
        ids, split = encode_task(tokenizer, task)
        ids = torch.tensor([ids])
        _, prefill = dense_prefill(model, ids[:, :split])
        for label, fraction, selector in [("dense", None, None)] + table:
            if label == "dense":
                methods.enable(MethodSpec(Method.DENSE), None)
            else:
                installed = methods.enable(oracle, fraction if fraction is not None else 1.0)
                if selector is not None:
                    installed.selector = selector
            logits, cache = decode_tokens(model, index_cache(model, prefill), ids[:, split:])
            new = greedy(model, cache, logits[:, -1], 24, stops)
            reply = tokenizer.decode(new, skip_special_tokens=True)
            rows.append({"task": n, "depth": depth, "tokens": int(ids.shape[1]), "rule": label, "score": task.score(reply),
                         "read_fraction": read_fraction(cache) if label != "dense" else 1.0, "reply": reply})
        done = n + 1
        rate = done / (time.perf_counter() - started)
        print(f"task {done}/{args.tasks}: {rate * 60:.1f} tasks/min, ETA {(args.tasks - done) / rate:.0f} s", file=sys.stderr, flush=True)

    summary = []
    for label in ["dense"] + [r[0] for r in table]:
        mine = [r for r in rows if r["rule"] == label]
        scores = [r["score"] for r in mine]
        lo, hi = mean_interval(scores)
        summary.append({"rule": label, "tasks": len(mine), "accuracy": sum(scores) / len(scores), "accuracy_lo": lo, "accuracy_hi": hi,
                        "read_fraction": sum(r["read_fraction"] for r in mine) / len(mine)})
    results = {"kind": "budget_rules", "meta": {"model": "smollm2-135m", "task": args.kind, "length": args.length, "tasks": args.tasks,
                                                  "machine": machine(), "seconds": round(time.perf_counter() - started),
                                                  "command": " ".join(["python benchmarks/budget_rules.py", *sys.argv[1:]])},
               "summary": summary, "rows": rows}
    (args.out / "budget_rules.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| rule | keys read (all layers) | accuracy [95% interval] |", "|---|---:|---|"]
    lines += [f"| {s['rule']} | {s['read_fraction']:.3f} | {100 * s['accuracy']:.0f}% [{100 * s['accuracy_lo']:.0f}, {100 * s['accuracy_hi']:.0f}] |"
              for s in summary]
    (args.out / "budget_rules.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for prefix, marker in (("fixed", "o-"), ("top-p", "s-")):
            pts = [s for s in summary if s["rule"].startswith(prefix)]
            ax.errorbar([s["read_fraction"] for s in pts], [s["accuracy"] for s in pts],
                        yerr=[[s["accuracy"] - s["accuracy_lo"] for s in pts], [s["accuracy_hi"] - s["accuracy"] for s in pts]],
                        fmt=marker, capsize=3, label=f"oracle, {prefix}")
        dense = summary[0]["accuracy"]
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of the cache read per step (all layers)")
        ax.set_ylabel(f"{args.kind} accuracy, {args.tasks} tasks at {args.length} tokens")
        ax.set_title("budget rules at the same keys read (SmolLM2-135M)")
        ax.legend()
        fig.savefig(args.out / "budget_rules.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
