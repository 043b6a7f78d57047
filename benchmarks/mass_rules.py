"""Budget rules from the learned hash's own scores, at the same keys read (issue 14, item 4).

    PYTHONPATH=src python benchmarks/mass_rules.py calibrate --out DIR [--data manpages] [--chunks 4]
    PYTHONPATH=src python benchmarks/mass_rules.py eval --calibration DIR/calibration.json \
        --data kjv-4112.safetensors --chunks 8 --out DIR/kjv

A fixed fraction gives every (layer, KV head) the same share of the cache at every step. The rules
here let the hash's Hamming scores x decide how many keys a head reads, step by step. Each head's
attention over its candidates (valid keys past the sinks, before the window) is estimated as
softmax(beta x), with one beta per (layer, KV head) fitted offline by cross-entropy against the
exact attention on calibration text (`calibrate`). Then, per head and step:
- top-p: read the candidates of highest score until their estimated share of the candidates' mass
  reaches p;
- level: read the candidates whose estimated weight is at least `level` times the mean candidate's.
The sinks and the window are read as always, and every head reads at least the budget's
min_tokens. The kernels could take either: pass 1's histogram of x already holds what the rules
need (count per score, so the estimated mass per score), and k per row is a device value.

The comparison, at the same mean keys read: a fixed fraction, the offline head budgets
(budgets.py, `--profile`), and top-p on the exact mass (what top-p would give with a perfect
estimate: not a bound on the mean mass, which top-p, equal mass per head, does not maximise). Every
rule sees the same queries and cache: the decode steps run dense (teacher forcing after a dense
prefill), and each rule's selection is scored against the exact attention of that step, so the
comparison is paired step for step. Per rule: keys read (fraction of the valid keys, sparse layers)
and attention-mass recall (the group-summed softmax on the selected keys / G), each over chunks with
a 95% bootstrap interval; and the rule's mass against the fixed rule's at the same keys read (the
fixed curve interpolated, per chunk, in log keys read), paired over chunks. Writes DIR.json, DIR.md
and DIR.png; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import replace

import torch

from spotlight_attn.attention import index_cache
from spotlight_attn.budgets import load_profile
from spotlight_attn.config import Budget, Method, SpotlightConfig
from spotlight_attn.eval.common import MethodSpec, Methods, atomic_write_text, decode_tokens, dense_prefill, machine
from spotlight_attn.eval.stats import mean_interval
from spotlight_attn.models import ModelGeometry, load_model
from spotlight_attn.selection.selectors import OracleSelector, Selector
from spotlight_attn.selection.topk import forced_mask, rows_budget, select_mask

BETAS = torch.logspace(math.log10(0.003), math.log10(3.0), 121, dtype=torch.float64)
FIXED = (0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)
HEADS = (0.02, 0.05, 0.1)
TOP_P = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
LEVELS = (32.0, 16.0, 8.0, 4.0, 2.0, 1.0)
ORACLE_P = (0.5, 0.7, 0.9)


class Probe(Selector):
    """Reads every valid key (a dense step through the sparse path) and hands the step to `record`."""

    def __init__(self, inner: Selector, record):
        self.inner = inner
        self.method = inner.method
        self.record = record
        self.oracle = OracleSelector()

    def key_index(self, layer_idx):
        return self.inner.key_index(layer_idx)

    def select(self, query, layer, budget, scaling):
        x = self.inner.scores(query, layer, scaling)  # [B, Hkv, T] group-summed agreeing bits
        probs = self.oracle.scores(query, layer, scaling)  # [B, Hkv, T] group-summed softmax, sums to G
        group = query.shape[1] // layer.keys.shape[1]
        self.record(layer.layer_idx, x, probs / group, layer.key_valid, budget)
        t = layer.keys.shape[2]
        every = torch.arange(t, device=x.device).expand(*x.shape[:2], t)
        return every.masked_fill(~layer.key_valid[:, None, :], -1)


def candidates(key_valid: torch.Tensor, budget: Budget) -> torch.Tensor:
    """[B, 1, T] bool: valid keys that are neither sink nor window (the ones a rule chooses among)."""
    return (key_valid & ~forced_mask(key_valid, budget.sink, budget.window))[:, None, :]


class Calibration:
    """Cross-entropy of softmax(beta x) against the exact attention over the candidates, per (layer, KV head) and beta."""

    def __init__(self, layers: int, kv_heads: int):
        self.loss = torch.zeros(layers, kv_heads, len(BETAS), dtype=torch.float64)

    def __call__(self, layer, x, share, key_valid, budget):
        cand = candidates(key_valid, budget)  # [B, 1, T]
        target = share.double().masked_fill(~cand, 0.0)
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)  # [B, Hkv, T]
        xs = x.double().masked_fill(~cand, float("-inf"))  # [B, Hkv, T]
        logits = BETAS[:, None, None, None] * xs[None]  # [J, B, Hkv, T]; every beta > 0, so non-candidates stay -inf
        logp = logits - torch.logsumexp(logits, -1, keepdim=True)
        ce = -(target[None] * logp.masked_fill(~cand[None], 0.0)).sum(-1)  # [J, B, Hkv]
        self.loss[layer] += ce.sum(1).T

    def betas(self, layers: list[int]) -> dict:
        best = self.loss.argmin(-1)  # [L, Hkv]
        return {str(i): BETAS[best[i]].tolist() for i in layers}


def rule_list(profile_path) -> list[tuple[str, str, float]]:
    """(family, label, level) of every rule measured."""
    out = [("fixed", f"fixed {f:g}", f) for f in FIXED]
    if profile_path:
        out += [("heads", f"heads {f:g}", f) for f in HEADS]
    out += [("top-p", f"top-p {p:g}", p) for p in TOP_P]
    out += [("level", f"level {v:g}", v) for v in LEVELS]
    out += [("oracle top-p", f"oracle top-p {p:g}", p) for p in ORACLE_P]
    return out


class Rules:
    """Each rule's keys read and mass recalled, summed per (chunk, rule) over sparse layers, KV heads and steps."""

    def __init__(self, rules, betas: dict, shares: dict):
        self.rules = rules
        self.betas = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in betas.items()}
        self.shares = shares  # {nominal fraction: {layer: Budget with per-head fractions}} (HeadBudgetProfile.layer_budgets)
        self.chunks: list[dict] = []

    def new_chunk(self):
        self.chunks.append({label: [0.0, 0.0, 0] for _, label, _ in self.rules})

    def __call__(self, layer, x, share, key_valid, budget):
        sums = self.chunks[-1]
        share = share.double()
        n_valid = key_valid.sum(-1)  # [B]
        cand = candidates(key_valid, budget)
        n_cand = cand.sum(-1).double()  # [B, 1]
        n_forced = (n_valid[:, None] - n_cand).long()  # [B, 1]
        beta = self.betas[layer].to(x.device)[None, :, None]  # [1, Hkv, 1]
        logits = (beta * x.double()).masked_fill(~cand, float("-inf"))
        est = torch.softmax(logits, -1).nan_to_num(0.0)  # [B, Hkv, T]: estimated share of the candidates' mass
        exact = share.masked_fill(~cand, 0.0)
        exact = exact / exact.sum(-1, keepdim=True).clamp(min=1e-30)
        rank = x.double() + torch.arange(x.shape[-1], device=x.device) / (2.0 * x.shape[-1])  # score, then recency
        order = torch.sort(rank.masked_fill(~cand, float("-inf")), dim=-1, descending=True).indices  # candidates first
        est_cum = est.gather(-1, order).cumsum(-1)
        exact_sorted = torch.sort(exact, dim=-1, descending=True).values.cumsum(-1)
        free = Budget(1.0, budget.min_tokens, budget.sink, budget.window)
        for family, label, level in self.rules:
            score = x
            if family == "fixed":
                k_rows = rows_budget(key_valid, Budget(level, budget.min_tokens, budget.sink, budget.window), x.shape[1])
            elif family == "heads":
                k_rows = rows_budget(key_valid, self.shares[level][layer], x.shape[1])
            else:
                if family == "top-p":
                    need = (est_cum < level).sum(-1) + 1
                elif family == "level":
                    need = (est * n_cand[..., None] >= level).sum(-1)
                else:  # oracle top-p: the exact mass, ranked by it
                    need = (exact_sorted < level).sum(-1) + 1
                    score = share
                need = torch.minimum(need, n_cand.long())
                k_rows = torch.minimum(torch.clamp(n_forced + need, min=budget.min_tokens), n_valid[:, None])
            picked = select_mask(score, key_valid, free, k_rows)
            sums[label][0] += float((picked.sum(-1) / n_valid[:, None]).sum())
            sums[label][1] += float((share * picked).sum(-1).sum())
            sums[label][2] += picked.shape[0] * picked.shape[1]


def run_chunks(model, methods, chunks, context, steps, record, on_chunk=None):
    """Prefill each chunk densely, then decode its next `steps` tokens through the Probe, which hands every step to `record`."""
    started = time.perf_counter()
    for n, chunk in enumerate(chunks):
        if on_chunk:
            on_chunk()
        _, prefill = dense_prefill(model, chunk[None, :context])
        installed = methods.enable(MethodSpec(Method.SPOTLIGHT), 1.0)
        installed.selector = Probe(installed.selector, record)
        decode_tokens(model, index_cache(model, prefill), chunk[None, context : context + steps])
        rate = (n + 1) / (time.perf_counter() - started)
        print(f"chunk {n + 1}/{len(chunks)}: {rate * 60:.2f} chunks/min, ETA {(len(chunks) - n - 1) / rate:.0f} s",
              file=sys.stderr, flush=True)


def interp_fixed(read: float, points: list[tuple[float, float]]) -> float:
    """The fixed rule's mass at `read` keys read, linear in log(read) between its measured points (clamped at the ends)."""
    points = sorted(points)
    xs = [math.log(r) for r, _ in points]
    x = min(max(math.log(read), xs[0]), xs[-1])
    for (x1, (_, y1)), (x2, (_, y2)) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x <= x2:
            return y1 + (y2 - y1) * (x - x1) / (x2 - x1) if x2 > x1 else y1
    return points[-1][1]


def summarize(rules, chunk_sums) -> list[dict]:
    rows = []
    per_chunk = []  # per chunk: {label: (read, mass)}
    for sums in chunk_sums:
        per_chunk.append({label: (s[0] / s[2], s[1] / s[2]) for label, s in sums.items()})
    fixed_labels = [label for family, label, _ in rules if family == "fixed"]
    for family, label, level in rules:
        reads = [c[label][0] for c in per_chunk]
        masses = [c[label][1] for c in per_chunk]
        gains = [c[label][1] - interp_fixed(c[label][0], [c[f] for f in fixed_labels]) for c in per_chunk]
        inside = all(min(c[f][0] for f in fixed_labels) <= c[label][0] <= max(c[f][0] for f in fixed_labels) for c in per_chunk)
        row = {"family": family, "rule": label, "level": level, "read": sum(reads) / len(reads), "mass": sum(masses) / len(masses),
               "chunk_read": reads, "chunk_mass": masses, "mass_vs_fixed": sum(gains) / len(gains), "within_fixed_range": inside}
        for name, values in (("read", reads), ("mass", masses), ("mass_vs_fixed", gains)):
            row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(values)
        rows.append(row)
    return rows


def table(rows) -> str:
    lines = ["| rule | keys read (sparse layers) | attention mass | mass vs fixed at the same keys read |", "|---|---:|---:|---|"]
    for r in rows:
        gain = "-" if r["family"] == "fixed" else f"{r['mass_vs_fixed']:+.4f} [{r['mass_vs_fixed_lo']:+.4f}, {r['mass_vs_fixed_hi']:+.4f}]"
        gain += "" if r["within_fixed_range"] or r["family"] == "fixed" else " (outside the fixed range)"
        lines.append(f"| {r['rule']} | {r['read']:.4f} | {r['mass']:.4f} [{r['mass_lo']:.4f}, {r['mass_hi']:.4f}] | {gain} |")
    return "\n".join(lines)


def plot(rows, path: pathlib.Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for family, marker in (("fixed", "o-"), ("heads", "D-"), ("top-p", "s-"), ("level", "^-"), ("oracle top-p", "x--")):
        pts = sorted((r["read"], r["mass"]) for r in rows if r["family"] == family)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=family if family != "oracle top-p" else "top-p on the exact mass")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the valid keys read (sparse layers)")
    ax.set_ylabel("attention-mass recall")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("calibrate", "eval"))
    parser.add_argument("--data", default="manpages", help="calibrate: a corpus (train split); eval: a held-out pack or corpus")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--calibration", type=pathlib.Path, help="eval: the calibrate run's calibration.json")
    parser.add_argument("--profile", type=pathlib.Path, help="eval: a head budget profile of the learned hash (spotlight calibrate)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="calibrate: a folder; eval: the results' path without suffix")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "eval" and (args.calibration is None or not args.calibration.is_file()):
        raise SystemExit(f"eval needs --calibration FILE (the calibrate run's calibration.json), got {args.calibration}")
    from spotlight_attn.data import default_split, load_chunks

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    geometry = ModelGeometry.from_model(model)
    base = SpotlightConfig()
    layers = [i for i in range(geometry.num_layers) if i not in base.dense_layers]
    methods = Methods(model, "smollm2-135m", base)
    split = "train" if args.mode == "calibrate" else default_split(args.data)
    chunks = load_chunks(args.data, tokenizer, args.context + args.steps, args.chunks, split=split)
    if not len(chunks):
        raise SystemExit(f"no chunks of {args.context + args.steps} tokens in {args.data}")
    started = time.perf_counter()
    meta = {"model": "smollm2-135m", "data": args.data, "split": split, "chunks": int(len(chunks)), "context": args.context, "steps": args.steps,
            "dense_layers": list(base.dense_layers), "budget": {"min_tokens": base.min_tokens, "sink": base.sink,
                                                                "window": base.window},
            "machine": machine(), "command": " ".join(["python benchmarks/mass_rules.py", *sys.argv[1:]])}

    if args.mode == "calibrate":
        cal = Calibration(geometry.num_layers, geometry.num_kv_heads)
        run_chunks(model, methods, chunks, args.context, args.steps, cal)
        betas = cal.betas(layers)
        meta["seconds"] = round(time.perf_counter() - started)
        meta["hashers"] = methods.hasher_digests()
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "calibration.json", json.dumps({"kind": "mass_rules_calibration", "meta": meta, "betas": betas}, indent=1) + "\n")
        flat = [b for v in betas.values() for b in v]
        edge = sum(b in (BETAS[0].item(), BETAS[-1].item()) for b in flat)
        print(f"beta per (layer, KV head): min {min(flat):.4f}, median {sorted(flat)[len(flat) // 2]:.4f}, max {max(flat):.4f}"
              f" ({edge} at the grid's ends); wrote {args.out / 'calibration.json'} ({meta['seconds']} s)")
        return 0

    cal = json.loads(args.calibration.read_text())
    installed = methods.enable(MethodSpec(Method.SPOTLIGHT), 1.0)
    meta["hashers"] = methods.hasher_digests()
    if set(cal["meta"]["hashers"].values()) != set(meta["hashers"].values()):
        raise SystemExit(f"the calibration {args.calibration} was made with another hasher than the shipped one")
    missing = [i for i in layers if str(i) not in cal["betas"]]
    if missing:
        raise SystemExit(f"the calibration {args.calibration} has no beta for layers {missing}")
    shares = {}
    if args.profile:
        profile = load_profile(args.profile)
        profile.check(model, geometry, installed.config, installed.selector.hasher, source=str(args.profile))
        shares = {f: profile.layer_budgets(replace(installed.config, budget=f), geometry.num_layers) for f in HEADS}
    rules = rule_list(args.profile)
    record = Rules(rules, cal["betas"], shares)
    run_chunks(model, methods, chunks, args.context, args.steps, record, on_chunk=record.new_chunk)
    rows = summarize(rules, record.chunks)
    meta["seconds"] = round(time.perf_counter() - started)
    meta["calibration"] = {"file": str(args.calibration), **{k: cal["meta"][k] for k in ("data", "chunks", "context", "steps")}}
    meta["profile"] = str(args.profile) if args.profile else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"kind": "mass_rules", "meta": meta, "rows": rows}, indent=1) + "\n")
    text = table(rows)
    atomic_write_text(args.out.with_suffix(".md"), text + "\n")
    plot(rows, args.out.with_suffix(".png"), f"budget rules, learned hash, {pathlib.Path(args.data).stem} (SmolLM2-135M)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
