"""`spotlight eval needle`: passkey and RULER-style needle tasks (tasks.py), accuracy per length x depth.

For each task the context (instructions + haystack) is prefilled once, densely, and shared by every
method (index_cache); the question, the chat template's closing markers and the answer prefix are
then decoded one token at a time through the method under test, and the answer is generated greedily
through it. So retrieval decides what the question attends to, as it would in real use.
Score: RULER's string match, the fraction of the expected answers found in the reply; accuracy per
(method, budget) with a 95% bootstrap interval over tasks, and paired against dense (eval/stats.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from spotlight_attn.eval.common import MethodSpec, Methods, decode_tokens, dense_prefill, greedy, new_results, runs
from spotlight_attn.eval.stats import summarize
from spotlight_attn.tasks import encode_task, make_task


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return {i for i in ids if i is not None}


def evaluate_needle(
    model, tokenizer, methods: Methods, specs: list[MethodSpec], budgets: list, kinds: list[str], lengths: list[int],
    depths: list[float], seeds: list[int], max_new_tokens: int = 24, progress: bool = True,
) -> dict:
    """Results dict (kind "needle"): one row per (task, method, budget) with its reply and score."""
    from spotlight_attn.attention import index_cache

    results = new_results("needle", methods.model_spec, "generated (tasks.py)", specs, budgets, seeds[0] if seeds else 0,
                          {"kinds": kinds, "lengths": lengths, "depths": depths, "seeds": seeds, "max_new_tokens": max_new_tokens})
    pairs = runs(specs, budgets)
    stops = stop_ids(tokenizer)
    cases = [(k, n, d, s) for k in kinds for n in lengths for d in depths for s in seeds]
    with tqdm(total=len(cases) * len(pairs), desc="needle", unit="answer", disable=not progress) as bar:
        for kind, length, depth, seed in cases:
            task = make_task(tokenizer, kind, length, depth, seed)
            ids, split = encode_task(tokenizer, task)
            ids = torch.tensor([ids])
            _, prefill = dense_prefill(model, ids[:, :split])
            for spec, budget in pairs:
                methods.enable(spec, budget)
                logits, cache = decode_tokens(model, index_cache(model, prefill), ids[:, split:])
                new = greedy(model, cache, logits[:, -1], max_new_tokens, stops)
                reply = tokenizer.decode(new, skip_special_tokens=True)
                results["rows"].append({
                    "kind": kind, "length": length, "tokens": int(ids.shape[1]), "depth": depth, "seed": seed,
                    "method": spec.label, "budget": budget, "score": task.score(reply), "reply": reply, "answers": task.answers,
                })
                bar.update(1)
    return summarize(results)
