"""Retrieval quality of a selector, measured by simulating decode selection on recorded queries/keys.

For a query at position s of a recorded chunk, the decode step it stands for holds keys 0..s in its
cache. Each method selects with the library's own selectors and top-k rules (same Budget: fraction,
min_tokens, sink and window inside the budget) on that causal past:
- True set at budget k: the Oracle's selection (top-k of the group-summed attention probability).
- IoU = |selected AND true| / |selected OR true|, per (layer, KV head, query position), then averaged.
- Attention-mass recall = the group-summed softmax probability on the selected keys, divided by G
  (dense = 1), per (layer, KV head, query position), then averaged.
- Logit oracle ("logit"): exact top-k of the group-summed logits sum_g q_g . k, under the same rules.
  Summed-Hamming scores approximate exactly that sum, so its IoU is the ceiling a hash can reach.

    python -m spotlight_attn.metrics --model smollm2-135m --data kjv \
        --hasher learned128=h128.safetensors --linear 128 --linear 1024 --budgets 0.1 0.02
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from spotlight_attn.config import Budget, Method
from spotlight_attn.selection.selectors import HashSelector, OracleSelector
from spotlight_attn.selection.topk import select_topk, selected_mask

log = logging.getLogger(__name__)
ORACLE = "oracle"
LOGIT = "logit"


class LogitSelector(OracleSelector):
    """Exact top-k of the group-summed logits sum_g q_g . k: what summed-Hamming scoring approximates."""

    def scores_rows(self, query, layer, scaling, row_valid):
        b, hq, s, d = query.shape
        q = query.reshape(b, layer.keys.shape[1], hq // layer.keys.shape[1], s, d).float().sum(2)  # [B, Hkv, S, D]
        return q @ layer.keys.float().transpose(-1, -2)  # [B, Hkv, S, T]


class RealQuerySelector(HashSelector):
    """Asymmetric scoring (an experiment, not a decode path): the query's pre-sign hash, real-valued and
    summed over the GQA group, dotted with the keys' +-1 codes. Key codes are unchanged; only the
    query side keeps its magnitudes, so fewer keys tie at the budget's boundary.

    levels: None keeps the weights real. An integer P >= 1 rounds each bit's |weight| to 0 .. 2**P - 1
    of its (row, KV head)'s largest, keeping the sign: what an integer kernel would score (P bit
    planes of the query, a popcount each, shifted and summed), exact in float32 at these sizes."""

    def __init__(self, hasher, method, force_reference: bool = False, levels: int | None = None):
        super().__init__(hasher, method, force_reference)
        if levels is not None and not 1 <= levels <= 8:
            raise ValueError(f"levels must be None (real weights) or 1 .. 8 bit planes, got {levels}")
        self.levels = levels

    def query_weights(self, layer_idx: int, query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """query [B, Hq, S, D] -> the group-summed query weights [B, Hkv, 1, S, bits] (real or quantised)."""
        b, hq, s, _ = query.shape
        y = self.hasher.hash_queries(layer_idx, query).float()  # [B, Hq, S, bits]
        y = y.reshape(b, num_kv_heads, hq // num_kv_heads, s, -1).sum(2, keepdim=True)  # [B, Hkv, 1, S, bits]
        if self.levels is None:
            return y
        top = y.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return torch.sign(y) * torch.round(y.abs() / top * (2**self.levels - 1))

    def scores_rows(self, query, layer, scaling, row_valid):
        with torch.no_grad():
            weights = self.query_weights(layer.layer_idx, query, layer.codes.shape[1])
            return self.group_dot(weights.flatten(1, 2), layer)  # [B, Hkv, S, T]: a group of one

    def select(self, query, layer, budget, scaling):
        return select_topk(self.scores(query, layer, scaling), layer.key_valid, budget)


def selection_quality(picked: torch.Tensor, truth: torch.Tensor, probs: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU with the true set and attention-mass recall of one selection, per row.

    picked, truth: [B, H, T] bool masks; probs [B, H, T]: group-summed softmax probability (summing to
    `group` over a row). Returns (iou [B, H], mass [B, H]): |picked AND truth| / |picked OR truth| and
    the probability on the picked keys / group (dense = 1).
    """
    iou = (picked & truth).sum(-1) / (picked | truth).sum(-1).clamp(min=1)
    mass = (probs * picked).sum(-1) / group
    return iou, mass


def layer_quality(
    queries: torch.Tensor, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor, budget: Budget,
    hashers: dict, batch: int = 16, logit: bool = True, real_query: bool = False,
) -> dict[str, tuple[float, float]]:
    """queries [Hq, L, D], keys [Hkv, L, D] of one chunk, positions [Nq] -> {method: (IoU, mass recall)} means.

    `hashers` maps a method name to an MLPHasher / LinearHasher covering `layer_idx`; the oracle is
    always included under "oracle", and the logit oracle under "logit" when `logit` is set.
    `real_query` adds "<name>_realq" for each hasher: RealQuerySelector on the same key codes.
    """
    hq, length, d = queries.shape
    hkv = keys.shape[0]
    scaling = d**-0.5
    oracle = OracleSelector()
    hash_selectors = {name: HashSelector(h, Method.SPOTLIGHT) for name, h in hashers.items()}
    key_codes = {name: h.key_codes(layer_idx, keys[None].float()) for name, h in hashers.items()}  # [1, Hkv, L, W]
    if real_query:
        hash_selectors.update({f"{name}_realq": RealQuerySelector(h, Method.SPOTLIGHT) for name, h in hashers.items()})
        key_codes.update({f"{name}_realq": codes for name, codes in key_codes.items()})
    extra = [LOGIT] if logit else []
    sums = {name: [0.0, 0.0] for name in [ORACLE, *extra, *hash_selectors]}
    for start in range(0, positions.numel(), batch):
        pos = positions[start : start + batch]  # [b]
        b = pos.numel()
        query = queries[:, pos].float().transpose(0, 1)[:, :, None]  # [b, Hq, 1, D]
        valid = torch.arange(length, device=keys.device)[None, :] <= pos[:, None]  # [b, L]
        state = SimpleNamespace(keys=keys[None].float().expand(b, -1, -1, -1), key_valid=valid, layer_idx=layer_idx)
        probs = oracle.scores(query, state, scaling)  # [b, Hkv, L]: group-summed softmax
        truth = selected_mask(oracle.select(query, state, budget, scaling), length)
        picks = {ORACLE: truth}
        if logit:
            picks[LOGIT] = selected_mask(LogitSelector().select(query, state, budget, scaling), length)
        for name, selector in hash_selectors.items():
            state.codes = key_codes[name].expand(b, -1, -1, -1)
            picks[name] = selected_mask(selector.select(query, state, budget, scaling), length)
        for name, picked in picks.items():
            iou, mass = selection_quality(picked, truth, probs, hq // hkv)  # [b, Hkv] each
            sums[name][0] += float(iou.sum())
            sums[name][1] += float(mass.sum())
    count = positions.numel() * hkv
    return {name: (s[0] / count, s[1] / count) for name, s in sums.items()}


def evaluate_retrieval(
    model, chunks: torch.Tensor, hashers: dict, budgets: list[float], layers: list[int], queries_per_chunk: int = 64,
    min_position: int = 2048, seed: int = 0, folder: str | Path | None = None, progress: bool = True, logit: bool = True,
    real_query: bool = False,
) -> dict:
    """Mean IoU / mass per (budget, method, layer) over sampled query positions >= min_position.

    Returns {budget: {method: {layer: (iou, mass)}}}.
    """
    from spotlight_attn.train.record import load_layer, qk_folder, record_qk

    length = chunks.shape[1]
    if min_position >= length:
        raise ValueError(f"min_position {min_position} must be below the chunk length {length}")
    folder = Path(folder) if folder is not None else qk_folder(model, chunks)
    record_qk(model, chunks, folder, progress=progress)
    generator = torch.Generator().manual_seed(seed)
    positions = [
        (min_position + torch.randperm(length - min_position, generator=generator)[:queries_per_chunk]).sort().values
        for _ in range(chunks.shape[0])
    ]
    results: dict = {b: {} for b in budgets}
    from tqdm.auto import tqdm

    for layer in tqdm(layers, desc="retrieval quality", unit="layer", disable=not progress):
        queries, keys = load_layer(folder, layer, chunks.shape[0])
        for amount in budgets:
            budget = Budget(amount)
            per_chunk = [layer_quality(queries[n], keys[n], layer, positions[n], budget, hashers, logit=logit, real_query=real_query) for n in range(chunks.shape[0])]
            for name in per_chunk[0]:
                iou = sum(r[name][0] for r in per_chunk) / len(per_chunk)
                mass = sum(r[name][1] for r in per_chunk) / len(per_chunk)
                results[amount].setdefault(name, {})[layer] = (iou, mass)
        log.info("layer %d: %s", layer, ", ".join(
            f"{n}@{b:g}={results[b][n][layer][0]:.3f}/{results[b][n][layer][1]:.3f}" for b in budgets for n in results[b]))
    return results


def format_table(results: dict, layers: list[int]) -> str:
    """Markdown: one row per layer (and the mean), IoU / mass per (method, budget)."""
    columns = [(b, name) for b in results for name in results[b]]
    head = "| layer | " + " | ".join(f"{name} @{b:.0%} IoU / mass" for b, name in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for layer in layers:
        cells = [f"{results[b][n][layer][0]:.3f} / {results[b][n][layer][1]:.3f}" for b, n in columns]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    means = []
    for b, n in columns:
        iou = sum(results[b][n][i][0] for i in layers) / len(layers)
        mass = sum(results[b][n][i][1] for i in layers) / len(layers)
        means.append(f"**{iou:.3f} / {mass:.3f}**")
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def plot_png(results: dict, layers: list[int], budget: float, path: str | Path) -> Path:
    """IoU and mass recall per layer at `budget`, one line per method, written as a PNG.

    Needs matplotlib (the `eval` extra: `pip install 'spotlight-attn[eval]'`); imported here so the library does not need it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'spotlight-attn[eval]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (metric, title) in zip(axes, [(0, "IoU with the oracle's set"), (1, "attention-mass recall")]):
        for method, per_layer in results[budget].items():
            style = "--" if method in (ORACLE, LOGIT) else "-"
            values = [per_layer[i][metric] for i in layers]
            mean = sum(values) / len(values)
            ax.plot(layers, values, style, marker="o", markersize=3, label=f"{method} (mean {mean:.3f})")
        ax.set_title(f"{title}, budget {budget:.0%}")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from spotlight_attn.data import load_chunks
    from spotlight_attn.hashing import LinearHasher, load_hasher
    from spotlight_attn.models import ModelGeometry, load_model

    parser = argparse.ArgumentParser(prog="python -m spotlight_attn.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="kjv", help="held-out data spec (a domain the hasher was not trained on)")
    parser.add_argument("--hasher", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--linear", action="append", type=int, default=[], metavar="BITS", help="SimHash baseline width")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.02])
    parser.add_argument("--chunk-len", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--queries", type=int, default=64, help="query positions sampled per chunk")
    parser.add_argument("--min-position", type=int, default=2048, help="each sampled query sees at least this many keys")
    parser.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write a PNG of IoU and mass per layer at the first budget (needs matplotlib)")
    parser.add_argument("--no-logit", action="store_true", help="leave out the logit oracle (group-summed q.k top-k)")
    parser.add_argument("--layers", type=int, nargs="*", help="only these layers (default: every sparse layer)")
    parser.add_argument("--real-query", action="store_true",
                        help="also score each hasher with a real-valued query against the key codes (<name>_realq)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tokenizer = load_model(args.model, device="cpu")
    geometry = ModelGeometry.from_model(model)
    layers = args.layers or [i for i in range(geometry.num_layers) if i not in args.dense_layers]
    hashers = {}
    for item in args.hasher:
        name, _, path = item.partition("=")
        hashers[name] = load_hasher(path, model)
    for bits in args.linear:
        hashers[f"simhash{bits}"] = LinearHasher(geometry, bits=bits, layers=layers)
    chunks = load_chunks(args.data, tokenizer, args.chunk_len, args.chunks, split="all")
    results = evaluate_retrieval(model, chunks, hashers, args.budgets, layers, args.queries, args.min_position,
                                 logit=not args.no_logit, real_query=args.real_query)
    print(format_table(results, layers))
    if args.json:
        args.json.write_text(json.dumps({str(b): r for b, r in results.items()}, indent=1))
    if args.plot:
        plot_png(results, layers, args.budgets[0], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
