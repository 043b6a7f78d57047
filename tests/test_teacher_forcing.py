"""teacher_forcing(): one forward pass scores a text exactly as token-by-token sparse decoding would;
index_cache(): one dense prefill serves any method."""

from __future__ import annotations

import pytest
import torch

import spotlight_attn as sa
from spotlight_attn import attention
from spotlight_attn.compat import cache_argument, output_cache
from spotlight_attn.config import SpotlightConfig
from spotlight_attn.errors import SpotlightError

METHODS = [("oracle", {}), ("linear", {"bits": 64}), ("quest", {"page_size": 4}), ("streaming", {}), ("dense", {})]


def _decode_logits(model, ids, start, cache=None):
    """Prefill ids[:, :start] (or continue `cache`), then feed one token at a time: logits [B, L, V]."""
    with torch.no_grad():
        if cache is None:
            out = model(ids[:, :start], use_cache=True)
            cache, steps = output_cache(out), [out.logits]
        else:
            steps = []
        for t in range(start, ids.shape[1]):
            out = model(ids[:, t : t + 1], **{cache_argument(model): cache}, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("method,extra", METHODS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3), (6, 2)])
@pytest.mark.parametrize("budget,rules,block_rows", [(0.25, (3, 1, 2), 5), (0.25, (3, 1, 2), None), (0.0, (0, 0, 0), 5)])
def test_teacher_forcing_equals_token_by_token_decoding(make_tiny_model, monkeypatch, method, extra, hq, hkv, budget, rules, block_rows):
    """block_rows: rows per block of the teacher-forced pass (None: all in one); a budget of 0 reads nothing."""
    if block_rows is not None:
        monkeypatch.setitem(attention.TEACHER_FORCED_ELEMENTS, "cpu", 2 * hq * 37 * block_rows)
    model = make_tiny_model("llama", q_heads=hq, kv_heads=hkv, layers=3)
    min_tokens, sink, window = rules
    config = SpotlightConfig(method=method, budget=budget, min_tokens=min_tokens, sink=sink, window=window, dense_layers=(0,), **extra)
    sa.enable(model, None, config)
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 37))  # odd length, batch 2
    start = 9
    with torch.no_grad(), sa.teacher_forcing(model, start):
        fast = model(ids, use_cache=True).logits
    slow = _decode_logits(model, ids, start)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)
    if method != "dense":  # the comparison means something: selection really changed the output
        sa.disable(model)
        with torch.no_grad():
            dense = model(ids).logits
        assert (fast[:, start:] - dense[:, start:]).abs().max() > 1e-3


def test_teacher_forcing_at_full_budget_is_the_model_itself(make_tiny_model):
    model = make_tiny_model("qwen2", q_heads=4, kv_heads=1, layers=2)
    ids = torch.randint(3, 128, (1, 50))
    with torch.no_grad():
        own = model(ids).logits
        sa.enable(model, None, SpotlightConfig(method="linear", bits=32, budget=1.0, dense_layers=()))
        with sa.teacher_forcing(model, 0):
            ours = model(ids, use_cache=True).logits
    torch.testing.assert_close(ours, own, atol=2e-5, rtol=1e-4)


def test_teacher_forcing_restores_plain_prefill_and_checks_its_input(make_tiny_model):
    model = make_tiny_model()
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        dense = model(ids).logits
        sa.enable(model, None, SpotlightConfig(method="streaming", budget=0.1, dense_layers=()))
        with sa.teacher_forcing(model, 5):
            pass
        torch.testing.assert_close(model(ids, use_cache=True).logits, dense)  # prefill is dense again
    with pytest.raises(SpotlightError, match="start"):
        with sa.teacher_forcing(model, -1):
            pass
    sa.disable(model)
    with pytest.raises(SpotlightError, match="not enabled"):
        with sa.teacher_forcing(model, 0):
            pass


@pytest.mark.parametrize("method,extra", METHODS)
def test_one_dense_prefill_serves_every_method(make_tiny_model, method, extra):
    model = make_tiny_model("llama", q_heads=4, kv_heads=2, layers=3)
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 41))
    start = 30
    with torch.no_grad():
        prefill = model(ids[:, :start], use_cache=True)
    before = [layer.keys.clone() for layer in output_cache(prefill).layers]
    sa.enable(model, None, SpotlightConfig(method=method, budget=0.2, min_tokens=2, sink=1, window=1, **extra))
    own = _decode_logits(model, ids, start)[:, start:]  # the method's own prefill, then decode steps
    shared = _decode_logits(model, ids, start, cache=sa.index_cache(model, output_cache(prefill)))
    torch.testing.assert_close(shared, own, atol=2e-5, rtol=1e-4)
    for layer, keys in zip(output_cache(prefill).layers, before):
        assert torch.equal(layer.keys, keys)  # the dense prefill was left as it was
