"""The fused hash kernel (kernels/hash.py) against the hasher's torch path, bit for bit.

Without a GPU it runs in Triton's CPU interpreter (TRITON_INTERPRET=1 is set below before Triton is
imported). Codes are integers: they must equal the reference's, except that a pre-sign value within
float32 rounding of zero may take either sign; `agree` checks exactly that, and reports how many such
bits there were (none on these inputs, so the codes are equal).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` of this module
pytest.importorskip("triton")

import spotlight_attn as sa  # noqa: E402
from spotlight_attn.config import HasherConfig, SpotlightConfig  # noqa: E402
from spotlight_attn.hashing import hasher as hasher_module  # noqa: E402
from spotlight_attn.kernels import ops  # noqa: E402
from spotlight_attn.kernels.hash import (  # noqa: E402
    _hash_codes_triton, _step_hash_codes_triton, hash_codes_reference, serves, step_hash_codes_reference,
)
from spotlight_attn.kernels.pack import unpack_bits  # noqa: E402
from spotlight_attn.models import ModelGeometry  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def bank_weights(n, d, width, bits, depth, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.5):
        return (torch.randn(*shape, generator=g) * std).to(DEVICE)

    if depth == 0:
        return None, None, None, None, r(n, d, bits, std=d**-0.5)
    return r(depth, n, d, width), r(depth, n, 1, width), r(depth, n, width, d), r(depth, n, 1, d), r(n, d, bits, std=d**-0.5)


def pre_sign(x, w1, b1, w2, b2, proj):
    """The reference's values before the sign, in float64."""
    x = x.double()
    for i in range(0 if w1 is None else w1.shape[0]):
        x = x + torch.nn.functional.silu(torch.baddbmm(b1[i].double(), x, w1[i].double())) @ w2[i].double() + b2[i].double()
    return x @ proj.double()


def agree(codes, want, values, bits) -> int:
    """Every differing bit has a reference value within rounding of zero; -> the count of such bits."""
    differ = unpack_bits(codes, bits) != unpack_bits(want, bits)
    near_zero = values.abs() < 1e-4 * values.abs().amax(-1, keepdim=True)
    assert not (differ & ~near_zero).any(), "a bit differs away from zero"
    return int(differ.sum())


@pytest.mark.parametrize("n,m,d,width,bits,depth", [
    (2, 1, 16, 8, 64, 2),     # one row (batch 1, a key), width below a dot tile
    (3, 5, 64, 64, 128, 2),   # a decode step's G + 1 rows, SmolLM2's dims
    (1, 37, 48, 24, 100, 1),  # odd rows and dims, bits not a multiple of 32
    (4, 33, 128, 128, 128, 2),  # Llama-3-8B's dims, two row blocks
    (2, 7, 32, 0, 96, 0),     # SimHash: the projection alone
    (1, 18, 32, 16, 512, 1),  # the widest code it takes, two row blocks
])
def test_fused_hash_equals_the_reference(n, m, d, width, bits, depth):
    weights = bank_weights(n, d, width, bits, depth, seed=n * 100 + m)
    x = torch.randn(n, m, d, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    codes = _hash_codes_triton(x, *weights)
    want = hash_codes_reference(x, *weights)
    assert codes.shape == want.shape == (n, m, (bits + 31) // 32) and codes.dtype == torch.int32
    assert agree(codes, want, pre_sign(x, *weights), bits) == 0
    assert torch.equal(codes, want)


@pytest.mark.parametrize("variant", [
    dict(block_m=16),  # the tl.dot kernel (more than FEW_ROWS rows per head)
    dict(block_m=1),  # the broadcast-product kernel, one row a program
    dict(block_m=4, bk=32),
    dict(block_m=2, bk=32, prefetch_l2=False),  # on CUDA the others first ask L2 for the weights; these two do not
    dict(block_m=16, prefetch_l2=False),
])
@pytest.mark.parametrize("n,m,d,width,bits,depth", [
    (3, 5, 64, 64, 128, 2), (1, 37, 48, 24, 100, 1), (4, 33, 128, 128, 128, 2), (2, 7, 32, 0, 96, 0), (1, 18, 32, 16, 512, 1),
])
def test_kernel_variants_equal_the_reference(variant, n, m, d, width, bits, depth):
    weights = bank_weights(n, d, width, bits, depth, seed=n * 100 + m)
    x = torch.randn(n, m, d, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    codes = _hash_codes_triton(x, *weights, **variant)
    want = hash_codes_reference(x, *weights)
    assert agree(codes, want, pre_sign(x, *weights), bits) == 0
    assert torch.equal(codes, want)


def test_bf16_rows_and_a_strided_view():
    weights = bank_weights(2, 64, 32, 128, 2, seed=7)
    base = torch.randn(9, 2, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE).bfloat16()
    x = base.transpose(0, 1)  # [2, 9, 64], rows strided
    assert torch.equal(_hash_codes_triton(x, *weights), hash_codes_reference(x, *weights))


def step_inputs(b, hq, hkv, d, t, bits, seed, dtype=torch.float32):
    """A decode step's queries [B, Hq, 1, D] (a strided view, as the model's projection leaves them),
    the cache's keys [B, T, Hkv, D], uneven lengths (the new key at lengths - 1) and a code cache of
    random words (every word the step must not touch is checked against it)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, 1, hq, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    keys = torch.randn(b, t, hkv, d, generator=g).to(DEVICE, dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g).to(DEVICE)
    codes = torch.randint(-(2**31), 2**31 - 1, (b, hkv, t, (bits + 31) // 32), dtype=torch.int32, generator=g)
    return query, keys, lengths, codes.to(DEVICE)


@pytest.mark.parametrize("b,hq,hkv,d,t,bits,width,depth", [
    (3, 6, 2, 32, 11, 128, 16, 2),    # G = 3, odd lengths
    (1, 4, 4, 16, 5, 64, 0, 0),       # G = 1, batch 1, SimHash
    (2, 8, 1, 64, 9, 100, 24, 1),     # one KV head, bits not a multiple of 32
    (17, 9, 3, 64, 7, 128, 64, 2),    # 68 rows a head: the 16-row tl.dot kernel
    (6, 32, 8, 128, 13, 128, 128, 2),  # the Llama-3-8B step's shape at batch 6
])
def test_the_step_hash_reads_and_writes_the_cache_in_place(b, hq, hkv, d, t, bits, width, depth):
    """One launch hashes a step's queries and new keys from where they are and writes the keys' codes
    into the code cache: the same query codes as the torch path, the same cache after, no other word
    of the cache touched."""
    query, keys, lengths, codes = step_inputs(b, hq, hkv, d, t, bits, seed=b)
    weights = bank_weights(hkv, d, width, bits, depth, seed=5)
    got_cache, want_cache = codes.clone(), codes.clone()
    got = _step_hash_codes_triton(query, keys, lengths, got_cache, *weights)
    want = step_hash_codes_reference(query, keys, lengths, want_cache, *weights)
    assert got.shape == (b, hkv, hq // hkv, (bits + 31) // 32)
    assert torch.equal(got, want) and torch.equal(got_cache, want_cache)
    batch = torch.arange(b, device=DEVICE)
    touched = (got_cache != codes).any(-1)  # [B, Hkv, T]
    touched[batch, :, lengths - 1] = False
    assert not touched.any()  # only the new keys' slots changed
    # The reference is the hasher's torch pass over the concatenated rows, as before this op existed.
    rows = torch.cat([query.reshape(b, hkv, hq // hkv, d), keys[batch, lengths - 1][:, :, None]], dim=2)
    folded = hash_codes_reference(rows.transpose(0, 1).reshape(hkv, -1, d), *weights)
    assert torch.equal(want_cache[batch, :, lengths - 1], folded.reshape(hkv, b, -1, folded.shape[-1])[:, :, -1].transpose(0, 1))


def test_the_step_hash_takes_bf16_and_refuses_a_strided_last_dim():
    query, keys, lengths, codes = step_inputs(2, 4, 2, 32, 6, 64, seed=3, dtype=torch.bfloat16)
    weights = bank_weights(2, 32, 16, 64, 1, seed=1)
    mine, theirs = codes.clone(), codes.clone()
    got = _step_hash_codes_triton(query, keys, lengths, mine, *weights)
    assert torch.equal(got, step_hash_codes_reference(query, keys, lengths, theirs, *weights)) and torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="contiguous in their last dim"):
        _step_hash_codes_triton(query.transpose(2, 3), keys, lengths, codes, *weights)


@pytest.mark.parametrize("placement", ["shared", "asymmetric"])
def test_the_hashers_fused_step_equals_step_codes_and_the_write(monkeypatch, placement):
    geometry = ModelGeometry("llama", 3, 6, 2, 32, 10000.0, 1024)
    hasher = sa.MLPHasher(geometry, HasherConfig(bits=128, width=16, init_scale=0.5, placement=placement), layers=[1]).to(DEVICE)
    query, keys, lengths, codes = step_inputs(3, 6, 2, 32, 10, 128, seed=8)
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", True)
    mine = codes.clone()
    got = hasher.fused_step_codes(1, query, keys, lengths, mine)
    if placement == "asymmetric":  # two banks: no one-launch step; the caller hashes with step_codes
        assert got is None and torch.equal(mine, codes)
        return
    batch = torch.arange(3, device=DEVICE)
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", False)
    assert hasher.fused_step_codes(1, query, keys, lengths, codes.clone()) is None  # the kernel off: torch
    want, key_codes = hasher.step_codes(1, query, keys[batch, lengths - 1][:, :, None], grouped=True)
    theirs = codes.clone()
    theirs[batch, :, lengths - 1] = key_codes[:, :, 0]
    assert torch.equal(got, want) and torch.equal(mine, theirs)


def test_the_step_hash_op_writes_the_cache_in_place_when_compiled():
    """Inductor keeps the op's write in place: no copy of the code cache (a copy per layer per step
    would read and write the whole cache), and the caller's buffer holds the new codes after."""
    from torch._inductor.utils import run_and_get_code

    query, keys, lengths, codes = step_inputs(2, 4, 2, 16, 9, 64, seed=2)
    weights = bank_weights(2, 16, 8, 64, 1, seed=4)
    want_cache = codes.clone()
    want = step_hash_codes_reference(query, keys, lengths, want_cache, *weights)

    def step(q, k, n, c, *w):
        return ops.step_hash_codes_op(q * 1.0, k, n, c, *w, use_kernel=0) + 0

    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(step, fullgraph=True), query, keys, lengths, codes, *weights)
    torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(codes, want_cache)
    shape = str(tuple(codes.shape))
    assert not [line for line in "\n".join(code).splitlines() if "empty_strided" in line and shape in line]


def test_serves_only_what_it_keeps_in_registers():
    w = bank_weights(2, 64, 64, 128, 2, seed=0)
    assert serves(torch.zeros(2, 30, 64), w[0], w[4])
    assert not serves(torch.zeros(2, 300, 64), w[0], w[4])  # a prefill's rows: torch
    assert not serves(torch.zeros(2, 4, 256), None, torch.zeros(2, 256, 128))  # head dim 256
    assert not serves(torch.zeros(2, 4, 64), None, torch.zeros(2, 64, 128, dtype=torch.bfloat16))


@pytest.mark.parametrize("placement", ["shared", "asymmetric"])
def test_the_hasher_with_the_fused_kernel_gives_the_same_codes(monkeypatch, placement):
    geometry = ModelGeometry("llama", 3, 6, 2, 32, 10000.0, 1024)
    hasher = sa.MLPHasher(geometry, HasherConfig(bits=128, width=16, init_scale=0.5, placement=placement), layers=[1]).to(DEVICE)
    q, k = torch.randn(3, 6, 1, 32).to(DEVICE), torch.randn(3, 2, 1, 32).to(DEVICE)
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", False)
    want = hasher.step_codes(1, q, k), hasher.query_codes(1, q), hasher.key_codes(1, k)
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", True)
    got = hasher.step_codes(1, q, k), hasher.query_codes(1, q), hasher.key_codes(1, k)
    for a, b in zip(got, want):
        assert torch.equal(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)
    assert torch.equal(got[0][1], want[0][1])


def test_the_op_falls_back_once_and_says_so(monkeypatch, caplog):
    from spotlight_attn.kernels import hash as fused

    weights = bank_weights(2, 16, 8, 64, 1, seed=3)
    x = torch.randn(2, 3, 16).to(DEVICE)
    monkeypatch.setattr(ops, "_use", lambda tensors, use_kernel: True)
    monkeypatch.setattr(ops, "_FUSED_HASH_FAILED", [])

    def broken(*args):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(fused, "_hash_codes_triton", broken)
    with caplog.at_level("WARNING"):
        codes = ops.hash_codes_op(x, *weights)
    assert torch.equal(codes, hash_codes_reference(x, *weights)) and "fused hash kernel failed" in caplog.text
    assert ops._FUSED_HASH_FAILED and torch.equal(ops.hash_codes_op(x, *weights), codes)  # torch from now on


def test_static_generate_with_the_fused_kernel_equals_without(monkeypatch):
    """A decode step through the static cache hashes its query and key with the fused kernel (forced
    here, interpreter on the CPU): the same tokens as the torch hash."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_model

    model = tiny_model("llama", 4, 2, 16, layers=3, seed=2).to(DEVICE)
    geometry = ModelGeometry.from_model(model)
    hasher = sa.MLPHasher(geometry, HasherConfig(bits=64, width=16, init_scale=0.3), layers=[1, 2], seed=1).to(DEVICE)
    sa.enable(model, hasher, SpotlightConfig(method="spotlight", budget=0.3, bits=64, min_tokens=2, sink=1, window=1,
                                             dense_layers=(0,), cache="static"))
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def run():
        return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)

    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", False)
    want = run()
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", True)
    assert torch.equal(run(), want)
    sa.disable(model)


def test_the_op_traces_with_fullgraph(monkeypatch):
    """torch.compile takes the fused hash whole (its fake implementation gives the output's shape)."""
    geometry = ModelGeometry("llama", 2, 4, 2, 16, 10000.0, 1024)
    hasher = sa.MLPHasher(geometry, HasherConfig(bits=64, width=16, init_scale=0.5), layers=[0]).to(DEVICE)
    q, k = torch.randn(2, 4, 1, 16).to(DEVICE), torch.randn(2, 2, 1, 16).to(DEVICE)
    monkeypatch.setattr(hasher_module, "FUSED_KERNEL", True)
    want = hasher.step_codes(0, q, k)
    torch._dynamo.reset()
    got = torch.compile(lambda a, b: hasher.step_codes(0, a, b), fullgraph=True, backend="aot_eager")(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch._dynamo.reset()


@pytest.mark.parametrize("env,want", [(None, "None fused kernel torch"), ("0", "False torch torch"), ("1", "None fused kernel torch")])
def test_the_fused_kernel_is_on_for_cuda_by_default_and_the_environment_turns_it_off(env, want):
    import subprocess
    import sys

    code = ("from spotlight_attn.hashing import hasher as h; "
            "print(h.FUSED_KERNEL, h.hash_path('cuda'), h.hash_path('cpu'))")
    environ = {k: v for k, v in os.environ.items() if k != "SPOTLIGHT_FUSED_HASH"}
    if env is not None:
        environ["SPOTLIGHT_FUSED_HASH"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
