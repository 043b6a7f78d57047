"""`spotlight eval ppl`: perplexity of held-out long text with retrieval active, as in real decoding.

Each chunk of `length` tokens is split at `prefix`: the prefix is prefilled (dense, as every method
prefills); every later position predicts the next token while attending only to what the method
selects over its causal past. Perplexity = exp(mean negative log-likelihood of the tokens at
positions prefix+1 .. length-1), pooled over chunks, with a 95% bootstrap interval over chunks (and,
against a dense row of the same run, a paired one: eval/stats.py). Two modes give the same numbers:
- "decode": the prefix is prefilled, then the text is fed one token at a time (exactly decoding);
- "fast": one forward pass under attention.teacher_forcing(model, prefix), where every position
  >= prefix selects over its causal past with the same selector and rules (tests check the two agree).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from spotlight_attn import compat
from spotlight_attn.errors import SpotlightError
from spotlight_attn.eval.common import MethodSpec, Methods, decode_tokens, new_results, runs
from spotlight_attn.eval.stats import summarize

MODES = ("fast", "decode")


def chunk_nll(model, chunk: torch.Tensor, prefix: int, mode: str = "fast") -> tuple[float, int, float]:
    """Through the enabled method: summed NLL (nats) of chunk[prefix+1:] given everything before, the
    number of those tokens, and the mean fraction of the cache the steps read (attention.read_fraction)."""
    from spotlight_attn.attention import read_fraction, teacher_forcing

    ids = chunk[None].to(model.device)  # [1, L]
    if mode == "fast":
        with torch.inference_mode(), teacher_forcing(model, prefix):
            out = model(ids[:, :-1], use_cache=True)  # the last token is only ever a target
        logits, cache = out.logits[0, prefix:].float(), compat.output_cache(out)  # predicts prefix+1 .. L-1
    elif mode == "decode":
        with torch.inference_mode():
            cache = compat.output_cache(model(ids[:, :prefix], use_cache=True))
        logits, cache = decode_tokens(model, cache, ids[:, prefix:-1])
        logits = logits[0]
    else:
        raise SpotlightError(f"ppl mode must be one of {', '.join(MODES)}, got {mode!r}")
    targets = ids[0, prefix + 1 :]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), int(targets.numel()), read_fraction(cache)


def evaluate_ppl(
    model, methods: Methods, specs: list[MethodSpec], budgets: list, chunks: torch.Tensor, prefix: int,
    mode: str = "fast", data: str | None = None, seed: int = 0, progress: bool = True,
) -> dict:
    """chunks [N, L] held-out tokens. Returns a results dict (kind "ppl"), one row per (method, budget)."""
    length = chunks.shape[1]
    if not 0 < prefix < length - 1:
        raise SpotlightError(f"ppl prefix must be in [1, {length - 2}] for chunks of {length} tokens, got {prefix}")
    if mode not in MODES:
        raise SpotlightError(f"ppl mode must be one of {', '.join(MODES)}, got {mode!r}")
    results = new_results("ppl", methods.model_spec, data, specs, budgets, seed,
                          {"length": length, "prefix": prefix, "chunks": int(chunks.shape[0]), "mode": mode})
    pairs = runs(specs, budgets)
    with tqdm(total=len(pairs) * chunks.shape[0], desc=f"ppl ({mode})", unit="chunk", disable=not progress) as bar:
        for spec, budget in pairs:
            methods.enable(spec, budget)
            per_chunk = []
            for chunk in chunks:
                per_chunk.append(chunk_nll(model, chunk, prefix, mode))
                bar.update(1)
            nll, tokens = sum(n for n, _, _ in per_chunk), sum(c for _, c, _ in per_chunk)
            results["rows"].append({
                "method": spec.label, "budget": budget, "nll": nll / tokens, "ppl": math.exp(nll / tokens),
                "tokens": int(tokens), "read_fraction": sum(r for _, _, r in per_chunk) / len(per_chunk),
                "chunk_nll": [n for n, _, _ in per_chunk], "chunk_tokens": [c for _, c, _ in per_chunk],
            })
    return summarize(results)
