"""Results files -> one quality summary: a row per (domain, method, budget) (`spotlight report --summary`).

A row holds what the retrieval, perplexity and needle evaluations measured for that method and
budget on that domain, each figure with its 95% bootstrap bounds (eval/stats.py):

    domain, method, budget, bits, hasher_sha256,
    mass, mass_lo, mass_hi                       attention-mass recall (retrieval; chunks of every context pooled)
    ppl_vs_dense, ppl_vs_dense_lo, ppl_vs_dense_hi  a fraction: 0.0356 for +3.56% (perplexity, paired with dense)
    needle_acc, needle_acc_lo, needle_acc_hi     0..1 (needle tasks)

A figure no file measured is None. `method` is the eval CLI's name (`spotlight`, `linear1024`,
`oracle`, ...); `bits` is the hash's width (SimHash from its name, the learned hash from its file's
header); `hasher_sha256` the learned hasher's digest from the results' meta. The domain is the
results' data spec unless one is given; needle tasks carry their filler's corpus, so give the
domain explicitly when summarising one domain's files together. Writing into an existing summary
replaces the rows of the domains summarised now and keeps the others, so domains can be added one
run at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from spotlight_attn.errors import SpotlightError
from spotlight_attn.eval.stats import mean_interval

FIGURES = ("mass", "ppl_vs_dense", "needle_acc")
_SIMHASH = re.compile(r"linear(\d+)")  # the eval CLI's SimHash methods: linear<bits>


def _bits(method: str, meta: dict) -> int | None:
    match = _SIMHASH.fullmatch(method)
    if match:
        return int(match[1])
    if method == "spotlight":
        widths = set((meta.get("hasher_bits") or {}).values())
        if len(widths) == 1:
            return int(widths.pop())
        for path in meta.get("hashers") or {}:
            if Path(path).is_file():
                from spotlight_attn.hashing.checkpoint import read_header

                return int(read_header(path)["hasher"]["bits"])
    return None


def _digest(method: str, meta: dict) -> str | None:
    digests = set((meta.get("hashers") or {}).values())
    return digests.pop() if method == "spotlight" and len(digests) == 1 else None


def _figures(results: dict) -> dict[tuple, dict]:
    """(method, budget) -> {figure: (value, lo, hi)} of one results file."""
    kind, out = results["kind"], {}
    if kind == "retrieval":
        groups: dict[tuple, list[dict]] = {}
        for row in results["rows"]:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
        for pair, rows in groups.items():
            chunks = [m for r in rows for m in r.get("chunk_mass", [])]
            if chunks:
                out[pair] = {"mass": (sum(chunks) / len(chunks), *mean_interval(chunks))}
            else:  # a file from before per-chunk figures: the mean, no interval
                out[pair] = {"mass": (sum(r["mass"] for r in rows) / len(rows), None, None)}
    elif kind == "ppl":
        for row in results["rows"]:
            if row["method"] == "dense":
                out[("dense", row["budget"])] = {"ppl_vs_dense": (0.0, 0.0, 0.0)}
            elif "ppl_vs_dense" in row:
                out[(row["method"], row["budget"])] = {"ppl_vs_dense": (row["ppl_vs_dense"], row.get("ppl_vs_dense_lo"), row.get("ppl_vs_dense_hi"))}
    elif kind == "needle":
        for row in results.get("summary", []):
            out[(row["method"], row["budget"])] = {"needle_acc": (row["accuracy"], row["accuracy_lo"], row["accuracy_hi"])}
    return out


def quality_summary(files: list[dict], domain: str | None = None) -> list[dict]:
    """Summary rows (see the module docstring) of results dicts, one row per (domain, method, budget)."""
    rows: dict[tuple, dict] = {}
    for results in files:
        meta = results["meta"]
        where = domain or meta.get("data")
        if not where:
            raise SpotlightError(f"a {results['kind']} results file names no data: give the domain (--domain)")
        for (method, budget), figures in _figures(results).items():
            row = rows.setdefault((where, method, budget), {
                "domain": where, "method": method, "budget": budget, "bits": _bits(method, meta),
                "hasher_sha256": _digest(method, meta), **{f"{f}{s}": None for f in FIGURES for s in ("", "_lo", "_hi")},
            })
            for name, (value, lo, hi) in figures.items():
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = value, lo, hi
    return sorted(rows.values(), key=lambda r: (r["domain"], r["method"] != "dense", r["method"], -(r["budget"] or 0)))


def write_summary(path: str | Path, rows: list[dict]) -> Path:
    """Write `rows` into the summary at `path` (atomically), replacing the rows of their domains."""
    from spotlight_attn.eval.common import atomic_write_text

    path = Path(path)
    kept = []
    if path.exists():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise SpotlightError(f"{path} is not a quality summary (not JSON: {error}); not overwritten") from None
        if not isinstance(kept, list) or not all(isinstance(r, dict) and "domain" in r for r in kept):
            raise SpotlightError(f"{path} is not a quality summary (a list of rows with a domain); not overwritten")
    domains = {r["domain"] for r in rows}
    merged = [r for r in kept if r["domain"] not in domains] + rows
    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    return path


def method_label(method: str, bits: int | None) -> str:
    """The name a table prints: spotlight -> spotlight-128, linear1024 -> SimHash-1024, others as they are."""
    match = _SIMHASH.fullmatch(method)
    if match:
        return f"SimHash-{match[1]}"
    return f"{method}-{bits}" if method == "spotlight" and bits else method


_LINES = (("ppl_vs_dense", "perplexity vs dense", min), ("mass", "attention-mass recall", max), ("needle_acc", "needle accuracy", max))
_FORMATS = {"ppl_vs_dense": ("{:+.2f}", "%", 100), "mass": ("{:.3f}", "", 1), "needle_acc": ("{:.1f}", "%", 100)}


def _cell(figure: str, row: dict | None, bold: bool = False) -> str:
    """One figure of a row as a table cell: the value (bold if asked), then its 95% bounds where known."""
    if row is None or row[figure] is None:
        return "-"
    fmt, unit, scale = _FORMATS[figure]
    text = fmt.format(row[figure] * scale) + unit
    lo, hi = row[f"{figure}_lo"], row[f"{figure}_hi"]
    bounds = "" if lo is None or hi is None else f" [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"
    return (f"**{text}**" if bold else text) + bounds


def summary_table(rows: list[dict]) -> str:
    """A quality summary's rows -> one markdown table: a column per (method, budget), budgets largest
    first (dense first, with what it measured), a line per (figure, domain) that any row measured; each
    cell the figure and its 95% bounds. Per line and budget the best hash is in bold: lowest perplexity,
    highest mass and needle accuracy; the oracle, a ceiling, does not compete."""
    if not rows:
        raise SpotlightError("the quality summary has no rows: nothing to tabulate")
    order = {"spotlight": 0, "oracle": 2}
    columns = sorted({(r["method"], r["budget"], r["bits"]) for r in rows if r["method"] != "dense"},
                     key=lambda c: (-(c[1] or 0), order.get(c[0], 1), c[0]))
    header = ["", "dense"] + [f"{method_label(m, bits)} {b:.0%}" if b else method_label(m, bits) for m, b, bits in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    cells = {(r["domain"], r["method"], r["budget"]): r for r in rows}
    for figure, title, better in _LINES:
        for domain in sorted({r["domain"] for r in rows if r[figure] is not None}):
            found = [(m, b, cells.get((domain, m, b))) for m, b, _ in columns]
            best = {}
            for m, b, row in found:
                if m != "oracle" and row is not None and row[figure] is not None:
                    best[b] = better(best.get(b, row[figure]), row[figure])
            dense = cells.get((domain, "dense", None))
            out = [f"{title}, {domain}", "-" if figure == "ppl_vs_dense" else _cell(figure, dense)]
            out += [_cell(figure, row, bold=m != "oracle" and row is not None and row[figure] == best.get(b)) for m, b, row in found]
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)
