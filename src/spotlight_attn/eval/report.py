"""Results files -> markdown tables and PNG plots (`spotlight report`).

markdown(results) is a docs/-ready table for any kind of results; plot(results, folder) draws the
plots for its kind (matplotlib, headless) and returns their paths.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from spotlight_attn.errors import SpotlightError


def _budget(b) -> str:
    if b is None:
        return "all"
    return f"{b:.0%}" if isinstance(b, float) else f"{b} tok"


def _ci(row: dict, name: str, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    """' [lo, hi]' of a figure's bootstrap interval (eval/stats.py), or '' for results without one."""
    if f"{name}_lo" not in row:
        return ""
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f" [{fmt.format(row[f'{name}_lo'] * scale)}, {fmt.format(row[f'{name}_hi'] * scale)}]"


def _summary(results: dict) -> dict[tuple, dict]:
    return {(r["method"], r["budget"]): r for r in results.get("summary", [])}


def _groups(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def _order(results: dict) -> list[tuple[str, object]]:
    """(method, budget) pairs in run order: dense first, then each budget's methods."""
    seen = []
    for row in results["rows"]:
        pair = (row["method"], row["budget"])
        if pair not in seen:
            seen.append(pair)
    return sorted(seen, key=lambda p: (p[1] is not None, -(p[1] or 0), seen.index(p)))


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _meta_line(results: dict) -> str:
    meta = results["meta"]
    machine = meta.get("machine", {})
    where = machine.get("gpu") or f"{machine.get('processor', '?')} CPU, {machine.get('threads', '?')} threads"
    settings = ", ".join(f"{k} {v}" for k, v in meta.get("settings", {}).items() if not isinstance(v, (dict, list)) or k in ("contexts", "lengths", "depths", "kinds", "seeds"))
    line = f"Model {meta['model']}, data {meta.get('data')}, seed {meta.get('seed')}; {settings}. Ran on {where}, torch {machine.get('torch')}, spotlight-attn {meta.get('version')}"
    if meta.get("seconds") is not None:
        line += f", {meta['seconds'] / 60:.1f} min"
    line += "."
    if meta.get("command"):
        line += f"\n\nCommand: `{meta['command']}`"
    return line


def markdown(results: dict) -> str:
    kind = results["kind"]
    build = {"retrieval": _retrieval_md, "ppl": _ppl_md, "needle": _needle_md, "fidelity": _fidelity_md}.get(kind)
    if build is None:
        raise SpotlightError(f"unknown results kind {kind!r}")
    return build(results) + "\n\n" + _meta_line(results)


def _retrieval_md(results: dict) -> str:
    contexts = sorted({r["context"] for r in results["rows"]})
    groups = _groups(results["rows"], "method", "budget")
    head = ["method", "budget"] + [f"IoU / mass @{c}" for c in contexts] + ["mean IoU", "mean mass"]
    rows = []
    for pair in _order(results):
        by_context = {r["context"]: r for r in groups[pair]}
        cells = [f"{by_context[c]['iou']:.3f} / {by_context[c]['mass']:.3f}{_ci(by_context[c], 'mass')}" if c in by_context else "-"
                 for c in contexts]
        rows.append([pair[0], _budget(pair[1]), *cells, f"{mean(r['iou'] for r in groups[pair]):.3f}", f"{mean(r['mass'] for r in groups[pair]):.3f}"])
    return ("IoU vs the oracle's selection and attention-mass recall (dense = 1), mean over sparse layers and KV heads; "
            "[95% bootstrap interval of the mass over chunks].\n\n" + _table(head, rows))


def _ppl_md(results: dict) -> str:
    dense = next((r["ppl"] for r in results["rows"] if r["method"] == "dense"), None)
    rows = []
    for row in sorted(results["rows"], key=lambda r: _order(results).index((r["method"], r["budget"]))):
        delta = f"{(row['ppl'] / dense - 1) * 100:+.2f}%" if dense else "-"
        if dense and row["method"] != "dense":
            delta += _ci(row, "ppl_vs_dense", 100, 2, sign=True)
        rows.append([row["method"], _budget(row["budget"]), f"{row['ppl']:.3f}{_ci(row, 'ppl')}", delta,
                     f"{row['read_fraction']:.3f}", str(row["tokens"])])
    note = "\n\n[95% bootstrap intervals over chunks; vs dense paired]" if any("ppl_lo" in r for r in results["rows"]) else ""
    return _table(["method", "budget", "PPL", "vs dense", "read fraction", "tokens scored"], rows) + note


def _needle_md(results: dict) -> str:
    kinds = results["meta"]["settings"]["kinds"]
    lengths = results["meta"]["settings"]["lengths"]
    groups = _groups(results["rows"], "method", "budget")
    summary = _summary(results)
    head = ["method", "budget"] + kinds + [f"len {n}" for n in lengths] + ["all", "vs dense (points)"]
    rows = []
    for pair in _order(results):
        rs = groups[pair]
        cells = [f"{100 * mean(r['score'] for r in rs if r['kind'] == k):.1f}" for k in kinds]
        cells += [f"{100 * mean(r['score'] for r in rs if r['length'] == n):.1f}" for n in lengths]
        row = summary.get(pair, {})
        vs = (f"{100 * row['accuracy_vs_dense']:+.1f}{_ci(row, 'accuracy_vs_dense', 100, 1, sign=True)}"
              if "accuracy_vs_dense" in row else "-")
        rows.append([pair[0], _budget(pair[1]), *cells, f"**{100 * mean(r['score'] for r in rs):.1f}**{_ci(row, 'accuracy', 100, 1)}", vs])
    cases = len(_groups(results["rows"], "kind", "length", "depth", "seed"))
    return (f"Accuracy (%), RULER string match, {cases} tasks per method (all depths and seeds); "
            "[95% bootstrap intervals over tasks; vs dense paired].\n\n" + _table(head, rows))


def _fidelity_md(results: dict) -> str:
    groups = _groups(results["rows"], "method", "budget")
    rows = []
    summary = _summary(results)
    for pair in _order(results):
        rs, ci = groups[pair], summary.get(pair, {})
        rows.append([pair[0], _budget(pair[1]), f"{100 * mean(r['exact'] for r in rs):.1f}{_ci(ci, 'exact', 100, 1)}",
                     f"{mean(r['agreement'] for r in rs):.3f}{_ci(ci, 'agreement')}",
                     f"{mean(r['rouge_l_dense'] for r in rs):.3f}{_ci(ci, 'rouge_l_dense')}", f"{mean(r['rouge_l_truth'] for r in rs):.3f}"])
    prompts = len(_groups(results["rows"], "prompt"))
    return (f"Greedy replies vs the dense model's on {prompts} prompts; [95% bootstrap intervals over prompts].\n\n"
            + _table(["method", "budget", "exact match %", "token agreement", "ROUGE-L vs dense", "ROUGE-L vs truth"], rows))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpotlightError("plots need matplotlib: pip install 'spotlight-attn[eval]'") from None
    return plt


def plot(results: dict, folder: str | Path, stem: str | None = None) -> list[Path]:
    """Draw the plots of a results dict into `folder`; returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or results["kind"]
    draw = {"retrieval": _retrieval_png, "ppl": _ppl_png, "needle": _needle_png, "fidelity": _fidelity_png}[results["kind"]]
    return draw(results, folder, stem, _pyplot())


def _save(fig, path: Path) -> Path:
    from spotlight_attn.hashing.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    fig.clf()
    return path


def _retrieval_png(results, folder, stem, plt) -> list[Path]:
    import numpy as np

    groups = _groups(results["rows"], "method", "budget")
    pairs = [p for p in _order(results) if p[0] != "oracle"] or _order(results)
    paths = []
    for metric, title in (("mass", "attention-mass recall"), ("iou", "IoU vs oracle")):
        fig, axes = plt.subplots(1, len(pairs), figsize=(2.2 * len(pairs) + 1, 5), squeeze=False, layout="constrained")
        for ax, pair in zip(axes[0], pairs):
            grid = np.mean([np.array(r[f"{metric}_layer_head"]) for r in groups[pair]], axis=0)  # [layers, Hkv]
            layers = groups[pair][0]["layers"]
            image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{pair[0]} @{_budget(pair[1])}\nmean {grid.mean():.3f}", fontsize=9)
            ax.set_xlabel("KV head")
            ax.set_yticks(range(0, len(layers), 4), [str(layers[i]) for i in range(0, len(layers), 4)])
        axes[0][0].set_ylabel("layer")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(f"{title} per layer x KV head ({results['meta']['model']})")
        paths.append(_save(fig, folder / f"{stem}_{metric}.png"))
        plt.close(fig)
    return paths


def _bars(plt, results, values: dict, ylabel: str, title: str, path: Path, reference: float | None = None) -> Path:
    budgets = [b for b in results["meta"]["budgets"]]
    methods = [m for m in results["meta"]["methods"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) * max(1, len(budgets)) + 2, 4), layout="constrained")
    width = 0.8 / max(1, len(budgets))
    for j, budget in enumerate(budgets):
        ys = [values.get((m, budget), values.get((m, None), float("nan"))) for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], ys, width, label=f"budget {_budget(budget)}")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(methods))], methods)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    path = _save(fig, path)
    plt.close(fig)
    return path


def _ppl_png(results, folder, stem, plt) -> list[Path]:
    values = {(r["method"], r["budget"]): r["ppl"] for r in results["rows"]}
    dense = next((r["ppl"] for r in results["rows"] if r["method"] == "dense"), None)
    return [_bars(plt, results, values, "perplexity", f"held-out perplexity ({results['meta']['model']})", folder / f"{stem}.png", dense)]


def _fidelity_png(results, folder, stem, plt) -> list[Path]:
    values = {pair: mean(r["rouge_l_dense"] for r in rs) for pair, rs in _groups(results["rows"], "method", "budget").items()}
    return [_bars(plt, results, values, "ROUGE-L vs dense reply", f"answer fidelity ({results['meta']['model']})", folder / f"{stem}.png")]


def _needle_png(results, folder, stem, plt) -> list[Path]:
    import numpy as np

    lengths = results["meta"]["settings"]["lengths"]
    depths = results["meta"]["settings"]["depths"]
    groups = _groups(results["rows"], "method", "budget")
    pairs = _order(results)
    fig, axes = plt.subplots(1, len(pairs), figsize=(2.2 * len(pairs) + 1, 3.2), squeeze=False, layout="constrained")
    for ax, pair in zip(axes[0], pairs):
        grid = np.array([[mean([r["score"] for r in groups[pair] if r["length"] == n and r["depth"] == d] or [float("nan")])
                          for n in lengths] for d in depths])  # [depths, lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{pair[0]} @{_budget(pair[1])}\n{100 * np.nanmean(grid):.0f}%", fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"needle accuracy ({results['meta']['model']})")
    path = _save(fig, folder / f"{stem}.png")
    plt.close(fig)
    return [path]
