"""`spotlight eval fidelity`: does a method answer as the dense model does?

Prompts are built from held-out text: a passage (one held-out chunk, decoded back to text), then a
question about it: which sentence follows a quoted one. The passage is prefilled once, densely, and
shared by every method; the question is decoded token by token through the method, and the reply is
generated greedily through it. Each method's reply is compared with the dense reply:
- exact match: the same token ids;
- token agreement: positions where the two replies hold the same token, over the longer reply;
- ROUGE-L F1 of the two texts (the `rouge-score` package, stemming on).
ROUGE-L against the true next sentence is reported too, for dense as well.
"""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from spotlight_attn.config import Method
from spotlight_attn.errors import SpotlightError
from spotlight_attn.eval.common import MethodSpec, Methods, decode_tokens, dense_prefill, greedy, new_results, runs
from spotlight_attn.eval.needle import stop_ids
from spotlight_attn.eval.stats import summarize
from spotlight_attn.tasks import Task, encode_task

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge_l(reference: str, candidate: str) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise SpotlightError("fidelity needs the rouge-score package: pip install 'spotlight-attn[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, candidate)["rougeL"].fmeasure


def passage_task(passage: str, seed: int) -> Task | None:
    """A 'which sentence comes next' question about `passage`, or None if it has too few sentences."""
    sentences = [s.strip() for s in SENTENCE_END.split(passage) if len(s.split()) >= 6]
    if len(sentences) < 4:
        return None
    rng = random.Random(seed)
    i = rng.randrange(len(sentences) // 4, len(sentences) - 1)
    context = f"Read the text below, then answer the question about it.\n\n{passage.strip()}\n\n"
    question = f'In the text above, which sentence comes right after "{sentences[i]}"? Quote it exactly.'
    return Task("fidelity", context, question, "", [sentences[i + 1]], seed=seed)


def token_agreement(ours: list[int], dense: list[int]) -> float:
    longest = max(len(ours), len(dense))
    return 1.0 if longest == 0 else sum(a == b for a, b in zip(ours, dense)) / longest


def evaluate_fidelity(
    model, tokenizer, methods: Methods, specs: list[MethodSpec], budgets: list, passages: list[str],
    max_new_tokens: int = 32, data: str | None = None, seed: int = 0, progress: bool = True,
) -> dict:
    """One prompt per passage (e.g. held-out chunks decoded to text). Results dict (kind "fidelity"),
    one row per (prompt, method, budget); passages with fewer than 4 sentences are skipped."""
    from spotlight_attn.attention import index_cache

    results = new_results("fidelity", methods.model_spec, data, specs, budgets, seed,
                          {"prompts": len(passages), "max_new_tokens": max_new_tokens})
    dense_spec = MethodSpec(Method.DENSE)  # always run first: the reference every reply is compared with
    pairs = [(dense_spec, None)] + [pair for pair in runs(specs, budgets) if pair[0] != dense_spec]
    stops = stop_ids(tokenizer)
    with tqdm(total=len(passages) * len(pairs), desc="fidelity", unit="answer", disable=not progress) as bar:
        for n, passage in enumerate(passages):
            task = passage_task(passage, seed + n)
            if task is None:
                bar.update(len(pairs))
                continue
            ids, split = encode_task(tokenizer, task)
            ids = torch.tensor([ids])
            _, prefill = dense_prefill(model, ids[:, :split])
            reference: list[int] | None = None
            for spec, budget in pairs:
                methods.enable(spec, budget)
                logits, cache = decode_tokens(model, index_cache(model, prefill), ids[:, split:])
                new = greedy(model, cache, logits[:, -1], max_new_tokens, stops)
                reference = new if reference is None else reference
                reply, dense_reply = tokenizer.decode(new, skip_special_tokens=True), tokenizer.decode(reference, skip_special_tokens=True)
                results["rows"].append({
                    "prompt": n, "method": spec.label, "budget": budget, "reply": reply,
                    "exact": new == reference, "agreement": token_agreement(new, reference),
                    "rouge_l_dense": rouge_l(dense_reply, reply), "rouge_l_truth": rouge_l(task.answers[0], reply),
                })
                bar.update(1)
    return summarize(results)
