"""Selectors and sparse decode at the layer level, against brute force and dense SDPA."""

import pytest
import torch

from spotlight_attn.cache import SpotlightCache
from spotlight_attn.config import Budget, HasherConfig
from spotlight_attn.hashing import LinearHasher, MLPHasher
from spotlight_attn.kernels.sparse_decode import sparse_decode
from spotlight_attn.models import ModelGeometry
from spotlight_attn.selection import (
    DenseSelector,
    HashSelector,
    OracleSelector,
    QuestSelector,
    StreamingSelector,
)
from spotlight_attn.config import Method


def dense_reference(query, keys, values, key_valid, scaling):
    """SDPA over the valid keys, float64."""
    b, hq, _, d = query.shape
    group = hq // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    mask = key_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(query.double(), k, v, attn_mask=mask, scale=scaling)


def all_selectors(geo, page_size=4):
    return [
        DenseSelector(),
        OracleSelector(),
        HashSelector(MLPHasher(geo, HasherConfig(bits=64, width=8)), Method.SPOTLIGHT),
        HashSelector(LinearHasher(geo, bits=48), Method.LINEAR),
        QuestSelector(page_size),
        StreamingSelector(),
    ]


def filled_layer(selector, geo, lengths, chunks, seed=0, dtype=torch.float32):
    """A SpotlightLayer fed `chunks` appends (prefill then decode-like), rows left-padded to `lengths`."""
    g = torch.Generator().manual_seed(seed)
    b, total = len(lengths), sum(chunks)
    cache = SpotlightCache([selector.key_index(i) for i in range(geo.num_layers)])
    mask = torch.zeros(b, total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n :] = 1
    layer = cache.layers[1]
    seen = 0
    for n in chunks:
        seen += n
        cache.set_attention_mask(mask[:, :seen], seen, b)
        k = torch.randn(b, geo.num_kv_heads, n, geo.head_dim, generator=g).to(dtype)
        v = torch.randn(b, geo.num_kv_heads, n, geo.head_dim, generator=g).to(dtype)
        layer.update(k, v)
    return layer


SHAPES = [(1, 1, 64), (3, 1, 64), (4, 2, 128), (6, 2, 64)]  # (G, Hkv, D): GQA groups 1, 3, 4


@pytest.mark.parametrize("group,hkv,d", SHAPES)
def test_full_budget_equals_dense_for_every_selector(group, hkv, d):
    geo = ModelGeometry("llama", 2, group * hkv, hkv, d, 1e4, 4096)
    g = torch.Generator().manual_seed(d + group)
    for selector in all_selectors(geo):
        layer = filled_layer(selector, geo, lengths=[37, 20], chunks=[30, 1, 1, 5])
        query = torch.randn(2, group * hkv, 1, d, generator=g)
        scaling = d**-0.5
        indices = selector.select(query, layer, Budget(1.0, 0, 0, 0), scaling)
        out = sparse_decode(query, layer.keys, layer.values, indices, scaling)
        ref = dense_reference(query, layer.keys, layer.values, layer.key_valid, scaling)
        assert (out.double() - ref).abs().max() <= 1e-5, type(selector).__name__


@pytest.mark.parametrize("group", [1, 3, 4])
def test_oracle_selects_the_brute_force_top_k(group):
    geo = ModelGeometry("llama", 2, group * 2, 2, 16, 1e4, 4096)
    layer = filled_layer(OracleSelector(), geo, lengths=[50, 31], chunks=[50])
    g = torch.Generator().manual_seed(group)
    query = torch.randn(2, group * 2, 1, 16, generator=g) * 3
    k = 9
    picked = OracleSelector().select(query, layer, Budget(k, 0, 0, 0), 0.25)
    for b in range(2):
        valid = layer.key_valid[b].nonzero().flatten().tolist()
        for h in range(2):
            mass = torch.zeros(len(valid), dtype=torch.float64)
            for j in range(group):
                q = query[b, h * group + j, 0].double()
                mass += torch.softmax(torch.stack([q @ layer.keys[b, h, t].double() for t in valid]) * 0.25, 0)
            expected = sorted(valid[i] for i in mass.topk(k).indices.tolist())
            assert picked[b, h].tolist() == expected


def test_streaming_reads_sinks_and_the_most_recent_tokens():
    geo = ModelGeometry("llama", 2, 2, 1, 8, 1e4, 4096)
    layer = filled_layer(StreamingSelector(), geo, lengths=[20, 12], chunks=[20])
    picked = StreamingSelector().select(torch.randn(2, 2, 1, 8), layer, Budget(6, 0, 2, 0), 1.0)
    assert picked[0, 0].tolist() == [0, 1, 16, 17, 18, 19]
    assert picked[1, 0].tolist() == [8, 9, 16, 17, 18, 19]  # row 1 is left-padded by 8


@pytest.mark.parametrize("page_size", [1, 4, 5])
def test_quest_page_bounds_match_brute_force_after_appends(page_size):
    geo = ModelGeometry("llama", 2, 4, 2, 8, 1e4, 4096)
    layer = filled_layer(QuestSelector(page_size), geo, lengths=[23, 14], chunks=[9, 1, 1, 7, 1, 4])
    keys, valid = layer.keys, layer.key_valid
    assert layer.page_min.shape[2] == -(-23 // page_size)
    for b in range(2):
        positions = valid[b].nonzero().flatten().tolist()  # a page = page_size consecutive valid tokens
        for p in range(layer.page_min.shape[2]):
            span = positions[p * page_size : (p + 1) * page_size]
            if not span:
                assert torch.isinf(layer.page_min[b, :, p]).all()
                continue
            assert torch.equal(layer.page_min[b, :, p], keys[b, :, span].amin(1))
            assert torch.equal(layer.page_max[b, :, p], keys[b, :, span].amax(1))


def test_quest_score_bounds_the_group_logit_sum():
    geo = ModelGeometry("llama", 2, 6, 2, 8, 1e4, 4096)
    selector = QuestSelector(4)
    layer = filled_layer(selector, geo, lengths=[30], chunks=[30])
    query = torch.randn(1, 6, 1, 8)
    bound = selector.scores(query, layer, 1.0)  # [1, 2, T]
    q = query.reshape(1, 2, 3, 8)
    logit_sum = torch.einsum("bhgd,bhtd->bht", q, layer.keys)  # group sum of q.k per key
    assert (bound >= logit_sum - 1e-5).all()


def test_sparse_decode_over_a_subset_and_over_nothing():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    indices = torch.tensor([[[3, 7, 29, -1], [0, 1, 2, 3]], [[-1, -1, -1, -1], [5, -1, -1, -1]]])
    out = sparse_decode(q, k, v, indices, 0.25)
    for b in range(2):
        for h in range(4):
            rows = [i for i in indices[b, h // 2].tolist() if i >= 0]
            if not rows:
                assert torch.equal(out[b, h], torch.zeros(1, 16))
                continue
            p = torch.softmax(q[b, h, 0] @ k[b, h // 2, rows].T * 0.25, 0)
            assert torch.allclose(out[b, h, 0], p @ v[b, h // 2, rows], atol=1e-6)


def test_sparse_decode_half_precision_tracks_float32():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 8, 1, 64, generator=g), torch.randn(1, 2, 97, 64, generator=g), torch.randn(1, 2, 97, 64, generator=g))
    idx = torch.randperm(97, generator=g)[:40].sort().values.expand(1, 2, 40).contiguous()
    ref = sparse_decode(q, k, v, idx, 0.125)
    for dtype in (torch.float16, torch.bfloat16):
        out = sparse_decode(q.to(dtype), k.to(dtype), v.to(dtype), idx, 0.125)
        assert out.dtype == dtype
        assert (out.float() - ref).norm() / ref.norm() < 1e-2
