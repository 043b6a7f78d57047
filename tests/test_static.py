"""The fast path: generate() over the static cache (static_cache.py + static_attention.py + kernels/ops.py).

On tiny random models of every supported family, on the CPU:
- full budget (and method dense): the same tokens as transformers' own generate(), logits within fp32
  rounding, batch 3 with left padding, GQA groups 1 and > 1;
- partial budget: the same tokens and logits as the dynamic-cache path (the library's eager reference);
- what generate() offers: sampling, EOS, stop strings, a streamer, beam search, repeated calls;
- compiled as generate() compiles a static cache (here with fullgraph=True: no graph break anywhere);
- the custom ops against their references, and (interpreter) the Triton kernels behind them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see test_kernels.py)

import spotlight_attn as sa  # noqa: E402
from spotlight_attn import compat  # noqa: E402
from spotlight_attn.config import Budget, HasherConfig, SpotlightConfig  # noqa: E402
from spotlight_attn.errors import SpotlightError  # noqa: E402
from spotlight_attn.kernels import ops  # noqa: E402
from spotlight_attn.kernels.score_select import device_tokens_for, new_guess, score_select_reference  # noqa: E402
from spotlight_attn.models import ModelGeometry  # noqa: E402
from spotlight_attn.static_cache import SpotlightStaticCache  # noqa: E402

from conftest import tiny_model, tiny_tokenizer  # noqa: E402

NEW = 6


def prompts(lengths=(23, 14, 19), seed=0, vocab=128):
    """Left-padded batch: ids [B, S], mask [B, S]."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, s - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, s - n :] = 1
    return ids, mask


def run(model, ids, mask, new=NEW, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).float(), compat.output_cache(out)


def close(a, b, tol=2e-4):
    return float((a - b).norm() / b.norm()) < tol


def learned(model, placement="shared", bits=64):
    geometry = ModelGeometry.from_model(model)
    config = HasherConfig(bits=bits, width=16, init_scale=0.3, placement=placement)
    return sa.MLPHasher(geometry, config, layers=range(1, geometry.num_layers), seed=3)


FAMILIES = [("llama", 4, 2), ("mistral", 4, 4), ("qwen2", 6, 2), ("qwen3", 4, 1)]


@pytest.mark.parametrize("family,hq,hkv", FAMILIES)
def test_full_budget_equals_transformers_generate(family, hq, hkv):
    model = tiny_model(family, hq, hkv, 16, layers=3)
    ids, mask = prompts()
    want_tokens, want_logits, _ = run(model, ids, mask)
    for method, hasher in [("dense", None), ("linear", None), ("spotlight", learned(model))]:
        sa.enable(model, hasher, SpotlightConfig(method=method, budget=1.0, bits=64, dense_layers=(0,), cache="static"))
        tokens, logits, cache = run(model, ids, mask)
        assert isinstance(cache, SpotlightStaticCache), method
        assert torch.equal(tokens, want_tokens), (family, method)
        assert close(logits, want_logits), (family, method)
    sa.disable(model)


@pytest.mark.parametrize(
    "family,method,budget,group,placement",
    [("llama", "linear", 5, 2, None), ("qwen3", "linear", 0.2, 1, None), ("mistral", "spotlight", 6, 3, "shared"),
     ("qwen2", "spotlight", 6, 2, "asymmetric")],
)
def test_partial_budget_equals_the_dynamic_path(family, method, budget, group, placement):
    model = tiny_model(family, 2 * group, 2, 16, layers=3, seed=1)
    hasher = learned(model, placement) if method == "spotlight" else None
    base = dict(method=method, budget=budget, bits=64, seed=5, sink=1, window=2, min_tokens=3, dense_layers=(0,))
    ids, mask = prompts(seed=2, lengths=(29, 21, 8))
    sa.enable(model, hasher, SpotlightConfig(**base, cache="dynamic"))
    want_tokens, want_logits, dynamic = run(model, ids, mask)
    sa.enable(model, hasher, SpotlightConfig(**base, cache="static"))
    tokens, logits, static = run(model, ids, mask)
    assert type(dynamic).__name__ == "SpotlightCache" and isinstance(static, SpotlightStaticCache)
    assert torch.equal(tokens, want_tokens)
    assert close(logits, want_logits)
    assert sa.attention.read_fraction(static) == pytest.approx(sa.attention.read_fraction(dynamic))
    sa.disable(model)
    assert not torch.equal(run(model, ids, mask)[0], tokens) or budget == 0.2  # the budget really bites


@pytest.mark.parametrize("predict", [True, False], ids=["prediction", "SPOTLIGHT_SELECT_GUESS=0"])
def test_static_cache_edits_keep_the_codes_and_a_prediction_buffer_per_row(predict, monkeypatch):
    """Beam reorders and rebatches move K/V and codes row by row; score_select's prediction buffer
    (a hint) is left by a reorder and started afresh, one row per row, by a rebatch; empty without it."""
    monkeypatch.setattr("spotlight_attn.static_cache.GUESS_IN_CACHE", predict)
    model = tiny_model("llama", 4, 2, 16, layers=3)
    ids, mask = prompts()
    sa.enable(model, None, SpotlightConfig(method="linear", budget=0.5, bits=64, cache="static"))
    _, _, cache = run(model, ids, mask)
    hashed = [layer for layer in cache.layers if layer.codes is not None]
    assert hashed
    codes = [layer.codes.clone() for layer in hashed]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    for layer, before in zip(hashed, codes):
        assert torch.equal(layer.codes, before[[2, 2, 1, 1]])
        rows = 4 if predict else 0
        assert layer.select_guess.shape == (rows, before.shape[1]) and layer.select_guess.isnan().all()  # fresh
    sa.disable(model)


def test_generate_features_on_the_static_path():
    model = tiny_model("qwen2", 4, 2, 16, layers=3)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    ids, mask = prompts()

    def sample():
        torch.manual_seed(11)
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=30,
                              top_p=0.9, pad_token_id=0)

    want_sample = sample()
    want_beams = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False, pad_token_id=0)
    greedy, _, _ = run(model, ids, mask, new=8)
    sa.enable(model, None, SpotlightConfig(method="linear", budget=1.0, bits=64, cache="static"))
    assert model.generation_config.cache_implementation == "static"  # what enable() set: plain generate() is static
    assert torch.equal(sample(), want_sample)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(beams, want_beams)  # beam search reorders the static cache in place

    # EOS: a token the greedy run emits in row 0 ends that row where it first comes; the others go on.
    eos = int(greedy[0, 2])
    first = int((greedy[0] == eos).nonzero()[0])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    new = out[:, ids.shape[1] :]
    assert torch.equal(new[0, : first + 1], greedy[0, : first + 1]) and (new[0, first + 1 :] == 0).all()

    # A streamer sees the text as it is made (stop strings: test_real_model.py, they need a real tokenizer).
    from transformers import TextStreamer

    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    one_ids, one_mask = ids[1:2, mask[1].bool()], mask[1:2, mask[1].bool()]
    out = model.generate(one_ids, attention_mask=one_mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         streamer=Capture(tokenizer, skip_prompt=True))
    assert torch.equal(out[0, one_ids.shape[1] :], greedy[1])  # row 1 alone decodes as it did in the batch
    assert "".join(printed).split() == tokenizer.decode(greedy[1]).split()
    sa.disable(model)
    assert model.generation_config.cache_implementation is None  # restored


class _HostEvent:
    """torch.Event for the CPU, which has none: the CPU runs in order, so a recorded event is always done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


def test_deferred_stop_check_gives_what_the_per_step_check_gives(monkeypatch):
    """generate() over the static cache reads its stop flag one step late (compat.defer_stop_checks): when
    EOS ends generation the extra step is undone, so tokens, scores and the returned cache equal the
    per-step check's, and one more decode step ran. The rule answers yes for our cache alone."""
    from transformers import DynamicCache
    from transformers.generation.utils import DeferredStopCheck

    monkeypatch.setattr(compat, "DEFER_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", _HostEvent)  # the CPU has no events; DeferredStopCheck makes two
    model = tiny_model("llama", 4, 2, 16, layers=3)
    ids, mask = prompts(lengths=(17,))
    steps = []
    model.model.register_forward_pre_hook(lambda module, args: steps.append(1))

    def decode(defer, **kwargs):
        sa.enable(model, None, SpotlightConfig(method="linear", budget=0.3, bits=64, min_tokens=2, cache="static",
                                               defer_stop=defer))
        steps.clear()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
        cache = compat.output_cache(out)
        return out.sequences, torch.stack(out.scores, 1), int(cache.get_seq_length()), cache.layers[0].lengths.clone(), len(steps)

    *_, plain_steps = greedy = decode(False)
    eos = int(greedy[0][0, ids.shape[1] + 2])
    sequences, scores, seen, lengths, n = decode(False, eos_token_id=eos)
    assert sequences.shape[1] < ids.shape[1] + 8  # EOS ended it early
    deferred = decode(True, eos_token_id=eos)
    assert torch.equal(deferred[0], sequences) and torch.equal(deferred[1], scores)
    assert deferred[2] == seen and torch.equal(deferred[3], lengths)  # the extra step was cropped off
    assert deferred[4] == n + 1  # and it ran: the check was deferred
    assert decode(True)[4] == plain_steps  # max_new_tokens ends it on the host, on time: no extra step

    cache = model.spotlight.new_static_cache(1, 64, torch.device("cpu"), torch.float32)
    cuda = torch.device("cuda")
    assert DeferredStopCheck.is_supported(cuda, cache, True, False)
    assert not DeferredStopCheck.is_supported(cuda, cache, True, True)  # an assistant model checks every step
    assert not DeferredStopCheck.is_supported(cuda, DynamicCache(), False, False)  # transformers' own rule
    model.spotlight.config.defer_stop = False
    assert not DeferredStopCheck.is_supported(cuda, cache, False, False)
    sa.disable(model)


def test_repeated_calls_reuse_the_cache_and_give_the_same_tokens():
    model = tiny_model("llama", 4, 2, 16, layers=3)
    ids, mask = prompts()
    sa.enable(model, None, SpotlightConfig(method="linear", budget=0.3, bits=64, min_tokens=2, cache="static"))
    first, _, cache = run(model, ids, mask)
    again, _, same = run(model, ids, mask)
    assert same is cache and torch.equal(again, first)  # reset and reused: compiled graphs keep their buffers
    shorter, _, smaller = run(model, ids[:, 4:], mask[:, 4:])
    assert smaller is cache  # fits: a shorter prompt, the same batch
    wider, _, other = run(model, ids[:2], mask[:2])
    assert other is not cache and wider.shape == (2, NEW)
    sa.disable(model)


def test_methods_the_static_cache_does_not_serve_decode_over_the_dynamic_one():
    model = tiny_model("llama", 4, 2, 16, layers=3)
    ids, mask = prompts()
    config = dict(method="quest", budget=0.3, page_size=4, min_tokens=2)
    sa.enable(model, None, SpotlightConfig(**config, cache="dynamic"))
    want, _, _ = run(model, ids, mask)
    sa.enable(model, None, SpotlightConfig(**config, cache="static"))
    assert model.generation_config.cache_implementation is None  # enable() leaves it: quest has no static path
    tokens, _, cache = run(model, ids, mask, cache_implementation="static")
    assert type(cache).__name__ == "SpotlightCache" and torch.equal(tokens, want)
    sa.disable(model)


def test_a_prompt_that_overflows_the_static_cache_is_refused():
    model = tiny_model("llama", 4, 2, 16, layers=2)
    sa.enable(model, None, SpotlightConfig(method="linear", bits=64, cache="static"))
    installed = model.spotlight
    cache = installed.new_static_cache(1, 64, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 128, (1, 70))
    with pytest.raises(SpotlightError, match="holds 64 tokens"):
        model(input_ids=ids, use_cache=True, **{compat.cache_argument(model): cache})
    sa.disable(model)


def test_generate_compiled_with_fullgraph_equals_eager():
    """generate()'s own compilation of a static-cache decode step (forced on the CPU), fullgraph=True:
    nothing in the step breaks the graph, which is what lets one CUDA graph hold it on a GPU."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    model = tiny_model("llama", 4, 2, 16, layers=2, seed=3)
    ids, mask = prompts(lengths=(12, 9))
    sa.enable(model, None, SpotlightConfig(method="linear", budget=4, bits=64, min_tokens=2, sink=1, window=1,
                                           dense_layers=(0,), cache="static"))
    want, want_logits, _ = run(model, ids, mask, new=4)
    compile_config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
    compile_config._compile_all_devices = True
    tokens, logits, _ = run(model, ids, mask, new=4, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # generate() really took the compiled path
    assert torch.equal(tokens, want) and close(logits, want_logits, 1e-4)
    sa.disable(model)
    torch._dynamo.reset()


def _random_codes(b, h, t, w, g):
    return torch.randint(-(2**31), 2**31 - 1, (b, h, t, w), generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("bins", ["bands", "exact"], ids=["SPOTLIGHT_SELECT_GUESS=bands", "exact"])
@pytest.mark.parametrize("b,hq,hkv,t,bits", [(1, 4, 4, 37, 64), (3, 6, 2, 97, 128), (2, 8, 1, 130, 32)])
def test_score_select_op_equals_the_reference_row_by_row(b, hq, hkv, t, bits, bins, monkeypatch):
    monkeypatch.setattr("spotlight_attn.kernels.score_select.GUESS_BINS_IN_CACHE", bins)
    g = torch.Generator().manual_seed(b * t)
    w = bits // 32
    q, codes = _random_codes(b, hq, 1, w, g), _random_codes(b, hkv, t, w, g) & 0x0F0F0F0F  # many ties
    lengths = torch.tensor([t, t // 2, 1][:b])
    for budget in [Budget(0.2, 2, 1, 2), Budget(5, 0, 0, 0), Budget(0, 0, 0, 0), Budget(1.0, 0, 2, 3)]:
        k = budget.tokens_for(t)
        k_rows = device_tokens_for(lengths, budget)
        bounds = torch.stack([torch.zeros_like(k_rows), lengths, k_rows], 1).to(torch.int32)
        none = torch.empty(0)  # no threshold prediction
        got = ops.score_select_op(q, codes, bounds, k, bits, budget.sink, budget.window, none, 0)
        valid = torch.arange(t)[None, :] < lengths[:, None]
        want = score_select_reference(q, codes, valid, budget, bits)
        assert got.shape == (b, hkv, k)
        assert torch.equal(got[..., : want.shape[-1]], want) and (got[..., want.shape[-1] :] == -1).all()
        if k:
            torch.library.opcheck(ops.score_select_op, (q, codes, bounds, k, bits, budget.sink, budget.window, none, 0))
        pytest.importorskip("triton")
        if not torch.cuda.is_available():  # the Triton kernels, in the interpreter, without and with a prediction
            assert torch.equal(ops.score_select_op(q, codes, bounds, k, bits, budget.sink, budget.window, none, 1), got)
            guess = new_guess(b, hkv, "cpu")
            for _ in range(2):  # the second call starts from what the first left
                assert torch.equal(ops.score_select_op(q, codes, bounds, k, bits, budget.sink, budget.window, guess, 1), got)
            if budget.amount == 0.2:
                assert not guess.isnan().all()  # updated in place


def test_sparse_and_dense_decode_ops_equal_their_references():
    from spotlight_attn.kernels.sparse_decode import sparse_decode_reference

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 6, 2, 45, 16
    query = torch.randn(b, hq, 1, d, generator=g)
    k_by_token, v_by_token = torch.randn(b, t, hkv, d, generator=g), torch.randn(b, t, hkv, d, generator=g)
    keys, values = k_by_token.transpose(1, 2), v_by_token.transpose(1, 2)  # strided views, as the cache hands them
    indices = torch.randint(0, 30, (b, hkv, 7), generator=g)
    indices[1, :, 4:] = -1
    want = sparse_decode_reference(query, keys, values, indices, 0.25)
    assert torch.equal(ops.sparse_decode_op(query, keys, values, indices, 0.25, 0), want)
    torch.library.opcheck(ops.sparse_decode_op, (query, keys, values, indices, 0.25, 0))
    lengths = torch.tensor([45, 17])
    cu_k = torch.arange(b + 1, dtype=torch.int32) * t
    got = ops.dense_decode_op(query, k_by_token, v_by_token, lengths, cu_k, 0.25)
    for row, n in enumerate(lengths.tolist()):
        k, v = keys[row : row + 1, :, :n].repeat_interleave(3, 1), values[row : row + 1, :, :n].repeat_interleave(3, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(query[row : row + 1], k, v, scale=0.25)
        torch.testing.assert_close(got[row : row + 1], ref, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(ops.dense_decode_op, (query, k_by_token, v_by_token, lengths, cu_k, 0.25))
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        torch.testing.assert_close(ops.sparse_decode_op(query, keys, values, indices, 0.25, 1), want, atol=1e-5, rtol=1e-5)


def test_device_budget_matches_host_rule():
    lengths = torch.tensor([0, 1, 5, 19, 20, 21, 99, 1000, 4097])
    for budget in [Budget(0.02, 20, 4, 16), Budget(0.1, 0, 0, 0), Budget(7, 3, 2, 9), Budget(1.0, 20, 4, 16), Budget(0.0, 0, 1, 1)]:
        assert device_tokens_for(lengths, budget).tolist() == [budget.tokens_for(int(n)) for n in lengths]


def test_floor_bytes_count_what_a_step_reads():
    from spotlight_attn.decode_bench import step_floor_bytes, weights_read_bytes

    model = tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3)
    params = sum(p.numel() * 4 for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert weights_read_bytes(model, 2) == params - embed.numel() * 4 + 2 * embed.shape[1] * 4
    kv_token = 2 * 2 * 16 * 4  # K and V, 2 heads, D 16, fp32
    assert step_floor_bytes(model, [40, 10], None, None) == weights_read_bytes(model, 2) + 3 * 50 * kv_token
    config = SpotlightConfig(method="linear", bits=64, budget=5, sink=0, window=0, min_tokens=0, dense_layers=(0,))
    hasher = sa.LinearHasher(ModelGeometry.from_model(model), bits=64, layers=[1, 2])
    per_layer = 50 * 2 * 2 * 4 + 10 * kv_token + 2 * 2 * 2 * 5 * 8  # codes, 5 + 5 selected rows, indices
    hasher_bytes = 2 * 2 * 16 * 64 * 4  # two layers of [Hkv, D, bits] fp32 projections
    assert step_floor_bytes(model, [40, 10], config, hasher) == weights_read_bytes(model, 2) + 50 * kv_token + 2 * per_layer + hasher_bytes


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cuda_generate_equals_the_dynamic_path(dtype):
    """On CUDA enable() makes generate() use the static cache, and generate() compiles and
    graph-captures it (reduce-overhead): the same tokens as the eager dynamic path."""
    torch._dynamo.reset()
    model = tiny_model("llama", 8, 2, 64, layers=3, seed=4).cuda().to(dtype)
    ids, mask = (t.cuda() for t in prompts(lengths=(300, 257, 64), seed=5))
    # fp32: a partial budget, so the compiled step's hashing and selection must agree with the eager
    # path's exactly. bf16: flash and the compiled hash round differently from eager SDPA and matmuls,
    # and one flipped code bit moves a 7-key selection (and every token after it); at the full budget
    # every key is selected whatever the codes, so bf16 checks the kernels' dtype paths instead.
    budget = 7 if dtype is torch.float32 else 1.0
    base = dict(method="linear", budget=budget, bits=128, sink=1, window=2, min_tokens=3, dense_layers=(0,))
    new = 12 if dtype is torch.float32 else 4
    sa.enable(model, None, SpotlightConfig(**base, cache="dynamic"))
    want, want_logits, _ = run(model, ids, mask, new=new)
    sa.enable(model, None, SpotlightConfig(**base))  # cache="auto": static on CUDA
    assert model.generation_config.cache_implementation == "static"
    for _ in range(2):  # the second call replays the captured graphs
        tokens, logits, cache = run(model, ids, mask, new=new)
        assert isinstance(cache, SpotlightStaticCache) and hasattr(model, "_compiled_call")
        if dtype is torch.float32:
            assert torch.equal(tokens, want) and close(logits, want_logits, 1e-3)
        else:
            assert torch.equal(tokens[:, :3], want[:, :3]) and close(logits[:, :3], want_logits[:, :3], 3e-2)
    sa.disable(model)
    torch._dynamo.reset()
