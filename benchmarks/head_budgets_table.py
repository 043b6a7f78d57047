"""Head budgets against the even budget, paired over the same chunks: a table, JSON rows and a PNG.

    PYTHONPATH=src python benchmarks/head_budgets_table.py --domain kjv PPL.json MASS.json \
        --domain perl-docs PPL.json MASS.json --out docs/results/head_budgets/head_budgets

PPL.json: `spotlight eval ppl` results (merged) holding dense, METHOD and METHOD+heads; MASS.json:
`spotlight eval retrieval` results holding METHOD and METHOD+heads. For every (domain, method, budget):
perplexity against dense and attention-mass recall, even and by the profile, and the paired
difference (heads - even) with a 95% bootstrap interval over chunks (eval/stats.py's resamples).
Prints the markdown table last; writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from paired_retrieval import paired, paired_ppl  # this folder's script: the same pairing and intervals


def _rows(results: dict, method: str) -> dict:
    return {r["budget"]: r for r in results["rows"] if r["method"] == method}


def ppl_pairs(results: dict, method: str) -> list[dict]:
    dense = next(r for r in results["rows"] if r["method"] == "dense")
    even, heads = _rows(results, method), _rows(results, method + "+heads")
    out = []
    for budget in sorted(set(even) & set(heads), reverse=True):
        p = paired_ppl(dense, even[budget], heads[budget])
        out.append({"budget": budget, "dense_ppl": dense["ppl"], "even": p["base"], "heads": p["value"],
                    "diff": p["value"] - p["base"], "diff_lo": p["diff_lo"], "diff_hi": p["diff_hi"],  # as committed, to the bit
                    "even_read": even[budget]["read_fraction"], "heads_read": heads[budget]["read_fraction"]})
    return out


def mass_pairs(results: dict, method: str) -> list[dict]:
    even, heads = _rows(results, method), _rows(results, method + "+heads")
    out = []
    for budget in sorted(set(even) & set(heads), reverse=True):
        m = paired(even[budget], heads[budget], "mass")
        out.append({"budget": budget, "even": m["base"], "heads": m["value"], "diff": m["diff"],
                    "diff_lo": m["diff_lo"], "diff_hi": m["diff_hi"], "chunks": len(even[budget]["chunk_mass"])})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", nargs=3, action="append", metavar=("NAME", "PPL", "MASS"), required=True)
    parser.add_argument("--method", default="spotlight")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    table = []
    for name, ppl_file, mass_file in args.domain:
        ppl, mass = json.loads(pathlib.Path(ppl_file).read_text()), json.loads(pathlib.Path(mass_file).read_text())
        masses = {m["budget"]: m for m in mass_pairs(mass, args.method)}
        for p in ppl_pairs(ppl, args.method):
            table.append({"domain": name, "method": args.method, "budget": p["budget"], "ppl": p,
                          "chunks": len(ppl["rows"][0]["chunk_nll"]), "mass": masses.get(p["budget"])})
    lines = ["| domain | budget | ppl vs dense, even | by the profile | heads - even (points) | mass, even | by the profile | heads - even |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for row in table:
        p, m = row["ppl"], row["mass"]
        mass = (f"{m['even']:.4f} | {m['heads']:.4f} | {m['diff']:+.4f} [{m['diff_lo']:+.4f}, {m['diff_hi']:+.4f}]"
                if m else "- | - | -")
        lines.append(f"| {row['domain']} | {row['budget']:.0%} | {p['even']:+.2%} | {p['heads']:+.2%} | "
                     f"{p['diff'] * 100:+.2f} [{p['diff_lo'] * 100:+.2f}, {p['diff_hi'] * 100:+.2f}] | {mass} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = [f"{r['domain']} {r['budget']:.0%}" for r in table]
        x = torch.arange(len(table)).float()
        for ax, key, scale, title in ((axes[0], "ppl", 100, "perplexity vs dense (%)"), (axes[1], "mass", 1, "attention-mass recall")):
            even = [r[key]["even"] * scale if r[key] else float("nan") for r in table]
            heads = [r[key]["heads"] * scale if r[key] else float("nan") for r in table]
            ax.bar(x - 0.2, even, 0.4, label="even budget")
            ax.bar(x + 0.2, heads, 0.4, label="head budgets")
            ax.set_xticks(x, labels, rotation=20)
            ax.set_title(title)
            if key == "mass":
                ax.set_ylim(min(e for e in even if e == e) - 0.05, 1.0)
        axes[0].legend()
        fig.suptitle(f"{args.method}: the same mean budget, shared evenly or by the head budget profile")
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
