"""`spotlight eval retrieval` (or `eval ppl`) runs against a baseline, paired over the same chunks: a table, JSON rows and a PNG.

    PYTHONPATH=src python benchmarks/paired_retrieval.py \
        --domain NAME BASE=FILE[#METHOD] LABEL=FILE[#METHOD] ... [--domain ...] --out DIR/NAME

Per domain, the first LABEL=FILE is the baseline; every other one is compared with it at each budget
both hold: attention-mass recall and IoU, each side's mean over chunks and the paired difference
(other - baseline) with its 95% bootstrap interval over chunks (eval/stats.py's resamples). #METHOD
picks the rows of one method of the file (default `spotlight`), so two methods of one run compare
too (`mass.json#linear1024+heads`). Both must come from the same pack and settings: the chunk counts
are checked. Perplexity results compare the same way on perplexity against dense (the difference in
points of dense's perplexity), dense read from whichever of the domain's files holds it (where several
do, they must agree chunk for chunk). Writes OUT.json, OUT.md and OUT.png; prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from spotlight_attn.eval.stats import interval, resamples


def method_rows(spec: str) -> tuple[str, dict, dict]:
    """'LABEL=FILE[#METHOD]' -> (label, {budget: row} of that method's rows, the whole results)."""
    label, _, target = spec.partition("=")
    if not target:
        raise SystemExit(f"expected LABEL=FILE[#METHOD], got {spec!r}")
    path, _, method = target.partition("#")
    results = json.loads(pathlib.Path(path).read_text())
    rows = {r["budget"]: r for r in results["rows"] if r["method"] == (method or "spotlight")}
    if not rows:
        found = sorted({r["method"] for r in results["rows"]})
        raise SystemExit(f"{path} holds no rows of method {method or 'spotlight'!r} (it has {found})")
    return label, rows, results


def paired(base: dict, other: dict, metric: str) -> dict:
    """One budget's rows -> the other's figure, the baseline's, and their paired difference with its interval."""
    b, o = (torch.tensor(r[f"chunk_{metric}"], dtype=torch.float64) for r in (base, other))
    if b.shape != o.shape:
        raise SystemExit(f"the two runs hold {len(b)} and {len(o)} chunks: not the same pack and settings")
    lo, hi = interval((o - b)[resamples(len(b))].mean(-1))
    return {"base": float(b.mean()), "value": float(o.mean()), "diff": float((o - b).mean()), "diff_lo": lo, "diff_hi": hi}


def paired_ppl(dense: dict, base: dict, other: dict) -> dict:
    """One budget's perplexity rows -> each side's perplexity against dense and their paired difference."""
    d, b, o = (torch.tensor(r["chunk_nll"], dtype=torch.float64) for r in (dense, base, other))
    tokens = torch.tensor(dense["chunk_tokens"], dtype=torch.float64)
    if not (d.shape == b.shape == o.shape) or any(r["chunk_tokens"] != dense["chunk_tokens"] for r in (base, other)):
        raise SystemExit("the perplexity runs do not score the same chunks: not the same pack and settings")
    ppl = lambda nll, ix=slice(None): torch.exp(nll[ix].sum(-1) / tokens[ix].sum(-1))  # noqa: E731
    idx = resamples(len(d))
    lo, hi = interval((ppl(o, idx) - ppl(b, idx)) / ppl(d, idx))
    return {"base": float(ppl(b) / ppl(d) - 1), "value": float(ppl(o) / ppl(d) - 1),
            "diff": float((ppl(o) - ppl(b)) / ppl(d)), "diff_lo": lo, "diff_hi": hi}


def dense_row(runs: list[dict]) -> dict:
    """The dense row of a domain's perplexity runs, checked to agree wherever more than one run holds it."""
    found = [r for results in runs for r in results["rows"] if r["method"] == "dense"]
    if not found:
        raise SystemExit("perplexity runs need dense: none of the domain's files holds a dense row")
    if any(r["chunk_nll"] != found[0]["chunk_nll"] for r in found):
        raise SystemExit("the domain's files hold different dense rows: not the same pack and settings")
    return found[0]


def compare(domains: list[list[str]]) -> list[dict]:
    rows = []
    for name, base_spec, *others in domains:
        base_label, base, base_results = method_rows(base_spec)
        runs = [method_rows(spec) for spec in others]
        kinds = {base_results.get("kind")} | {results.get("kind") for *_, results in runs}
        if len(kinds) > 1:
            raise SystemExit(f"--domain {name}: results of different kinds ({sorted(map(str, kinds))}) do not pair")
        dense = dense_row([base_results] + [results for *_, results in runs]) if kinds == {"ppl"} else None
        for label, other, _ in runs:
            for budget in sorted(set(base) & set(other), reverse=True):
                row = {"domain": name, "base": base_label, "label": label, "budget": budget,
                       "chunks": len(other[budget]["chunk_nll" if dense else "chunk_mass"])}
                if dense:
                    row["ppl_vs_dense"] = paired_ppl(dense, base[budget], other[budget])
                else:
                    row["mass"] = paired(base[budget], other[budget], "mass")
                    row["iou"] = paired(base[budget], other[budget], "iou")
                rows.append(row)
    return rows


METRICS = {"mass": "attention-mass recall", "iou": "IoU", "ppl_vs_dense": "perplexity vs dense"}


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["domain"], r["budget"]) for r in rows}, key=lambda c: (c[0], -c[1]))
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5 * len(metrics), 1.5 * len(cells)), 4.2), squeeze=False)
    axes = axes[0]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / len(labels)
    for ax, metric in zip(axes, metrics):
        scale = 100 if metric == "ppl_vs_dense" else 1  # perplexity in points of dense's
        for j, label in enumerate(labels):
            found = {(r["domain"], r["budget"]): r[metric] for r in rows if r["label"] == label and metric in r}
            x = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cells))]
            nan = {"diff": float("nan"), "diff_lo": float("nan"), "diff_hi": float("nan")}
            got = [{k: scale * v for k, v in found.get(c, nan).items()} for c in cells]
            err = [[g["diff"] - g["diff_lo"] for g in got], [g["diff_hi"] - g["diff"] for g in got]]
            ax.bar(x, [g["diff"] for g in got], width, yerr=err, capsize=3, label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cells)), [f"{d} {b:.0%}" for d, b in cells], rotation=30, ha="right", fontsize=8)
        baselines = " / ".join(dict.fromkeys(r["base"] for r in rows))
        title = f"{METRICS[metric]} minus {baselines}'s{' (points)' if metric == 'ppl_vs_dense' else ''} (95% interval)"
        ax.set_title(title, fontsize=10 if len(title) < 60 else 8)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict], ppl: bool) -> list[str]:
    """Markdown lines of retrieval rows (mass and IoU) or of perplexity rows (against dense, in %)."""
    if not rows:
        return []
    if ppl:
        lines = ["| domain | budget | run | baseline | ppl vs dense, baseline | ppl vs dense | difference (points) |",
                 "|---|---:|---|---|---:|---:|---|"]
        cell = lambda m: (f"{100 * m['base']:+.2f}% | {100 * m['value']:+.2f}% | {100 * m['diff']:+.2f} "  # noqa: E731
                          f"[{100 * m['diff_lo']:+.2f}, {100 * m['diff_hi']:+.2f}]")
    else:
        lines = ["| domain | budget | run | baseline | mass, baseline | mass | difference | IoU, baseline | IoU | difference |",
                 "|---|---:|---|---|---:|---:|---|---:|---:|---|"]
        cell = lambda m: f"{m['base']:.4f} | {m['value']:.4f} | {m['diff']:+.4f} [{m['diff_lo']:+.4f}, {m['diff_hi']:+.4f}]"  # noqa: E731
    for r in rows:
        cells = [cell(r[m]) for m in (["ppl_vs_dense"] if ppl else ["mass", "iou"])]
        lines.append(f"| {r['domain']} | {r['budget']:.0%} | {r['label']} | {r['base']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", nargs="+", action="append", required=True, metavar="NAME BASE=FILE LABEL=FILE",
                        help="a domain's name, its baseline run, then each run to compare with it")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    for domain in args.domain:
        if len(domain) < 3:
            parser.error(f"--domain {' '.join(domain)}: give a name, a baseline and at least one run to compare")
    rows = compare(args.domain)
    lines = table([r for r in rows if "mass" in r], False) + table([r for r in rows if "ppl_vs_dense" in r], True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
