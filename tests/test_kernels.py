"""Each Triton kernel against its torch reference, on fresh random inputs over awkward shapes.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set below before this
module imports Triton, and the calls pass use_kernel=True with CPU tensors. With a GPU the same small
cases run compiled on CUDA, and the `gpu`-marked tests add full-size inputs.

- pack, score_select: integer results, so they must equal the reference exactly. score_select's
  ties are broken deterministically (the more recent key wins), so the selected set is unique.
- sparse_decode: float results. The error is ||out - ref|| / ||ref|| against a float64 reference;
  the kernel may be at most 2x the error of torch doing the same math in the input dtype, plus 3e-6
  for float32: the kernel's exp2 (ex2.approx, 2 ulp) of logits near 10 is off by ~1e-6 relative, where
  torch's float32 error is ~1e-7; in fp16 / bf16 (1e-4 / 1e-3) that floor does not matter.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` of this module
pytest.importorskip("triton")

from spotlight_attn.config import Budget  # noqa: E402
from spotlight_attn.kernels import _triton  # noqa: E402
from spotlight_attn.kernels.pack import pack_signs, pack_signs_reference  # noqa: E402
from spotlight_attn.kernels.score_select import (  # noqa: E402
    GUESS_SMOOTH,
    GUESS_START,
    _score_select_triton,
    new_guess,
    plan_select,
    score_select,
    score_select_reference,
    shifted_scores,
)
from spotlight_attn.kernels.sparse_decode import (  # noqa: E402
    _sparse_decode_triton,
    sparse_decode,
    sparse_decode_reference,
)

DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def poison_allocator():
    """Leave NaN garbage in the CUDA caching allocator, so unwritten outputs show up."""
    if CUDA:
        torch.full((64 << 20,), float("nan"), device=DEVICE)


def random_codes(shape, bits, generator, patterns=None):
    """Packed codes [..., W] of random signs; with `patterns`, drawn from that many distinct codes (ties)."""
    if patterns is None:
        return pack_signs_reference(torch.rand(*shape, bits, generator=generator) - 0.5)
    pool = pack_signs_reference(torch.rand(patterns, bits, generator=generator) - 0.5)
    return pool[torch.randint(0, patterns, shape, generator=generator)]


def key_valid_for(b, t, padding):
    """[B, T] bool: 'none', 'left' (mixed lengths, one row with 1 key, one with none), or 'right'."""
    valid = torch.ones(b, t, dtype=torch.bool)
    if padding == "left":
        for i in range(1, b):
            valid[i, : [t // 3, t - 1, t][(i - 1) % 3]] = False
    elif padding == "right":
        for i in range(1, b):
            valid[i, t - t // (i + 1) :] = False
    return valid


# ---------------------------------------------------------------- pack


@pytest.mark.parametrize("bits", [1, 31, 32, 33, 100, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pack_matches_reference(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    for shape in [(3, 5), (1,), (0, 2), (37,)]:
        hashed = torch.randn(*shape, bits, generator=g).to(dtype)
        hashed.view(-1)[:3] = 0.0  # zero packs to 0, like the reference's `> 0`
        expected = pack_signs_reference(hashed)
        poison_allocator()
        got = pack_signs(hashed.to(DEVICE), use_kernel=True).cpu()
        assert got.dtype == torch.int32 and torch.equal(got, expected)


# ---------------------------------------------------------------- score_select

BUDGETS = [
    Budget(1, 0, 0, 0),  # one token
    Budget(0.02, 20, 4, 16),  # the default: 2% with sinks and a window
    Budget(0.1, 3, 1, 2),
    Budget(0.5, 0, 0, 0),
    Budget(1.0, 0, 0, 0),  # everything
    Budget(0.0, 0, 2, 3),  # only the forced sink + window
    Budget(0.0, 0, 0, 0),  # nothing
]

# (batch, kv heads, group, bits, length, padding)
SHAPES = [
    (1, 1, 1, 32, 1, "none"),
    (1, 2, 3, 64, 97, "none"),
    (2, 2, 4, 128, 97, "right"),
    (4, 1, 8, 27, 1025, "left"),  # 27 bits: a partial word
    (4, 2, 4, 128, 1025, "left"),
    (1, 3, 3, 100, 1025, "none"),  # smollm2-like group, 100 bits
    (2, 2, 1, 64, 33, "left"),
    (1, 2, 8, 128, 200, "none"),  # 16 fine levels: both halves of the packed counter
    (1, 1, 9, 128, 300, "left"),  # 32 fine levels: the tl.histogram refine path
]


def check_select(b, hkv, group, bits, t, padding, budget, seed, patterns=None, **launch):
    g = torch.Generator().manual_seed(seed)
    q = random_codes((b, hkv * group, 1), bits, g)
    k = random_codes((b, hkv, t), bits, g, patterns)
    valid = key_valid_for(b, t, padding)
    expected = score_select_reference(q, k, valid, budget, bits)
    poison_allocator()
    q, k, valid = q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE)
    if launch:
        got = _score_select_triton(q, k, plan_select(valid, budget, hkv), bits, **launch).cpu()
    else:
        got = score_select(q, k, valid, budget, bits, use_kernel=True).cpu()
    assert got.shape == expected.shape and got.dtype == torch.int64
    assert torch.equal(got, expected), f"first mismatch rows: {(got != expected).any(-1).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_score_select_matches_reference(shape, budget):
    check_select(*shape, budget, seed=hash((shape, str(budget))) % 10_000)


@pytest.mark.parametrize("shape", [(2, 2, 4, 128, 97, "right"), (4, 2, 4, 128, 1025, "left"), (1, 3, 3, 100, 1025, "none"),
                                   (2, 2, 1, 64, 33, "left"), (1, 1, 8, 128, 200, "none")], ids=lambda s: "-".join(map(str, s)))
def test_score_select_per_head_budgets(shape):
    """Head budgets (budgets.py): every (row, KV head) reads its own count from per-head bounds [B, Hkv, 3]."""
    hkv = shape[1]
    spread = tuple(float(f) for f in torch.linspace(0.0, 0.5, hkv).tolist())
    for n, budget in enumerate([Budget(0.1, 2, 1, 2, heads=spread), Budget(0.3, 0, 0, 0, heads=spread[::-1]),
                                Budget(0.02, 20, 4, 16, heads=(1.0,) * hkv)]):
        check_select(*shape, budget, seed=n + shape[4])
        check_select(*shape, budget, seed=n + shape[4], block_tokens=128, max_chunks=8)


@pytest.mark.parametrize("packed_coarse", [True, False])
@pytest.mark.parametrize("patterns", [1, 2, 5])
@pytest.mark.parametrize("budget", [Budget(0.3, 0, 3, 5), Budget(0.02, 1, 0, 0), Budget(1.0, 0, 0, 0)], ids=str)
def test_score_select_ties_across_chunks(patterns, budget, packed_coarse):
    """Keys drawn from a few codes tie massively; small blocks spread each row over many chunks, so
    the most-recent-first tie rule must hold across chunk boundaries, with pass 1's packed counts
    and with tl.histogram."""
    check_select(3, 2, 4, 64, 1025, "left", budget, seed=patterns, patterns=patterns, block_tokens=128, max_chunks=8,
                 packed_coarse=packed_coarse)


@pytest.mark.parametrize("shape", [(2, 2, 4, 128, 3001, "left"), (1, 3, 3, 100, 2500, "none"), (2, 1, 1, 64, 4097, "right"),
                                   (1, 2, 2, 32, 1500, "left")], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("budget", [Budget(0.02, 20, 4, 16), Budget(0.1, 3, 1, 2), Budget(0.0, 0, 2, 3)], ids=str)
@pytest.mark.parametrize("block_tokens", [64, 256])  # chunks of 16-65 blocks (8-bit fields) and 6-17 (4-bit)
def test_score_select_packed_counts_equal_histogram(shape, budget, block_tokens):
    """Pass 1 counts in packed 8-bit fields instead of tl.histogram, pass 2 in 4-bit fields of an int64
    where a chunk has at most 15 blocks, else 8-bit: the same picks as the reference either way."""
    for packed, nibbles in ((True, True), (True, False), (False, False)):
        check_select(*shape, budget, seed=len(shape[5]) + shape[3], block_tokens=block_tokens, max_chunks=3,
                     packed_coarse=packed, nibbles=nibbles)


def test_score_select_single_chunk_and_many_chunks_agree():
    for chunks in (1, 3, 64):
        check_select(2, 2, 3, 96, 2000, "left", Budget(0.05, 4, 2, 8), seed=7, block_tokens=128, max_chunks=chunks)


@pytest.mark.parametrize("group, bits", [(4, 128), (2, 64), (1, 100), (3, 96)])
@pytest.mark.parametrize("block_tokens", [64, 256])
def test_score_select_counts_the_top_buckets(group, bits, block_tokens):
    """Keys that agree with the query in all but 0-40 bits (some exactly): scores fill the top
    buckets, up to the highest possible one, which random codes never reach; every packed
    counter's last fields must count."""
    g = torch.Generator().manual_seed(group * bits + block_tokens)
    b, hkv, t = 2, 2, 2500
    signs = torch.rand(b, hkv, 1, 1, bits, generator=g) - 0.5
    q = pack_signs_reference(signs.expand(b, hkv, group, 1, bits).reshape(b, hkv * group, 1, bits))
    flips = torch.rand(b, hkv, t, bits, generator=g) < torch.randint(0, 41, (b, hkv, t, 1), generator=g) / bits
    k = pack_signs_reference(torch.where(flips, -signs.squeeze(2), signs.squeeze(2)).expand(b, hkv, t, bits))
    valid = key_valid_for(b, t, "left")
    for budget in (Budget(0.02, 20, 4, 16), Budget(0.3, 0, 0, 0), Budget(0.001, 0, 0, 0)):
        expected = score_select_reference(q, k, valid, budget, bits)
        for packed, nibbles in ((True, True), (True, False), (False, False)):
            got = _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan_select(valid.to(DEVICE), budget), bits,
                                       block_tokens=block_tokens, packed_coarse=packed, nibbles=nibbles).cpu()
            assert torch.equal(got, expected), (str(budget), packed, nibbles)


@pytest.mark.parametrize("b, hkv, group", [(1, 2, 1), (3, 2, 4), (2, 1, 3)])
def test_score_select_reads_grouped_query_codes_in_place(b, hkv, group):
    """Query codes as one hash pass leaves them (hasher.step_codes(grouped=True)): [B, Hkv, G, W], a
    strided view of a [B, Hkv, G + 1, W] buffer whose last row is the new key's. Same picks as the
    per-head [B, Hq, 1, W] codes, through the kernel and through the op's reference."""
    g = torch.Generator().manual_seed(group)
    bits, t, budget = 96, 777, Budget(0.05, 3, 2, 5)
    both = random_codes((b, hkv, group + 1), bits, g)  # [B, Hkv, G + 1, W]
    grouped = both[:, :, :group]
    per_head = grouped.reshape(b, hkv * group, 1, -1)
    k = random_codes((b, hkv, t), bits, g)
    valid = key_valid_for(b, t, "left")
    expected = score_select_reference(per_head, k, valid, budget, bits)
    assert torch.equal(score_select_reference(grouped, k, valid, budget, bits), expected)
    plan = plan_select(valid.to(DEVICE), budget)
    got = _score_select_triton(grouped.to(DEVICE), k.to(DEVICE), plan, bits, block_tokens=128, max_chunks=4).cpu()
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="fit neither"):
        score_select_reference(random_codes((b, hkv + 1, 2), bits, g), k, valid, budget, bits)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the fused passes run on a GPU only (programs wait for each other)")
@pytest.mark.parametrize("launch", [dict(), dict(block_tokens=128, max_chunks=64), dict(emit_tokens=4096, emit_warps=4),
                                    dict(packed_coarse=False, asm_store=False), dict(nibbles=False),
                                    dict(block_tokens=512)])
def test_score_select_fused_passes_equal_separate_passes(launch, monkeypatch):
    from spotlight_attn.kernels import score_select as select_module

    _triton.bind(vars(select_module))  # jit the kernels before any is replaced below

    class Unlaunched:  # stands in for the separate passes' kernels: the fused launches must not need them
        def __getitem__(self, grid):
            raise AssertionError("a separate pass ran")

    g = torch.Generator().manual_seed(3)
    b, hkv, group, bits, t = 3, 2, 4, 128, 70001
    q = random_codes((b, hkv * group, 1), bits, g)
    k = random_codes((b, hkv, t), bits, g, patterns=40)  # heavy ties across chunks
    valid = key_valid_for(b, t, "left")
    for budget in (Budget(0.02, 20, 4, 16), Budget(0.3, 0, 0, 0), Budget(1.0, 0, 0, 0)):
        expected = score_select_reference(q, k, valid, budget, bits)
        plan = plan_select(valid.to(DEVICE), budget)
        th, m, s = shifted_thresholds(q, k, valid, budget, bits)
        for offset in (None, "start", 0, 9, -60):  # no guess; the start value; exact bin, a band, the recount
            for fuse, replaced in (("all", ("_score_kernel", "_recount_kernel", "_refine_kernel", "_emit_kernel")),
                                   ("tail", ("_recount_kernel", "_refine_kernel", "_emit_kernel")), ("none", ())):
                guess = None if offset is None else new_guess(b, hkv, DEVICE)
                if isinstance(offset, int):
                    guess = torch.where(th.isnan(), GUESS_START, (th + offset - m) / s).to(DEVICE)
                with monkeypatch.context() as patch:
                    for name in replaced:
                        patch.setattr(select_module, name, Unlaunched())
                    got = _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan, bits, fuse=fuse, guess=guess, **launch)
                assert torch.equal(got.cpu(), expected), (fuse, offset)


def shifted_thresholds(q, k, valid, budget, bits):
    """The kernel's view of each row, in torch: threshold x (the k-th best shifted score of the keys
    picked by score; NaN where none is), and the spread terms m, s of the prediction -> [B, Hkv] each."""
    b, hkv, t = k.shape[:3]
    x, m, s = shifted_scores(q, k, bits)  # [B, Hkv, T], [B, Hkv] x 2
    pos = torch.arange(t)
    th = torch.full((b, hkv), float("nan"))
    for row in range(b):
        n = int(valid[row].sum())
        lo = int(valid[row].int().argmax()) if n else 0
        forced = (pos >= lo) & (pos < lo + n) & ((pos < lo + budget.sink) | (pos >= lo + n - budget.window))
        candidate = valid[row] & ~forced
        for h in range(hkv):
            need = budget.tokens_for(n, h if budget.heads else None) - int(forced.sum())
            if need > 0:
                th[row, h] = x[row, h][candidate].topk(need).values[-1].float()
    return th, m, s


@pytest.mark.parametrize("group", [1, 3, 4])
def test_shifted_scores_rank_as_hamming_scores(group):
    """hamming = (a row's constant) + 2^PAR x: the kernels' unit keeps the reference's order and ties."""
    from spotlight_attn.kernels.score_select import hamming_scores

    g = torch.Generator().manual_seed(group)
    q, k = random_codes((2, 2 * group, 1), 100, g), random_codes((2, 2, 57), 100, g)
    x, _, _ = shifted_scores(q, k, 100)
    rest = hamming_scores(q, k, 100) - x * (2 if group % 2 == 0 else 1)
    assert x.dtype == torch.int32 and torch.equal(rest, rest[..., :1].expand_as(rest))


# (batch, kv heads, group, bits, length, padding, key patterns): odd lengths, GQA groups 1 to 8, ties
GUESS_SHAPES = [
    (2, 2, 4, 128, 1025, "left", None),
    (1, 3, 3, 100, 700, "none", None),
    (3, 1, 1, 64, 513, "right", None),
    (1, 2, 8, 128, 900, "none", 12),  # heavy ties inside the threshold's bin
]


@pytest.mark.parametrize("bins", ["bands", "exact"])
@pytest.mark.parametrize("budget", [Budget(0.05, 0, 2, 4), Budget(0.3, 0, 1, 2)], ids=str)
@pytest.mark.parametrize("shape", GUESS_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_score_select_guess_gives_the_same_picks_whatever_it_predicts(shape, budget, bins):
    """Predictions that land the threshold in an exact bin (pass 1 settles it), in each band (pass 2
    counts inside it) and past the bands (the recount), and the start value: the reference's picks every
    time, and each row's residual moved GUESS_SMOOTH of the way to (threshold - m) / s (a fresh row's
    set to it)."""
    b, hkv, group, bits, t, padding, patterns = shape
    g = torch.Generator().manual_seed(t)
    q = random_codes((b, hkv * group, 1), bits, g)
    k = random_codes((b, hkv, t), bits, g, patterns)
    valid = key_valid_for(b, t, padding)
    expected = score_select_reference(q, k, valid, budget, bits)
    th, m, s = shifted_thresholds(q, k, valid, budget, bits)
    picked = ~th.isnan()
    assert picked.any()
    plan = plan_select(valid.to(DEVICE), budget, hkv)
    for offset in (0, 1, -4, 6, -11, 25, -40, 90, -90, None):
        if offset is None:
            guess = new_guess(b, hkv, DEVICE)
        else:
            guess = torch.where(picked, (th + offset - m) / s, GUESS_START).to(DEVICE)
        launch = dict(block_tokens=64, max_chunks=4) if not CUDA else {}
        before = guess.cpu().clone()
        got = _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan, bits, guess=guess, guess_bins=bins, **launch)
        assert torch.equal(got.cpu(), expected), offset
        step = (th - m) / s
        kept = torch.where(before.isnan(), step, before + GUESS_SMOOTH * (step - before))  # a running mean
        kept = torch.where(picked, kept, before)
        assert torch.allclose(guess.cpu(), kept, atol=1e-5, rtol=1e-5, equal_nan=True), offset


@pytest.mark.parametrize("budget", [Budget(0.0, 0, 0, 0), Budget(1, 0, 0, 0), Budget(1.0, 0, 0, 0), Budget(0.0, 0, 2, 3)],
                         ids=str)
def test_score_select_guess_at_the_budget_edges(budget):
    g = torch.Generator().manual_seed(5)
    b, hkv, group, bits, t = 2, 2, 3, 64, 97
    q = random_codes((b, hkv * group, 1), bits, g)
    k = random_codes((b, hkv, t), bits, g)
    valid = key_valid_for(b, t, "left")
    guess = new_guess(b, hkv, DEVICE)
    for _ in range(2):  # the second step starts from what the first left
        got = _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan_select(valid.to(DEVICE), budget, hkv), bits,
                                   guess=guess, block_tokens=32, max_chunks=3)
        assert torch.equal(got.cpu(), score_select_reference(q, k, valid, budget, bits))


def test_score_select_guess_per_head_budgets_and_bad_buffers():
    g = torch.Generator().manual_seed(6)
    b, hkv, group, bits, t = 2, 3, 2, 64, 301
    q = random_codes((b, hkv * group, 1), bits, g)
    k = random_codes((b, hkv, t), bits, g)
    valid = key_valid_for(b, t, "right")
    budget = Budget(0.1, 0, 1, 4, heads=(0.02, 0.3, 0.1))
    guess = new_guess(b, hkv, DEVICE)
    plan = plan_select(valid.to(DEVICE), budget, hkv)
    for _ in range(2):
        got = _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan, bits, guess=guess, block_tokens=64, max_chunks=4)
        assert torch.equal(got.cpu(), score_select_reference(q, k, valid, budget, bits))
    for bad in (torch.zeros(b, hkv + 1), torch.zeros(b, hkv, dtype=torch.float64), torch.zeros(hkv, b).t()):
        with pytest.raises(ValueError, match="guess must be"):
            _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan, bits, guess=bad.to(DEVICE))
    with pytest.raises(ValueError, match="guess_bins must be"):
        _score_select_triton(q.to(DEVICE), k.to(DEVICE), plan, bits, guess=guess, guess_bins="wide")


@pytest.mark.parametrize("setting,bins", [("exact", "exact"), ("1", "bands"), ("0", None), ("wide", "error")])
def test_select_guess_setting_from_the_environment(setting, bins):
    import subprocess
    import sys

    probe = "from spotlight_attn.kernels import score_select as s; print(s.GUESS_IN_CACHE and s.GUESS_BINS_IN_CACHE)"
    env = dict(os.environ, SPOTLIGHT_SELECT_GUESS=setting)
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if bins == "error":
        assert run.returncode != 0 and "SPOTLIGHT_SELECT_GUESS must be bands, exact or 0, not 'wide'" in run.stderr
    else:
        assert run.returncode == 0 and run.stdout.strip() == str(bins or False)


def test_score_select_falls_back_when_valid_keys_have_holes():
    g = torch.Generator().manual_seed(0)
    q, k = random_codes((2, 4, 1), 64, g), random_codes((2, 2, 50), 64, g)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 10:20] = False  # a hole: not one [start, end) run
    budget = Budget(0.2, 0, 1, 1)
    assert not plan_select(valid, budget).contiguous
    got = score_select(q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), budget, 64, use_kernel=True).cpu()
    assert torch.equal(got, score_select_reference(q, k, valid, budget, 64))


def test_score_select_plan_is_reused_and_checked():
    g = torch.Generator().manual_seed(1)
    q, k = random_codes((2, 4, 1), 64, g), random_codes((2, 2, 300), 64, g)
    valid = key_valid_for(2, 300, "left")
    budget = Budget(0.1, 2, 1, 1)
    plan = plan_select(valid.to(DEVICE), budget)
    assert plan.k_rows == (30, 20) and plan.k == 30
    for _ in range(2):  # the same plan serves every layer of a step
        got = score_select(q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), budget, 64, plan=plan, use_kernel=True)
        assert torch.equal(got.cpu(), score_select_reference(q, k, valid, budget, 64))
    with pytest.raises(ValueError, match="plan was built"):
        score_select(q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), Budget(0.2), 64, plan=plan, use_kernel=True)


# ---------------------------------------------------------------- sparse_decode


def attention_in_dtype(query, keys, values, indices, scaling):
    """What torch does in the input dtype (the yardstick for the kernel's error)."""
    b, hq, _, d = query.shape
    hkv, k = keys.shape[1], indices.shape[-1]
    used = indices >= 0
    rows = indices.clamp(min=0)[..., None].expand(b, hkv, k, d)
    q = query.reshape(b, hkv, hq // hkv, d)
    logits = (q @ keys.gather(2, rows).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~used[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ values.gather(2, rows)).reshape(b, hq, 1, d)


def random_indices(b, hkv, t, k, generator, holes=False):
    """[B, Hkv, k] int64 of distinct positions (ascending), -1 past each row's share; with holes, -1s and
    out-of-order slots anywhere and one row with nothing selected."""
    idx = torch.full((b, hkv, k), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(hkv):
            n = min(k, t) if not holes else int(torch.randint(0, min(k, t) + 1, (1,), generator=generator))
            idx[i, j, :n] = torch.randperm(t, generator=generator)[:n].sort().values
    if holes and k > 1:
        idx = idx[..., torch.randperm(k, generator=generator)]
        idx[-1, -1] = -1
    return idx


def check_decode(b, hkv, group, d, t, k, dtype, seed, holes=False, **launch):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hkv * group, 1, d, generator=g)
    keys = torch.randn(b, hkv, t, d, generator=g) * 2  # peaky softmax
    values = torch.randn(b, hkv, t, d, generator=g)
    indices = random_indices(b, hkv, t, k, g, holes)
    scaling = d**-0.5
    q, kk, v = (x.to(dtype) for x in (query, keys, values))
    exact = attention_in_dtype(q.double(), kk.double(), v.double(), indices, scaling)
    assert torch.allclose(sparse_decode_reference(q, kk, v, indices, scaling).double(), exact, atol=2e-2, rtol=0)
    same_dtype = attention_in_dtype(q, kk, v, indices, scaling)
    poison_allocator()
    args = [x.to(DEVICE) for x in (q, kk, v, indices)]
    if launch:
        out = _sparse_decode_triton(*args, scaling, **launch).cpu()
    else:
        out = sparse_decode(*args, scaling, use_kernel=True).cpu()
    assert out.dtype == dtype and out.shape == query.shape and torch.isfinite(out).all()
    empty = ~(indices >= 0).any(-1)  # [B, Hkv]: rows with nothing selected must be exactly zero
    assert (out.reshape(b, hkv, group, d)[empty] == 0).all()
    norm = exact.norm()
    if norm == 0:
        return
    err = ((out.double() - exact).norm() / norm).item()
    err_torch = ((same_dtype.double() - exact).norm() / norm).item()
    assert err <= 2 * err_torch + 3e-6, f"kernel error {err:.2e} vs torch {dtype} error {err_torch:.2e}"


# (batch, kv heads, group, head dim, length, slots)
DECODE_SHAPES = [
    (1, 1, 1, 64, 1, 1),
    (2, 2, 4, 128, 97, 10),
    (2, 3, 3, 64, 1025, 300),
    (1, 2, 8, 128, 1025, 64),
    (3, 1, 1, 128, 97, 97),
    (2, 1, 4, 64, 33, 40),  # more slots than keys: -1 tails
    (1, 2, 4, 80, 60, 17),  # a head dim that is not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_sparse_decode_matches_reference(shape, dtype):
    check_decode(*shape, dtype, seed=sum(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparse_decode_holes_and_many_splits(dtype):
    """-1 slots anywhere, unsorted slots, an empty row, and 16-slot splits merged by the last split."""
    check_decode(2, 2, 4, 64, 500, 200, dtype, seed=3, holes=True, block_n=16, split_len=16)
    check_decode(2, 2, 3, 128, 500, 200, dtype, seed=4, holes=True)


def test_sparse_decode_nothing_selected():
    q = torch.randn(1, 2, 1, 64)
    kv = torch.randn(1, 1, 10, 64)
    for k in (0, 5):
        idx = torch.full((1, 1, k), -1, dtype=torch.int64)
        out = sparse_decode(*(x.to(DEVICE) for x in (q, kv, kv, idx)), 0.125, use_kernel=True)
        assert out.shape == q.shape and (out == 0).all()


# ---------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    assert not _triton.use_kernel((cpu,))  # CPU tensors: the reference unless asked
    assert not _triton.use_kernel((cpu,), use_kernel=True, force_reference=True)
    if CUDA:
        cuda = cpu.to(DEVICE)
        assert _triton.use_kernel((cuda,))
        assert not _triton.use_kernel((cuda, cpu))
        monkeypatch.setenv(_triton.FORCE_REFERENCE_ENV, "1")
        assert not _triton.use_kernel((cuda,))


def test_force_reference_takes_the_reference(monkeypatch):
    called = []
    monkeypatch.setattr("spotlight_attn.kernels.score_select._score_select_triton", lambda *a, **k: called.append(1))
    g = torch.Generator().manual_seed(2)
    q, k = random_codes((1, 2, 1), 32, g).to(DEVICE), random_codes((1, 1, 20), 32, g).to(DEVICE)
    valid = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    score_select(q, k, valid, Budget(0.5), 32, use_kernel=True, force_reference=True)
    monkeypatch.setenv(_triton.FORCE_REFERENCE_ENV, "1")
    score_select(q, k, valid, Budget(0.5), 32, use_kernel=True)
    assert not called


# ---------------------------------------------------------------- full size (GPU)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("geometry", [(8, 4, 128), (3, 3, 128)], ids=["llama3-8b", "smollm2"])
def test_score_select_full_size(geometry):
    hkv, group, bits = geometry
    check_select(3, hkv, group, bits, 131_072 + 17, "left", Budget(0.02, 20, 4, 16), seed=11)
    check_select(1, hkv, group, bits, 524_288, "none", Budget(0.1, 20, 4, 16), seed=12, patterns=64)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(8, 4, 128), (3, 3, 64)], ids=["llama3-8b", "smollm2"])
def test_sparse_decode_full_size(geometry, dtype):
    hkv, group, d = geometry
    check_decode(2, hkv, group, d, 65_536, 1311, dtype, seed=13)
    check_decode(1, hkv, group, d, 65_536, 4096, dtype, seed=14, holes=True)
