"""The skinny decode GEMM (kernels/linear.py) against an fp32 reference.

Without a GPU it runs in Triton's CPU interpreter. The kernel accumulates in fp32 and rounds once,
so its error against the fp32 product may be at most about twice that of torch's own 16-bit
F.linear (which also accumulates in fp32 and rounds once).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` of this module
pytest.importorskip("triton")

from spotlight_attn.kernels.linear import (  # noqa: E402
    _skinny_linear_triton, plan_skinny, skinny_linear_reference, skinny_serves,
)

DEVICE = "cuda" if CUDA else "cpu"


def inputs(m, n, k, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def check(out, x, w, b):
    exact = x.float() @ w.float().T + (b.float() if b is not None else 0)
    torch_err = (skinny_linear_reference(x, w, b).float() - exact).abs().max().item()
    err = (out.float() - exact).abs().max().item()
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


@pytest.mark.parametrize(
    "m, n, k, split, block_n, bias, dtype",
    [
        (1, 16, 128, 1, 16, False, torch.bfloat16),  # one tile, one split
        (3, 40, 136, 2, 16, True, torch.bfloat16),  # odd rows, N and K off the tiles, bias
        (6, 64, 512, 4, 16, False, torch.float16),  # the decode batch of the benchmarks, 4 splits
        (16, 48, 256, 2, 32, True, torch.bfloat16),  # the most rows, tiles of 32
        (5, 24, 264, 3, 16, False, torch.bfloat16),  # a split count that does not divide K's blocks
    ],
)
def test_skinny_matches_fp32(m, n, k, split, block_n, bias, dtype):
    x, w, b = inputs(m, n, k, dtype, seed=m * 7 + n, bias=bias)
    out = _skinny_linear_triton(x, w, b, block_n=block_n, block_k=64 if k % 64 == 0 else 32, split=split)
    check(out, x, w, b)


def test_skinny_splits_agree_and_counters_return_to_zero():
    from spotlight_attn.kernels import _triton

    x, w, _ = inputs(4, 32, 512, torch.bfloat16, seed=1, bias=False)
    one = _skinny_linear_triton(x, w, block_n=16, block_k=64, split=1)
    for split in (2, 4, 8):
        out = _skinny_linear_triton(x, w, block_n=16, block_k=64, split=split)
        assert (out.float() - one.float()).abs().max().item() <= 2e-2
    if CUDA:  # the ring is shared: every launch must leave its counters at zero
        ring, _ = _triton._COUNTERS[torch.cuda.current_device()]
        assert int(ring.abs().sum()) == 0


def test_skinny_strided_rows():
    x, w, _ = inputs(6, 32, 128, torch.bfloat16, seed=2, bias=False)
    wide = torch.zeros(6, 256, dtype=x.dtype, device=DEVICE)
    wide[:, 64:192] = x
    view = wide[:, 64:192]  # row stride 256, last dim contiguous
    check(_skinny_linear_triton(view, w, block_n=16, block_k=64, split=2), x, w, None)


def test_serves_and_plan():
    x, w, _ = inputs(6, 32, 128, torch.bfloat16, seed=3, bias=False)
    assert skinny_serves(x, w)
    assert not skinny_serves(torch.zeros(17, 128, dtype=x.dtype, device=DEVICE), w)  # too many rows
    assert not skinny_serves(x.float(), w.float())  # fp32 would round through tf32
    assert not skinny_serves(x.half(), w)  # mixed dtypes
    assert not skinny_serves(x[:, :100], w[:, :100])  # K not a multiple of 8
    with pytest.raises(ValueError, match="16-bit float"):
        _skinny_linear_triton(x.float(), w.float())
    # every split a whole number of K blocks, and more splits only while the programs stay under the target
    for n, k in [(1024, 4096), (4096, 4096), (4096, 14336), (14336, 4096)]:
        bn, bk, split = plan_skinny(n, k, torch.device(DEVICE))
        assert (k // bk) % split == 0 and split >= 1 and bn in (16, 32)


def test_op_takes_the_kernel_where_asked_and_f_linear_elsewhere():
    from spotlight_attn.kernels import ops  # noqa: F401  (registers the op)

    x, w, b = inputs(6, 32, 128, torch.bfloat16, seed=4, bias=True)
    check(torch.ops.spotlight.skinny_linear(x, w, b, 1 if not CUDA else -1), x, w, b)
    wide = inputs(20, 32, 128, torch.bfloat16, seed=5, bias=False)  # more rows than the kernel takes
    out = torch.ops.spotlight.skinny_linear(wide[0], wide[1], None, -1)
    assert torch.equal(out, skinny_linear_reference(wide[0], wide[1]))


def test_fast_linear_swaps_shares_and_restores(make_tiny_model, monkeypatch):
    import torch.nn as nn

    from spotlight_attn.kernels import linear as linear_module

    import spotlight_attn as sa
    from spotlight_attn.decode_linear import DecodeLinear

    model = make_tiny_model(layers=3).to(torch.bfloat16)
    before = {name: p for name, p in model.named_parameters()}
    originals = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    hooked = model.model.layers[1].mlp.down_proj
    hooked.register_forward_hook(lambda *args: None)  # a hooked layer (e.g. an adapter's) stays as it is
    ids = torch.randint(4, 128, (2, 11))
    dense = sa.SpotlightConfig(method="dense", cache="dynamic")
    want = sa.enable(model, None, dense).generate(ids, max_new_tokens=4, do_sample=False).clone()
    sa.enable(model, None, sa.SpotlightConfig(method="dense", cache="dynamic", fast_linear=True))
    swapped = {name for name, m in model.named_modules() if isinstance(m, DecodeLinear)}
    assert swapped == {name for name in originals if name != "lm_head" and not name.endswith("layers.1.mlp.down_proj")}
    assert all(p is before[name] for name, p in model.named_parameters())  # the same Parameters: nothing copied
    assert set(model.state_dict()) == set(before)
    launches = []
    kernel = linear_module._skinny_linear_triton
    monkeypatch.setattr(linear_module, "_skinny_linear_triton", lambda *a, **k: launches.append(a[0].shape) or kernel(*a, **k))
    DecodeLinear.use_kernel = 1 if not CUDA else -1  # on the CPU, the interpreter runs the kernel
    try:
        got = model.generate(ids.to(model.device), max_new_tokens=4, do_sample=False)
    finally:
        DecodeLinear.use_kernel = -1
    # the prefill's 22 rows take F.linear; each of the 3 decode steps' 2 rows takes the kernel in every swapped layer
    assert len(launches) == 3 * len(swapped) and all(shape[0] == 2 for shape in launches)
    # bf16 products rounded once either way; greedy tokens of a random model may differ only where
    # two logits tie within that rounding, which these inputs do not reach
    assert torch.equal(got.cpu(), want.cpu())
    sa.disable(model)
    assert all(m is originals[name] for name, m in model.named_modules() if name in originals)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_fast_linear_must_be_a_bool():
    import spotlight_attn as sa
    from spotlight_attn.errors import SpotlightError

    with pytest.raises(SpotlightError, match="fast_linear"):
        sa.SpotlightConfig(fast_linear="yes")
