"""`spotlight eval retrieval` runs against a baseline, paired over the same chunks: a table, JSON rows and a PNG.

    PYTHONPATH=src python benchmarks/paired_retrieval.py \
        --domain NAME BASE=FILE[#METHOD] LABEL=FILE[#METHOD] ... [--domain ...] --out DIR/NAME

Per domain, the first LABEL=FILE is the baseline; every other one is compared with it at each budget
both hold: attention-mass recall and IoU, each side's mean over chunks and the paired difference
(other - baseline) with its 95% bootstrap interval over chunks (eval/stats.py's resamples). #METHOD
picks the rows of one method of the file (default `spotlight`), so two methods of one run compare
too (`mass.json#linear1024+heads`). Both must come from the same pack and settings: the chunk counts
are checked. Writes OUT.json, OUT.md and OUT.png; prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from spotlight_attn.eval.stats import interval, resamples


def method_rows(spec: str) -> tuple[str, dict]:
    """'LABEL=FILE[#METHOD]' -> (label, {budget: row}) of that method's rows."""
    label, _, target = spec.partition("=")
    if not target:
        raise SystemExit(f"expected LABEL=FILE[#METHOD], got {spec!r}")
    path, _, method = target.partition("#")
    results = json.loads(pathlib.Path(path).read_text())
    rows = {r["budget"]: r for r in results["rows"] if r["method"] == (method or "spotlight")}
    if not rows:
        found = sorted({r["method"] for r in results["rows"]})
        raise SystemExit(f"{path} holds no rows of method {method or 'spotlight'!r} (it has {found})")
    return label, rows


def paired(base: dict, other: dict, metric: str) -> dict:
    """One budget's rows -> the other's figure, the baseline's, and their paired difference with its interval."""
    b, o = (torch.tensor(r[f"chunk_{metric}"], dtype=torch.float64) for r in (base, other))
    if b.shape != o.shape:
        raise SystemExit(f"the two runs hold {len(b)} and {len(o)} chunks: not the same pack and settings")
    lo, hi = interval((o - b)[resamples(len(b))].mean(-1))
    return {"base": float(b.mean()), "value": float(o.mean()), "diff": float((o - b).mean()), "diff_lo": lo, "diff_hi": hi}


def compare(domains: list[list[str]]) -> list[dict]:
    rows = []
    for name, base_spec, *others in domains:
        base_label, base = method_rows(base_spec)
        for spec in others:
            label, other = method_rows(spec)
            for budget in sorted(set(base) & set(other), reverse=True):
                rows.append({"domain": name, "base": base_label, "label": label, "budget": budget,
                             "chunks": len(other[budget]["chunk_mass"]),
                             "mass": paired(base[budget], other[budget], "mass"),
                             "iou": paired(base[budget], other[budget], "iou")})
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["domain"], r["budget"]) for r in rows}, key=lambda c: (c[0], -c[1]))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(cells)), 4.2))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / len(labels)
    for ax, metric in zip(axes, ("mass", "iou")):
        for j, label in enumerate(labels):
            found = {(r["domain"], r["budget"]): r[metric] for r in rows if r["label"] == label}
            x = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cells))]
            nan = {"diff": float("nan"), "diff_lo": float("nan"), "diff_hi": float("nan")}
            got = [found.get(c, nan) for c in cells]
            err = [[g["diff"] - g["diff_lo"] for g in got], [g["diff_hi"] - g["diff"] for g in got]]
            ax.bar(x, [g["diff"] for g in got], width, yerr=err, capsize=3, label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cells)), [f"{d} {b:.0%}" for d, b in cells], rotation=30, ha="right", fontsize=8)
        baselines = " / ".join(dict.fromkeys(r["base"] for r in rows))
        ax.set_title(f"{'attention-mass recall' if metric == 'mass' else 'IoU'} minus {baselines}'s (95% interval)", fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    lines = ["| domain | budget | run | baseline | mass, baseline | mass | difference | IoU, baseline | IoU | difference |",
             "|---|---:|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        cells = [f"{m['base']:.4f} | {m['value']:.4f} | {m['diff']:+.4f} [{m['diff_lo']:+.4f}, {m['diff_hi']:+.4f}]"
                 for m in (r["mass"], r["iou"])]
        lines.append(f"| {r['domain']} | {r['budget']:.0%} | {r['label']} | {r['base']} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
