"""The compatibility subset: what must hold on every transformers release the package allows.

CI runs this module on the oldest allowed transformers as well as the newest (the whole suite runs on
the newest): enable/disable, generate() with every method, batches with left padding, sampling and
beam search, the cache's crop / reorder / select, the version check, and the real model answering.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import spotlight_attn as sa
from spotlight_attn import compat
from spotlight_attn.cache import SpotlightCache
from spotlight_attn.config import SpotlightConfig
from spotlight_attn.errors import UnsupportedVersionError

from conftest import hasher_for, padded_prompts, tiny_model

METHODS = ["dense", "oracle", "spotlight", "linear", "quest", "streaming"]
ROOT = Path(__file__).resolve().parents[1]


def _prompts(seed=0):
    return padded_prompts(batch=3, length=37, pad=(0, 9, 4), seed=seed)


def _greedy(model, ids, mask, n=6, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


def test_installed_transformers_is_inside_the_supported_range():
    compat.check_transformers()  # CI's fresh environments resolve inside the range, or this fails first


def test_pyproject_states_the_range_compat_checks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stated = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "transformers"]
    assert len(stated) == 1 and stated[0].specifier == SpecifierSet(compat.SUPPORTED_TRANSFORMERS)


@pytest.mark.parametrize("version", ["5.26.0", "5.26.0.dev0", "6.0.0", "5.16.1", "4.57.6"])
def test_enable_refuses_a_transformers_outside_the_range_by_name(monkeypatch, version):
    monkeypatch.setattr(compat, "transformers_version", lambda: version)
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    model = tiny_model("llama", 4, 2, 16, layers=3)
    with pytest.raises(UnsupportedVersionError, match=rf"transformers {version} is installed.*{compat.SUPPORTED_TRANSFORMERS}"):
        sa.enable(model, None, SpotlightConfig(method="oracle"))
    assert getattr(model, "spotlight", None) is None
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")  # the way to try an untested release anyway
    sa.enable(model, None, SpotlightConfig(method="oracle"))
    sa.disable(model)


@pytest.mark.parametrize("version", [compat.MIN_TRANSFORMERS, "5.20.1", "5.24.0", "5.25.0", "5.25.3"])
def test_versions_inside_the_range_pass(version):
    compat.check_transformers(version)


def test_enable_disable_round_trip_keeps_the_models_own_attention():
    model = tiny_model("llama", 4, 2, 16, layers=3)
    ids, mask = _prompts()
    before = model.config._attn_implementation
    expected = _greedy(model, ids, mask)
    sa.enable(model, None, SpotlightConfig(method="streaming", budget=0, min_tokens=0, sink=1, window=1, dense_layers=()))
    assert not torch.equal(_greedy(model, ids, mask), expected)  # the setting is really in use
    sa.disable(model)
    assert model.config._attn_implementation == before
    assert torch.equal(_greedy(model, ids, mask), expected)


@pytest.mark.parametrize("family,hq,hkv", [("llama", 4, 2), ("mistral", 4, 4), ("qwen2", 6, 2)])
def test_generate_with_every_method_full_budget_equals_dense_and_partial_runs(family, hq, hkv):
    model = tiny_model(family, hq, hkv, 16, layers=4)
    ids, mask = _prompts()
    expected = _greedy(model, ids, mask)
    for method in METHODS:
        sa.enable(model, hasher_for(model, method), SpotlightConfig(method=method, budget=1.0, bits=64))
        assert torch.equal(_greedy(model, ids, mask), expected), method
        sa.enable(model, hasher_for(model, method), SpotlightConfig(method=method, budget=0.2, min_tokens=2, bits=64))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert out.sequences.shape == expected.shape, method
        cache = compat.output_cache(out)
        assert isinstance(cache, SpotlightCache) and cache.owner is model.spotlight, method
    sa.disable(model)


@pytest.mark.parametrize("method", ["linear", "quest"])
def test_batch_with_left_padding_equals_each_prompt_alone(method):
    model = tiny_model("llama", 6, 2, 16, layers=4)
    ids, mask = _prompts(seed=1)
    sa.enable(model, None, SpotlightConfig(method=method, budget=0.25, min_tokens=4, sink=1, window=2, bits=64, page_size=4))
    together = _greedy(model, ids, mask, n=8)
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        alone = _greedy(model, ids[i : i + 1, keep], mask[i : i + 1, keep], n=8)
        assert torch.equal(together[i, ids.shape[1] :], alone[0, -8:]), (method, i)
    sa.disable(model)


def test_sampling_and_beam_search_at_full_budget_equal_dense():
    model = tiny_model("qwen2", 4, 2, 16, layers=3)
    ids, mask = _prompts()

    def sample():
        torch.manual_seed(7)
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)

    expected_sample, expected_beams = sample(), _greedy(model, ids, mask, num_beams=3)
    sa.enable(model, None, SpotlightConfig(method="linear", budget=1.0, bits=64))
    assert torch.equal(sample(), expected_sample)
    assert torch.equal(_greedy(model, ids, mask, num_beams=3), expected_beams)  # beam search reorders the cache
    sa.disable(model)


def _filled_cache(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, SpotlightCache)
    return cache


def _index(cache):
    """Per layer: (keys, codes or None, page_min or None, page_max or None)."""
    return [(layer.keys, layer.codes, layer.page_min, layer.page_max) for layer in cache.layers]


def _assert_same(got, want):
    for layer_got, layer_want in zip(got, want, strict=True):
        for a, b in zip(layer_got, layer_want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["linear", "quest"])
def test_cache_crop_reorder_select_keep_codes_and_pages_in_step(method):
    """Each edit transformers makes to a cache leaves it as if it had been filled with the edited tokens."""
    model = tiny_model("llama", 4, 2, 16, layers=3)
    sa.enable(model, None, SpotlightConfig(method=method, bits=64, page_size=4, dense_layers=(0,)))
    ids, mask = torch.randint(3, 128, (3, 23)), torch.ones(3, 23, dtype=torch.long)
    with torch.no_grad():
        cache = _filled_cache(model, ids, mask)
        cache.crop(-5)  # remove the last 5 tokens: the meaning every supported release shares
        assert cache.get_seq_length() == 18
        _assert_same(_index(cache), _index(_filled_cache(model, ids[:, :18], mask[:, :18])))

        order = torch.tensor([2, 0, 1])
        cache.reorder_cache(order)
        _assert_same(_index(cache), _index(_filled_cache(model, ids[order, :18], mask[order, :18])))

        cache.batch_select_indices(torch.tensor([0, 2]))
        _assert_same(_index(cache), _index(_filled_cache(model, ids[[2, 1], :18], mask[[2, 1], :18])))

        cache.batch_repeat_interleave(2)
        _assert_same(_index(cache), _index(_filled_cache(model, ids[[2, 2, 1, 1], :18], mask[[2, 2, 1, 1], :18])))
    sa.disable(model)


def test_the_cache_argument_is_read_from_the_models_own_signature():
    model = tiny_model("llama", 4, 2, 16, layers=2)
    name = compat.cache_argument(model)
    assert name in compat.CACHE_NAMES and name == compat.cache_argument(model.get_decoder())
    kwargs = {"past_key_values": None, name: "given"}
    assert compat.pop_cache(kwargs) == "given" and not set(kwargs) & set(compat.CACHE_NAMES)


@pytest.mark.slow
def test_the_real_model_answers_through_retrieval():
    pytest.importorskip("gguf")
    model, tokenizer = sa.load_model("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hasher = sa.load_hasher(sa.shipped_hasher(model), model)  # found by the model's identity
    for method, h in [("oracle", None), ("spotlight", hasher)]:
        sa.enable(model, h, SpotlightConfig(method=method, budget=0.1))
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=16, do_sample=False)
        assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :]), method
    sa.disable(model)
