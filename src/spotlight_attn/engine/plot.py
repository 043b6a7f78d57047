"""A bar chart of decode tokens/s per configuration, one bar per method (needs matplotlib)."""

from __future__ import annotations

from spotlight_attn.engine.bench import DecodeRow, _ctx


def plot(rows: list[DecodeRow], path, title: str) -> None:
    """Tokens/s per configuration, one bar per method (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r.shape, r.context, r.batch) for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(configs)), 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for c, cfg in enumerate(configs):
            match = [r for r in rows if (r.shape, r.context, r.batch) == cfg and r.method == method]
            if match:
                xs.append(c + (j - (len(methods) - 1) / 2) * width)
                ys.append(match[0].tokens_per_s)
        ax.bar(xs, ys, width, label=method)
        if method != "dense":
            ratios = [r.x_dense for cfg in configs for r in rows if (r.shape, r.context, r.batch) == cfg and r.method == method]
            for x, y, ratio in zip(xs, ys, ratios):
                ax.annotate(f"{ratio:.1f}x", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{s}\n{_ctx(t)} B={b}" for s, t, b in configs], fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
