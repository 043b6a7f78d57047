"""Write the quality summary's table into docs/RESULTS.md (or check that it is there).

    python benchmarks/results_md.py [--summary docs/results/quality_summary.json] [--doc docs/RESULTS.md] [--check]
    python benchmarks/results_md.py --build RUN_DIR   # first: the summary's rows from a quality run's results

`--build RUN_DIR` takes what benchmarks/h200_quality.sh's phases left in one $OUT (or in folders merged
from several calls): perplexity (quality/ppl_DOMAIN.json), attention mass (mass/DOMAIN_linear1024.json
and mass/DOMAIN_BEST.json, BEST the hasher select/best.txt names), the needle (quality/needle.json,
domain needle-KIND-Nk). Their rows replace those domains' rows in the summary; other domains' rows
stay. The write is atomic, and a run folder missing a file is refused by name before anything is
written.

The table (`spotlight_attn.eval.summary.summary_table`: a column per method and budget, a line per
figure and domain, 95% bounds) replaces what stands between the two marker lines below in the
document; the rest of the document is left as it is. The write is atomic. `--check` writes nothing
and exits 1 if the document's table is not the summary's (the test suite checks the same, so the
table cannot drift from the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spotlight_attn.errors import SpotlightError
from spotlight_attn.eval.common import atomic_write_text, read_results
from spotlight_attn.eval.summary import quality_summary, summary_table, write_summary

BEGIN = "<!-- quality summary table: written by benchmarks/results_md.py from docs/results/quality_summary.json -->"
END = "<!-- end of the quality summary table -->"


def split(doc: str, where: str = "the document") -> tuple[str, str]:
    """(what precedes the BEGIN marker, what follows the END marker) of `doc`; refuses a document without both, in order."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise SpotlightError(f"{where} needs the marker lines once each, in this order:\n{BEGIN}\n{END}")
    head, rest = doc.split(BEGIN)
    return head, rest.split(END)[1]


def render(doc: str, rows: list[dict], where: str = "the document") -> str:
    """`doc` with the block between BEGIN and END replaced by the summary's table."""
    head, tail = split(doc, where)
    return f"{head}{BEGIN}\n{summary_table(rows)}\n{END}{tail}"


def build(run: Path, summary: Path, domains=("kjv", "perl-docs")) -> list[str]:
    """Write the summary rows of a quality run's results files into `summary`; returns the domains written."""
    best_file = run / "select" / "best.txt"
    best = (best_file.read_text().split() or [None])[0] if best_file.is_file() else None
    groups = []
    for domain in domains:
        files = [run / "quality" / f"ppl_{domain}.json", run / "mass" / f"{domain}_linear1024.json"]
        files += [run / "mass" / f"{domain}_{best}.json"] if best else []
        groups.append((domain, files))
    needle = run / "quality" / "needle.json"
    if needle.is_file():
        settings = read_results(needle)["meta"]["settings"]
        if len(settings["kinds"]) != 1 or len(settings["lengths"]) != 1:
            raise SpotlightError(f"{needle} holds several needle kinds or lengths; summarise it with spotlight report --summary --domain")
        groups.append((f"needle-{settings['kinds'][0]}-{settings['lengths'][0] // 1024}k", [needle]))
    missing = [str(f) for _, files in groups for f in files if not f.is_file()]
    if best is None:
        missing.append(str(best_file))
    if missing:
        raise SpotlightError(f"{run} lacks " + ", ".join(missing) + "; nothing written")
    rows = [row for domain, files in groups for row in quality_summary([read_results(f) for f in files], domain)]
    write_summary(summary, rows)
    return [domain for domain, _ in groups]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--summary", type=Path, default=Path("docs/results/quality_summary.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the document's table is not the summary's")
    parser.add_argument("--build", type=Path, metavar="RUN_DIR", help="first write the summary's rows from this quality run's results")
    args = parser.parse_args()
    if not args.doc.is_file():
        raise SystemExit(f"results_md: no such file: {args.doc}")
    doc = args.doc.read_text(encoding="utf-8")
    try:
        split(doc, str(args.doc))  # before --build writes anything
    except SpotlightError as error:
        raise SystemExit(f"results_md: {error}") from None
    if args.build is not None and not args.check:
        try:
            written = build(args.build, args.summary)
        except (SpotlightError, OSError) as error:
            raise SystemExit(f"results_md: {error}") from None
        print(f"{args.summary}: rows of {', '.join(written)} from {args.build}")
    if not args.summary.is_file():
        raise SystemExit(f"results_md: no such file: {args.summary}")
    try:
        rows = json.loads(args.summary.read_text(encoding="utf-8"))
        new = render(doc, rows, str(args.doc))
    except (SpotlightError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"results_md: {error}") from None
    if args.check:
        if new != doc:
            print(f"{args.doc}: its quality summary table differs from {args.summary}; "
                  f"run python benchmarks/results_md.py", file=sys.stderr)
            return 1
        print(f"{args.doc}: the table matches {args.summary}")
        return 0
    if new != doc:
        atomic_write_text(args.doc, new)
    print(f"{args.doc}: table {'written' if new != doc else 'already current'} from {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
