"""`spotlight eval retrieval` with the learned hash scored by a real-valued or quantised query (issue 14, item 3).

    PYTHONPATH=src python benchmarks/weighted_query.py --levels P eval retrieval --methods spotlight ...
    PYTHONPATH=src python benchmarks/weighted_query.py table --domain NAME HAMMING.json real=REAL.json 3=P3.json ... \
        [--domain ...] --out DIR/weighted_query

Everything after the script's own options is a `spotlight` command line, run as the CLI runs it, except
that method `spotlight` scores keys with metrics.RealQuerySelector instead of Hamming agreement: the
query's pre-sign hash summed over the GQA group, against the same +-1 key codes (the same cache and
bytes read). `--levels real` keeps the weights real; `--levels P` rounds each weight's magnitude to
P bits (0 .. 2**P - 1 of its row's largest), which is what an integer kernel would score with P
popcounts of the query's bit planes. Results are labelled `spotlight` as usual: name the output
after P. The decode path itself (score_select) is untouched.

`table`: per domain and budget, each scoring's attention-mass recall and IoU against Hamming's (the
first file: plain `spotlight eval retrieval` on the same pack), with the paired difference over the
same chunks and its 95% bootstrap interval (eval/stats.py). Writes OUT.json, OUT.md and OUT.png;
prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from spotlight_attn.cli.main import main
from spotlight_attn.config import Method
from spotlight_attn.eval import common
from spotlight_attn.eval.stats import interval, resamples
from spotlight_attn.metrics import RealQuerySelector


def weighted_enable(levels: int | None):
    plain = common.Methods.enable

    def enable(self, spec, budget):
        installed = plain(self, spec, budget)
        if spec.method is Method.SPOTLIGHT:
            installed.selector = RealQuerySelector(installed.selector.hasher, Method.SPOTLIGHT, levels=levels)
        return installed

    return enable


def _spotlight_rows(path: str) -> dict:
    results = json.loads(pathlib.Path(path).read_text())
    return {r["budget"]: r for r in results["rows"] if r["method"] == "spotlight"}


def paired(hamming: dict, other: dict, metric: str) -> dict:
    """One budget's rows -> the other scoring's figure, Hamming's, and their paired difference with its interval."""
    h, o = (torch.tensor(r[f"chunk_{metric}"], dtype=torch.float64) for r in (hamming, other))
    if h.shape != o.shape:
        raise SystemExit(f"the two runs hold {len(h)} and {len(o)} chunks: not the same pack and settings")
    lo, hi = interval((o - h)[resamples(len(h))].mean(-1))
    return {"hamming": float(h.mean()), "value": float(o.mean()), "diff": float((o - h).mean()), "diff_lo": lo, "diff_hi": hi}


def table(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="weighted-query runs against Hamming, paired over chunks")
    parser.add_argument("--domain", nargs="+", action="append", required=True, metavar="NAME HAMMING.json LABEL=FILE",
                        help="a domain's name, its Hamming run, then LABEL=FILE for each other scoring")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for name, hamming_file, *others in args.domain:
        hamming = _spotlight_rows(hamming_file)
        for spec in others:
            label, _, path = spec.partition("=")
            if not path:
                parser.error(f"expected LABEL=FILE, got {spec!r}")
            other = _spotlight_rows(path)
            for budget in sorted(set(hamming) & set(other), reverse=True):
                rows.append({"domain": name, "scoring": label, "budget": budget, "chunks": len(other[budget]["chunk_mass"]),
                             "mass": paired(hamming[budget], other[budget], "mass"),
                             "iou": paired(hamming[budget], other[budget], "iou")})
    lines = ["| domain | budget | query weights | mass (Hamming) | mass | difference | IoU (Hamming) | IoU | difference |",
             "|---|---:|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        cells = [f"{m['hamming']:.4f} | {m['value']:.4f} | {m['diff']:+.4f} [{m['diff_lo']:+.4f}, {m['diff_hi']:+.4f}]"
                 for m in (r["mass"], r["iou"])]
        lines.append(f"| {r['domain']} | {r['budget']:.0%} | {r['scoring']} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        cells = sorted({(r["domain"], r["budget"]) for r in rows}, key=lambda c: (c[0], -c[1]))
        labels = list(dict.fromkeys(r["scoring"] for r in rows))
        width = 0.8 / len(labels)
        for ax, metric in zip(axes, ("mass", "iou")):
            for j, label in enumerate(labels):
                found = {(r["domain"], r["budget"]): r[metric] for r in rows if r["scoring"] == label}
                x = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cells))]
                y = [found[c]["diff"] if c in found else float("nan") for c in cells]
                err = [[found[c]["diff"] - found[c]["diff_lo"] for c in cells], [found[c]["diff_hi"] - found[c]["diff"] for c in cells]]
                ax.bar(x, y, width, yerr=err, capsize=3, label=f"query weights {label}")
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cells)), [f"{d} {b:.0%}" for d, b in cells], rotation=15)
            ax.set_title(f"{'attention-mass recall' if metric == 'mass' else 'IoU'}: minus Hamming's (95% interval)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


def run(argv: list[str]) -> int:
    if argv[:1] == ["table"]:
        return table(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", required=True, help="'real', or the query weights' bits P (1 .. 8)")
    args, rest = parser.parse_known_args(argv)
    if args.levels != "real" and not (args.levels.isdigit() and 1 <= int(args.levels) <= 8):
        parser.error(f"--levels must be 'real' or 1 .. 8, got {args.levels!r}")
    if not rest or rest[0] != "eval":
        parser.error("give a `spotlight eval ...` command line after --levels")
    common.Methods.enable = weighted_enable(None if args.levels == "real" else int(args.levels))
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
