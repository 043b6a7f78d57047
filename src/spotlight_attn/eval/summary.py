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


def _bits(method: str, meta: dict) -> int | None:
    match = re.fullmatch(r"linear(\d+)", method)
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
