"""enable()/disable() inside real transformers models (tiny random ones of each family)."""

import pytest
import torch

import spotlight_attn as sa
from spotlight_attn.compat import cache_argument, output_cache
from spotlight_attn.attention import read_fraction
from spotlight_attn.config import HasherConfig, SpotlightConfig
from spotlight_attn.errors import HasherMismatchError, SpotlightError, UnsupportedModelError
from spotlight_attn.models import ModelGeometry

from conftest import hasher_for, tiny_model
from conftest import padded_prompts as prompts

METHODS = ["dense", "oracle", "spotlight", "linear", "quest", "streaming"]


def greedy(model, ids, mask, n=8):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


GEOMETRIES = [  # family, Hq, Hkv, D: GQA groups 1, 3 and 4; head dims 64 and 128
    ("llama", 2, 2, 64),
    ("llama", 6, 2, 64),
    ("mistral", 4, 1, 128),
    ("qwen2", 3, 1, 64),
    ("qwen2", 8, 2, 128),
]


@pytest.mark.parametrize("family,hq,hkv,d", GEOMETRIES)
def test_full_budget_generate_equals_dense_for_every_method(family, hq, hkv, d):
    model = tiny_model(family, hq, hkv, d, layers=4)
    ids, mask = prompts()
    expected = greedy(model, ids, mask)
    for method in METHODS:
        sa.enable(model, hasher_for(model, method), SpotlightConfig(method=method, budget=1.0, bits=40))
        assert torch.equal(greedy(model, ids, mask), expected), method
    sa.disable(model)
    assert torch.equal(greedy(model, ids, mask), expected)


@pytest.mark.parametrize("family,hq,hkv,d", GEOMETRIES[:3])
def test_full_budget_decode_logits_match_dense(family, hq, hkv, d):
    """Hand-written decode loop (no generate): per-step logits within 1e-5 of the model's own attention."""
    model = tiny_model(family, hq, hkv, d, layers=4)
    ids, mask = prompts()

    def run():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, logits, m = output_cache(out), [out.logits[:, -1]], mask
        for step in range(5):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            nxt = logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, attention_mask=m, **{cache_argument(model): cache}, use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits[:, -1])
        return torch.stack(logits)

    expected = run()
    for method in METHODS:
        sa.enable(model, hasher_for(model, method), SpotlightConfig(method=method, budget=1.0))
        got = run()
        assert (got - expected).abs().max() <= 1e-4, method  # logits after 4 layers; attention itself is 1e-5
    sa.disable(model)


@pytest.mark.parametrize("method", METHODS)
def test_batch_with_left_padding_equals_each_prompt_alone(method):
    model = tiny_model("llama", 6, 2, 64, layers=4)
    ids, mask = prompts(batch=3, length=45, pad=(0, 11, 4), seed=1)
    config = SpotlightConfig(method=method, budget=0.25, min_tokens=4, sink=1, window=2, bits=64, page_size=4)
    sa.enable(model, hasher_for(model, method), config)
    together = greedy(model, ids, mask, n=10)
    for i in range(3):
        alone = greedy(model, ids[i : i + 1, mask[i].bool()], mask[i : i + 1, mask[i].bool()], n=10)
        assert torch.equal(together[i, 45:], alone[0, -10:]), (method, i)


def test_small_budget_reads_less_and_changes_little_else():
    model = tiny_model("llama", 4, 2, 64, layers=6)
    ids, mask = prompts(batch=1, length=200, pad=(0,))
    sa.enable(model, None, SpotlightConfig(method="oracle", budget=0.1, min_tokens=0, sink=0, window=0, dense_layers=(0,)))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    fraction = read_fraction(output_cache(out))
    # 1 dense layer of 6 reads everything, 5 read ceil(10%) of ~200 keys
    assert 0.2 < fraction < 0.3


def test_dense_layers_never_select():
    model = tiny_model("llama", 4, 2, 64, layers=3)
    ids, mask = prompts()
    expected = greedy(model, ids, mask)
    sa.enable(model, None, SpotlightConfig(method="streaming", budget=0, min_tokens=0, sink=0, window=1, dense_layers=(0, 1, 2)))
    assert torch.equal(greedy(model, ids, mask), expected)


def test_sampling_generate_works_and_matches_dense_at_full_budget():
    model = tiny_model("qwen2", 4, 2, 64, layers=3)
    ids, mask = prompts()

    def sample():
        torch.manual_seed(123)
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_p=0.9, pad_token_id=0)

    expected = sample()
    sa.enable(model, None, SpotlightConfig(method="quest", budget=1.0))
    assert torch.equal(sample(), expected)
    sa.enable(model, None, SpotlightConfig(method="quest", budget=0.1))
    assert sample().shape == expected.shape


def test_each_key_is_hashed_once_when_it_enters():
    model = tiny_model("llama", 4, 2, 64, layers=4)
    hasher = hasher_for(model, "spotlight")
    hashed = []
    original = hasher.key_codes
    hasher.key_codes = lambda layer, keys: hashed.append((layer, keys.shape[2])) or original(layer, keys)
    sa.enable(model, hasher, SpotlightConfig(budget=0.5))
    ids, mask = prompts(batch=1, pad=(0,))
    greedy(model, ids, mask, n=6)
    for layer in (2, 3):  # dense layers 0, 1 keep no codes
        assert [n for l, n in hashed if l == layer] == [40, 1, 1, 1, 1, 1]
    assert not [l for l, _ in hashed if l in (0, 1)]


def test_enable_refuses_bad_setups():
    model = tiny_model("llama", 4, 2, 64, layers=4)
    with pytest.raises(HasherMismatchError, match="needs a learned hasher"):
        sa.enable(model, None, SpotlightConfig(method="spotlight"))
    other = tiny_model("llama", 4, 1, 64, layers=4)
    with pytest.raises(HasherMismatchError, match="num_kv_heads"):
        sa.enable(model, hasher_for(other, "spotlight"), SpotlightConfig())
    partial = sa.MLPHasher(ModelGeometry.from_model(model), HasherConfig(bits=32, width=4), layers=[2])
    with pytest.raises(HasherMismatchError, match=r"layers \[3\]"):
        sa.enable(model, partial, SpotlightConfig())
    with pytest.raises(HasherMismatchError, match="takes no hasher"):
        sa.enable(model, hasher_for(model, "spotlight"), SpotlightConfig(method="oracle"))
    with pytest.raises(SpotlightError, match="dense_layers"):
        sa.enable(model, None, SpotlightConfig(method="oracle", dense_layers=(0, 9)))
    with pytest.raises(SpotlightError, match="unknown method"):
        SpotlightConfig(method="magic")
    with pytest.raises(SpotlightError, match="budget"):
        SpotlightConfig(method="oracle", budget=2.5)
    assert getattr(model, "spotlight", None) is None  # nothing half-installed


def test_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        sa.enable(model, None, SpotlightConfig(method="oracle"))


def test_a_foreign_filled_cache_is_refused():
    from transformers import DynamicCache

    model = tiny_model("llama", 4, 2, 64, layers=3)
    ids, mask = prompts(batch=1, pad=(0,))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, **{cache_argument(model): cache}, use_cache=True)
    sa.enable(model, None, SpotlightConfig(method="oracle"))
    with pytest.raises(SpotlightError, match="did not index"):
        model(input_ids=ids[:, :1], **{cache_argument(model): cache}, use_cache=True)


def test_recorder_sees_post_rope_queries_and_keys_of_every_layer():
    model = tiny_model("llama", 4, 2, 64, layers=3)
    ids, mask = prompts(batch=1, pad=(0,))
    sa.enable(model, None, SpotlightConfig(method="dense"))
    seen = []
    model.spotlight.recorder = lambda layer, q, k, m: seen.append((layer, tuple(q.shape), tuple(k.shape)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert seen == [(i, (1, 4, 40, 64), (1, 2, 40, 64)) for i in range(3)]
    sa.disable(model)


def test_force_reference_reaches_the_kernel_dispatch(monkeypatch):
    import spotlight_attn.attention as attention_module
    import spotlight_attn.selection.selectors as selectors_module

    seen = []
    real_decode, real_select = attention_module.sparse_decode, selectors_module.score_select
    monkeypatch.setattr(attention_module, "sparse_decode", lambda *a, **k: seen.append(("decode", k)) or real_decode(*a, **k))
    monkeypatch.setattr(selectors_module, "score_select", lambda *a, **k: seen.append(("select", k)) or real_select(*a, **k))
    model = tiny_model("llama", 4, 2, 64, layers=3)
    ids, mask = prompts(batch=1, pad=(0,))
    sa.enable(model, None, SpotlightConfig(method="linear", budget=0.5, force_reference=True))
    greedy(model, ids, mask, n=2)
    assert {name for name, _ in seen} == {"decode", "select"}
    assert all(kwargs.get("force_reference") is True for _, kwargs in seen)
    sa.disable(model)
