"""DecodeEngine against the paths it must equal, on tiny random models (CPU, seconds).

- full budget (and method dense): the engine's greedy decode equals transformers' own generate()
  (same tokens, logits within fp32 rounding), batch 2 with left padding;
- small budget: equals the library's enable() path with the same method, budget and hasher, whose
  selection rules the engine's device-side plan must reproduce;
- with the Triton kernels under TRITON_INTERPRET=1: equals the engine's reference path;
- the engine refuses what it cannot run, by name.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see test_kernels.py)

from spotlight_attn import HasherConfig, MLPHasher, SpotlightConfig, disable, enable  # noqa: E402
from spotlight_attn.engine import DecodeEngine  # noqa: E402
from spotlight_attn.errors import SpotlightError  # noqa: E402
from spotlight_attn.kernels.score_select import device_tokens_for  # noqa: E402
from spotlight_attn.config import Budget  # noqa: E402
from spotlight_attn.models import ModelGeometry  # noqa: E402

torch.set_num_threads(1)
NEW = 6


def prompts(seed=0, lengths=(23, 17), vocab=128):
    """Left-padded batch: ids [B, S], mask [B, S]."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, s - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, s - n :] = 1
    return ids, mask


def hf_generate(model, ids, mask, new=NEW):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).float()


def engine_generate(model, hasher, config, ids, mask, new=NEW, **kwargs):
    engine = DecodeEngine(model, hasher, config, max_batch=ids.shape[0], max_tokens=ids.shape[1] + new + 3, **kwargs)
    return engine.generate(ids, mask, max_new_tokens=new)


def close(a, b, tol=2e-4):
    return (a - b).norm() / b.norm() < tol


@pytest.mark.parametrize("method", ["dense", "linear"])
def test_full_budget_equals_transformers_generate(make_tiny_model, method):
    model = make_tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3)
    ids, mask = prompts()
    want_tokens, want_logits = hf_generate(model, ids, mask)
    config = SpotlightConfig(method=method, budget=1.0, bits=64, dense_layers=(0,))
    tokens, logits = engine_generate(model, None, config, ids, mask)
    assert torch.equal(tokens, want_tokens)
    assert close(logits, want_logits)


@pytest.mark.parametrize(
    "method,budget,group,placement",
    [("linear", 5, 2, None), ("linear", 0.2, 1, None), ("spotlight", 6, 3, "shared"), ("spotlight", 6, 2, "asymmetric")],
)
def test_small_budget_equals_enable_path(make_tiny_model, method, budget, group, placement):
    model = make_tiny_model("llama", q_heads=2 * group, kv_heads=2, head_dim=16, layers=3, seed=1)
    hasher = None
    if method == "spotlight":  # an untrained learned hasher of the shipped shape (2 residual blocks)
        hasher_config = HasherConfig(bits=64, width=32, init_scale=0.3, placement=placement)
        hasher = MLPHasher(ModelGeometry.from_model(model), hasher_config, layers=[1, 2], seed=3)
    config = SpotlightConfig(method=method, budget=budget, bits=64, seed=5, sink=1, window=2, min_tokens=3, dense_layers=(0,))
    ids, mask = prompts(seed=2, lengths=(29, 21))
    enable(model, hasher, config)
    want_tokens, want_logits = hf_generate(model, ids, mask)
    disable(model)
    dense_tokens, _ = hf_generate(model, ids, mask)
    tokens, logits = engine_generate(model, hasher, config, ids, mask)
    assert torch.equal(tokens, want_tokens)
    assert close(logits, want_logits)
    assert not torch.equal(want_tokens, dense_tokens) or budget == 0.2  # the budget really bites


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run; the gpu tests below run the compiled kernels")
def test_kernels_in_interpreter_equal_reference_engine(make_tiny_model):
    pytest.importorskip("triton")
    model = make_tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3, seed=2)
    config = SpotlightConfig(method="linear", budget=4, bits=64, sink=1, window=1, min_tokens=2, dense_layers=(0,))
    ids, mask = prompts(seed=3, lengths=(19, 12))
    want_tokens, want_logits = engine_generate(model, None, config, ids, mask, new=3, use_kernel=False)
    tokens, logits = engine_generate(model, None, config, ids, mask, new=3, use_kernel=True)
    assert torch.equal(tokens, want_tokens)
    assert close(logits, want_logits, 1e-4)


def test_bucketed_view_and_random_fill(make_tiny_model):
    """A view rounded up to a bucket reads the same keys; fill_random sets lengths and codes."""
    model = make_tiny_model("llama", layers=2)
    config = SpotlightConfig(method="linear", budget=0.5, bits=32, dense_layers=())
    ids, mask = prompts(seed=4, lengths=(9, 14))
    exact = engine_generate(model, None, config, ids, mask, bucket=1)
    wide = engine_generate(model, None, config, ids, mask, bucket=16)
    assert torch.equal(exact[0], wide[0]) and close(exact[1], wide[1], 1e-5)
    engine = DecodeEngine(model, None, config, max_batch=2, max_tokens=40)
    engine.fill_random([30, 11])
    assert engine.cache.lengths.tolist() == [30, 11]
    keys = engine.cache.keys[1][1, :11].transpose(0, 1)[None]  # [1, Hkv, 11, D]
    assert torch.equal(engine.cache.codes[1][1, :, :11], engine.hasher.key_codes(1, keys)[0])
    assert engine.step(torch.tensor([5, 6])).shape == (2, 128)
    assert engine.cache.lengths.tolist() == [31, 12]


@pytest.mark.parametrize("placement", ["shared", "asymmetric", "linear"])
def test_compiled_hashing_math_equals_hasher(make_tiny_model, placement):
    """hashed_attention_inputs (what --compile fuses) computes the hasher's own codes."""
    from spotlight_attn import LinearHasher
    from spotlight_attn.engine.engine import attention_inputs, hashed_attention_inputs

    model = make_tiny_model("llama", q_heads=6, kv_heads=2, head_dim=16, layers=2)
    geometry = ModelGeometry.from_model(model)
    if placement == "linear":
        hasher = LinearHasher(geometry, bits=96, seed=2)
    else:
        hasher = MLPHasher(geometry, HasherConfig(bits=64, width=8, init_scale=0.3, placement=placement), seed=1)
    layer = model.model.layers[1]
    g = torch.Generator().manual_seed(0)
    hidden, cos, sin = (torch.randn(3, 1, n, generator=g) for n in (96, 16, 16))
    banks = hasher.banks["k1"], hasher.banks["q1"] if "q1" in hasher.banks else None
    q, k, v, query_codes, key_codes = hashed_attention_inputs(layer, *banks, hidden, cos, sin)
    want_q, want_k, _ = attention_inputs(layer, hidden, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(query_codes, hasher.query_codes(1, q)) and torch.equal(key_codes, hasher.key_codes(1, k))


def test_floor_bytes_count_what_a_step_reads(make_tiny_model):
    from spotlight_attn.engine.bench import step_floor_bytes, weights_read_bytes

    model = make_tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3)
    params = sum(p.numel() * 4 for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert weights_read_bytes(model, 2) == params - embed.numel() * 4 + 2 * embed.shape[1] * 4
    dense = DecodeEngine(model, None, SpotlightConfig(method="dense"), max_batch=2, max_tokens=64)
    kv_token = 2 * 2 * 16 * 4  # K and V, 2 heads, D 16, fp32
    assert step_floor_bytes(dense, [40, 10]) == weights_read_bytes(model, 2) + 3 * 50 * kv_token
    config = SpotlightConfig(method="linear", bits=64, budget=5, sink=0, window=0, min_tokens=0, dense_layers=(0,))
    sparse = DecodeEngine(model, None, config, max_batch=2, max_tokens=64)
    per_layer = 50 * 2 * 2 * 4 + 10 * kv_token + 2 * 2 * 2 * 5 * 8  # codes, 5 + 5 selected rows, indices
    hasher_bytes = 2 * 2 * 16 * 64 * 4  # two layers of [Hkv, D, bits] fp32 projections
    assert step_floor_bytes(sparse, [40, 10]) == weights_read_bytes(model, 2) + 50 * kv_token + 2 * per_layer + hasher_bytes


def test_device_budget_matches_host_rule():
    lengths = torch.tensor([0, 1, 5, 19, 20, 21, 99, 1000, 4097])
    for budget in [Budget(0.02, 20, 4, 16), Budget(0.1, 0, 0, 0), Budget(7, 3, 2, 9), Budget(1.0, 20, 4, 16), Budget(0.0, 0, 1, 1)]:
        assert device_tokens_for(lengths, budget).tolist() == [budget.tokens_for(int(n)) for n in lengths]


def test_refusals(make_tiny_model):
    model = make_tiny_model("llama", layers=2)
    with pytest.raises(SpotlightError, match="oracle"):
        DecodeEngine(model, None, SpotlightConfig(method="oracle"), max_batch=1, max_tokens=8)
    engine = DecodeEngine(model, None, SpotlightConfig(method="dense"), max_batch=1, max_tokens=8)
    with pytest.raises(SpotlightError, match="prefill"):
        engine.step(torch.tensor([3]))
    with pytest.raises(SpotlightError, match="max_tokens"):
        engine.prefill(torch.ones(1, 64, dtype=torch.long))  # max_tokens rounds up to 64: no room for a new token
    enable(model, None, SpotlightConfig(method="linear"))
    with pytest.raises(SpotlightError, match="disable"):
        DecodeEngine(model, None, SpotlightConfig(method="dense"), max_batch=1, max_tokens=8)
    disable(model)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_cuda_graphs_equal_eager_and_enable_path(make_tiny_model):
    model = make_tiny_model("llama", q_heads=8, kv_heads=2, head_dim=64, layers=3, seed=4).cuda()
    config = SpotlightConfig(method="linear", budget=7, bits=128, sink=1, window=2, min_tokens=3, dense_layers=(0,))
    ids, mask = (t.cuda() for t in prompts(seed=5, lengths=(300, 257)))
    enable(model, None, config)
    want_tokens, want_logits = hf_generate(model, ids, mask)
    disable(model)
    eager = engine_generate(model, None, config, ids, mask, graphs=False)
    graphed = engine_generate(model, None, config, ids, mask, graphs=True, bucket=64)
    compiled = engine_generate(model, None, config, ids, mask, graphs=True, compile=True)
    for tokens, logits in (eager, graphed, compiled):
        assert torch.equal(tokens, want_tokens)
        assert close(logits, want_logits, 1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["flash-varlen", "sdpa"])
def test_dense_kernels_bf16(make_tiny_model, kernel):
    """bf16 dense decoding through each CUDA dense kernel vs the masked SDPA path (equal-length rows for sdpa)."""
    model = make_tiny_model("llama", q_heads=8, kv_heads=2, head_dim=128, layers=2, seed=6).cuda().to(torch.bfloat16)
    lengths = (700, 700) if kernel == "sdpa" else (700, 333)
    ids, mask = (t.cuda() for t in prompts(seed=7, lengths=lengths))
    config = SpotlightConfig(method="dense")
    want = engine_generate(model, None, config, ids, mask, dense_kernel="sdpa-masked", graphs=False)
    got = engine_generate(model, None, config, ids, mask, dense_kernel=kernel, bucket=1 if kernel == "sdpa" else 128)
    assert close(got[1], want[1], 2e-2)
