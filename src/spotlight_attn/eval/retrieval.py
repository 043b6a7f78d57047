"""`spotlight eval retrieval`: how close each method's selection comes to the oracle's, per layer and KV head.

Held-out chunks of `context + steps` tokens: the first `context` tokens are prefilled (densely, once,
shared by every method through index_cache), then the next `steps` tokens of the text are fed one at
a time through the method under test, as real decoding would (teacher forcing: the text's own
tokens, not the model's guesses). At every decode step and sparse layer, the method's selection is
compared with the oracle's on that step's exact queries and cache:
- True set at budget k: the Oracle's selection (top-k of the group-summed softmax probability,
  with the same budget, sink, window and tie rules).
- IoU = |selected AND true| / |selected OR true|, per (layer, KV head, step), then averaged.
- Attention-mass recall = group-summed softmax probability on the selected keys, divided by G
  (dense = 1), per (layer, KV head, step), then averaged.
Each figure comes with a 95% bootstrap interval over chunks (eval/stats.py), from its per-chunk
means (`chunk_iou`, `chunk_mass`).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from spotlight_attn.eval.common import MethodSpec, Methods, decode_tokens, dense_prefill, new_results, runs
from spotlight_attn.eval.stats import summarize
from spotlight_attn.metrics import selection_quality
from spotlight_attn.selection.selectors import OracleSelector, Selector
from spotlight_attn.selection.topk import select_topk, selected_mask


class _Totals:
    """Running sums of IoU and mass recall per (layer, KV head)."""

    def __init__(self, layers: int, kv_heads: int):
        self.iou = torch.zeros(layers, kv_heads, dtype=torch.float64)
        self.mass = torch.zeros(layers, kv_heads, dtype=torch.float64)
        self.count = torch.zeros(layers, dtype=torch.float64)


class ProbeSelector(Selector):
    """Wraps a method's selector: selects exactly as it does, and scores each selection against the oracle."""

    def __init__(self, inner: Selector, totals: _Totals):
        self.inner = inner
        self.method = inner.method
        self.totals = totals
        self.oracle = OracleSelector()

    def key_index(self, layer_idx):
        return self.inner.key_index(layer_idx)

    def select(self, query, layer, budget, scaling):
        picked = self.inner.select(query, layer, budget, scaling)  # [B, Hkv, k]
        probs = self.oracle.scores(query, layer, scaling)  # [B, Hkv, T] group-summed softmax
        truth = select_topk(probs, layer.key_valid, budget)
        length = layer.keys.shape[2]
        chosen, true = selected_mask(picked, length), selected_mask(truth, length)
        iou, mass = selection_quality(chosen, true, probs, query.shape[1] // layer.keys.shape[1])  # [B, Hkv] each
        i = layer.layer_idx
        self.totals.iou[i] += iou.double().sum(0).cpu()
        self.totals.mass[i] += mass.double().sum(0).cpu()
        self.totals.count[i] += query.shape[0]
        return picked


def evaluate_retrieval(
    model, methods: Methods, specs: list[MethodSpec], budgets: list, chunks_by_context: dict[int, torch.Tensor],
    steps: int, data: str | None = None, seed: int = 0, progress: bool = True,
) -> dict:
    """chunks_by_context[c]: held-out token chunks [N, >= c + steps]. Returns a results dict (kind "retrieval")."""
    from spotlight_attn.attention import index_cache
    from spotlight_attn.models import ModelGeometry

    geometry = ModelGeometry.from_model(model)
    pairs = [(spec, b) for spec, b in runs(specs, budgets) if spec.budgeted]
    results = new_results(
        "retrieval", methods.model_spec, data, specs, budgets, seed,
        {"contexts": sorted(chunks_by_context), "chunks": {c: int(x.shape[0]) for c, x in chunks_by_context.items()}, "steps": steps,
         "sparse_layers": [i for i in range(geometry.num_layers) if i not in methods.base.dense_layers]},
    )
    per_chunk = defaultdict(list)  # (context, method, budget) -> one _Totals per chunk
    work = sum(x.shape[0] for x in chunks_by_context.values()) * len(pairs)
    with tqdm(total=work, desc="retrieval", unit="run", disable=not progress) as bar:
        for context, chunks in sorted(chunks_by_context.items()):
            for chunk in chunks:
                _, prefill = dense_prefill(model, chunk[None, :context])
                for spec, budget in pairs:
                    totals = _Totals(geometry.num_layers, geometry.num_kv_heads)
                    per_chunk[context, spec.label, budget].append(totals)
                    installed = methods.enable(spec, budget)
                    installed.selector = ProbeSelector(installed.selector, totals)
                    decode_tokens(model, index_cache(model, prefill), chunk[None, context : context + steps])
                    bar.update(1)
    layers = results["meta"]["settings"]["sparse_layers"]
    for (context, label, budget), chunk_totals in per_chunk.items():
        iou_sum, mass_sum, count = (sum(getattr(t, name)[layers] for t in chunk_totals) for name in ("iou", "mass", "count"))
        count = count.clamp(min=1)[:, None]
        iou, mass = iou_sum / count, mass_sum / count  # [layers, Hkv]
        results["rows"].append({
            "context": context, "method": label, "budget": budget,
            "iou": float(iou.mean()), "mass": float(mass.mean()),
            "layers": layers, "iou_layer_head": iou.tolist(), "mass_layer_head": mass.tolist(),
            "chunk_iou": [float((t.iou[layers] / t.count[layers].clamp(min=1)[:, None]).mean()) for t in chunk_totals],
            "chunk_mass": [float((t.mass[layers] / t.count[layers].clamp(min=1)[:, None]).mean()) for t in chunk_totals],
        })
    return summarize(results)
