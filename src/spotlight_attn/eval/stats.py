"""95% bootstrap intervals for every evaluation figure.

The unit of resampling is what the evaluation draws independently: a text chunk (retrieval,
perplexity), a task (needle), a prompt (fidelity). Percentile bootstrap, SAMPLES resamples of the
units with replacement, seeded, so the same results give the same intervals. Comparisons with dense
are paired: the method and dense are resampled with the same units, so an interval on a difference
excludes the noise the two share (which chunk, which task).

`summarize(results)` adds the intervals to a results dict of any kind, in place:
- retrieval rows: `iou_lo/hi`, `mass_lo/hi` over the per-chunk means `chunk_iou`, `chunk_mass`;
- ppl rows: `ppl_lo/hi` (pooled over chunks: exp of total NLL over total tokens), and where a dense
  row exists `ppl_vs_dense` (a fraction: 0.0356 for +3.56%) with `ppl_vs_dense_lo/hi`, paired;
- needle and fidelity: `results["summary"]`, one row per (method, budget) with each mean and its
  `_lo/_hi` (needle: `accuracy`, and `accuracy_vs_dense`, paired, where dense ran the same tasks).
Rows of results files written before these fields existed lack the per-unit lists; they get none.
"""

from __future__ import annotations

from collections import defaultdict

import torch

SAMPLES = 2000
LEVEL = 0.95


def resamples(n: int, samples: int = SAMPLES, seed: int = 0) -> torch.Tensor:
    """[samples, n] int64 unit indices drawn with replacement (the same for the same n and seed)."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one unit")
    return torch.randint(0, n, (samples, n), generator=torch.Generator().manual_seed(seed))


def interval(draws: torch.Tensor) -> tuple[float, float]:
    """The central LEVEL interval of bootstrap draws [samples]."""
    tail = (1 - LEVEL) / 2
    lo, hi = torch.quantile(draws.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def mean_interval(values, seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of per-unit values."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return interval(v[resamples(v.numel(), seed=seed)].mean(1))


def _key(row: dict, *names: str) -> tuple:
    return tuple(row[n] for n in names)


def _pooled_ppl(nll: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.exp(nll[idx].sum(1) / tokens[idx].sum(1))


def _ppl(results: dict, seed: int) -> None:
    rows = [r for r in results["rows"] if "chunk_nll" in r]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        nll = torch.tensor(row["chunk_nll"], dtype=torch.float64)
        tokens = torch.tensor(row["chunk_tokens"], dtype=torch.float64)
        idx = resamples(nll.numel(), seed=seed)
        row["ppl_lo"], row["ppl_hi"] = interval(_pooled_ppl(nll, tokens, idx))
        if dense is not None and dense is not row and dense["chunk_tokens"] == row["chunk_tokens"]:
            base = torch.tensor(dense["chunk_nll"], dtype=torch.float64)
            row["ppl_vs_dense"] = row["ppl"] / dense["ppl"] - 1
            ratio = _pooled_ppl(nll, tokens, idx) / _pooled_ppl(base, tokens, idx) - 1
            row["ppl_vs_dense_lo"], row["ppl_vs_dense_hi"] = interval(ratio)


def _retrieval(results: dict, seed: int) -> None:
    for row in results["rows"]:
        for metric in ("iou", "mass"):
            if f"chunk_{metric}" in row:
                row[f"{metric}_lo"], row[f"{metric}_hi"] = mean_interval(row[f"chunk_{metric}"], seed)


def _per_pair(results: dict, unit: tuple[str, ...], metrics: dict[str, str], seed: int, paired: str | None) -> list[dict]:
    """One summary row per (method, budget): each metric (summary name -> row field) as its mean over
    units and its interval; `paired` (a summary name) also as the paired difference against dense
    over the units both ran."""
    groups: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for row in results["rows"]:
        groups[_key(row, "method", "budget")][_key(row, *unit)] = row
    dense = next((units for (method, _), units in groups.items() if method == "dense"), None)
    summary = []
    for (method, budget), units in groups.items():
        keys = sorted(units, key=repr)
        out = {"method": method, "budget": budget, "units": len(keys)}
        idx = resamples(len(keys), seed=seed)
        for metric, field in metrics.items():
            v = torch.tensor([float(units[k][field]) for k in keys], dtype=torch.float64)
            out[metric] = float(v.mean())
            out[f"{metric}_lo"], out[f"{metric}_hi"] = interval(v[idx].mean(1))
        if paired and dense is not None and method != "dense":
            shared = [k for k in keys if k in dense]
            if shared:
                field = metrics[paired]
                d = torch.tensor([float(units[k][field]) - float(dense[k][field]) for k in shared], dtype=torch.float64)
                out[f"{paired}_vs_dense"] = float(d.mean())
                out[f"{paired}_vs_dense_lo"], out[f"{paired}_vs_dense_hi"] = interval(d[resamples(len(shared), seed=seed)].mean(1))
        summary.append(out)
    return summary


def summarize(results: dict, seed: int = 0) -> dict:
    """Add the bootstrap intervals of its kind to a results dict (see the module docstring); returns it."""
    kind = results["kind"]
    if kind == "ppl":
        _ppl(results, seed)
    elif kind == "retrieval":
        _retrieval(results, seed)
    elif kind == "needle" and results["rows"]:
        results["summary"] = _per_pair(results, ("kind", "length", "depth", "seed"), {"accuracy": "score"}, seed, "accuracy")
    elif kind == "fidelity" and results["rows"]:
        metrics = {m: m for m in ("exact", "agreement", "rouge_l_dense", "rouge_l_truth")}
        results["summary"] = _per_pair(results, ("prompt",), metrics, seed, None)
    results["meta"]["intervals"] = {"method": "percentile bootstrap", "level": LEVEL, "samples": SAMPLES, "seed": seed}
    return results
