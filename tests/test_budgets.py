"""Head budgets (budgets.py): the allocation, the profile file, per-head selection on every path, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import spotlight_attn as sa
from spotlight_attn import compat
from conftest import hasher_for, padded_prompts, tiny_model
from spotlight_attn.budgets import (
    HeadBudgetProfile,
    hasher_digest,
    load_profile,
    save_profile,
    selector_key,
)
from spotlight_attn.cli.main import main
from spotlight_attn.config import Budget, SpotlightConfig
from spotlight_attn.errors import CheckpointError, HasherMismatchError, SpotlightError
from spotlight_attn.identity import model_identity
from spotlight_attn.kernels import ops
from spotlight_attn.kernels.score_select import device_head_tokens, plan_select, score_select_reference
from spotlight_attn.models import ModelGeometry
from spotlight_attn.selection.topk import select_topk

GRID = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64)


def random_curves(layers, heads, seed=0, dense=(0,)):
    """Increasing mass curves in [0, 1] on GRID, NaN on the `dense` layers."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(layers, heads, len(GRID), generator=g, dtype=torch.float64)
    mass = (steps.cumsum(-1) / (steps.sum(-1, keepdim=True) + torch.rand(layers, heads, 1, generator=g, dtype=torch.float64)))
    mass[list(dense)] = float("nan")
    return mass


def profile_for(model, config, hasher=None, seed=0, dense=(0,)):
    geo = ModelGeometry.from_model(model)
    return HeadBudgetProfile(GRID, random_curves(geo.num_layers, geo.num_kv_heads, seed, dense), geo.to_dict(),
                             selector_key(config, hasher), model_identity(model), {"data": "test"})


def hull_mass(profile, shares, layers):
    """Mass on the curves' concave hulls at these shares (what the allocation maximises)."""
    from spotlight_attn.budgets import _hull

    total = 0.0
    for row, layer in enumerate(layers):
        for h in range(shares.shape[1]):
            pts = _hull(profile.fractions.tolist(), profile.mass[layer, h].tolist())
            x = float(shares[row, h])
            for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
                if x1 <= x <= x2:
                    total += y1 + (x - x1) / (x2 - x1) * (y2 - y1)
                    break
    return total


@pytest.mark.parametrize("budget", [0.02, 0.1, 0.3, 0.0, 1.0])
def test_allocation_keeps_the_mean_and_bounds_and_beats_every_other_split(budget):
    model = tiny_model("llama", 4, 2, 16, layers=3)
    profile = profile_for(model, SpotlightConfig(method="linear"), seed=int(budget * 100))
    layers = [1, 2]
    shares = profile.allocate(budget, layers, floor=0.25, cap=4.0)
    assert shares.shape == (2, 2)
    assert float(shares.mean()) == pytest.approx(budget, abs=1e-12)
    assert bool((shares >= 0.25 * budget - 1e-12).all()) and bool((shares <= min(1.0, 4 * budget) + 1e-12).all())
    best = hull_mass(profile, shares, layers)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):  # random feasible splits never recover more (on the hulls)
        other = torch.rand(2, 2, generator=g, dtype=torch.float64)
        other = 0.25 * budget + other / other.sum() * (budget - 0.25 * budget) * 4
        if bool((other <= min(1.0, 4 * budget)).all()):
            assert hull_mass(profile, other, layers) <= best + 1e-9
    assert hull_mass(profile, torch.full_like(shares, budget), layers) <= best + 1e-9


def test_allocation_favours_diffuse_heads_and_splits_equal_curves_evenly():
    model = tiny_model("llama", 4, 2, 16, layers=3)
    profile = profile_for(model, SpotlightConfig(method="linear"))
    profile.mass[1:, 0] = torch.tensor([0.8, 0.9, 0.95, 0.99], dtype=torch.float64)  # concentrated
    profile.mass[1:, 1] = torch.tensor([0.1, 0.2, 0.4, 0.7], dtype=torch.float64)  # diffuse
    shares = profile.allocate(0.2, [1, 2])
    assert torch.allclose(shares[:, 0], torch.full((2,), 0.1, dtype=torch.float64))
    assert torch.allclose(shares[:, 1], torch.full((2,), 0.3, dtype=torch.float64))
    with pytest.raises(SpotlightError, match="no curves for layers \\[0\\]"):
        profile.allocate(0.2, [0, 1])
    with pytest.raises(SpotlightError, match="fractional budget"):
        profile.allocate(5, [1])


def test_profile_file_round_trips_and_bad_files_are_refused(tmp_path):
    model = tiny_model("llama", 4, 2, 16, layers=3)
    profile = profile_for(model, SpotlightConfig(method="linear", bits=32))
    path = save_profile(profile, tmp_path / "p.safetensors")
    back = load_profile(path)
    assert torch.equal(back.fractions, profile.fractions) and torch.equal(back.mass.nan_to_num(-1), profile.mass.nan_to_num(-1))
    assert back.selector == {"method": "linear", "bits": 32, "seed": 0} and back.calibration == {"data": "test"}
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="not found"):
        load_profile(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_profile(tmp_path / "junk.safetensors")
    save_file({"fractions": GRID}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a spotlight-attn head budget profile"):
        load_profile(tmp_path / "other.safetensors")
    meta = {"format": "spotlight-attn/head-budgets", "format_version": "1", "model": json.dumps(profile.model),
            "identity": "null", "selector": "{broken", "calibration": "{}"}
    save_file({"fractions": GRID, "mass": profile.mass}, str(tmp_path / "corrupt.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt 'selector'"):
        load_profile(tmp_path / "corrupt.safetensors")
    with pytest.raises(CheckpointError, match="ascend strictly"):
        HeadBudgetProfile(GRID.flip(0), profile.mass, profile.model, profile.selector)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # a write that fails leaves the old file whole
        save_profile(HeadBudgetProfile(GRID, profile.mass, {"bad": object()}, profile.selector), path)
    assert path.read_bytes() == before


def test_budget_heads_are_validated_and_count_per_head():
    budget = Budget(0.1, 2, 1, 2, heads=(0.05, 0.3))
    assert budget.head_tokens_for(100, 2) == [5, 30] and budget.tokens_for(100) == 30 and budget.tokens_for(100, 0) == 5
    assert budget.head_tokens_for(3, 2) == [3, 3]  # capped at the valid tokens, raised to the forced ones
    for bad in [(0.1, 1.5), (), (0.1, float("nan")), (1, 0.2)]:
        with pytest.raises(SpotlightError, match="per-head budgets"):
            Budget(0.1, heads=bad)
    with pytest.raises(SpotlightError, match="fractional budget"):
        Budget(5, heads=(0.1,))
    with pytest.raises(SpotlightError, match="for 2 KV heads, the layer 3"):
        budget.head_tokens_for(10, 3)
    n = torch.tensor([0, 1, 7, 100, 1001])
    fractions = torch.tensor([[0.05, 0.3], [0.5, 0.0]], dtype=torch.float64)
    got = device_head_tokens(n, fractions, budget)
    for layer in range(2):
        rule = Budget(0.1, 2, 1, 2, heads=tuple(fractions[layer].tolist()))
        assert got[layer].tolist() == [rule.head_tokens_for(int(v), 2) for v in n]


@pytest.mark.parametrize("b,hkv,t,padding", [(1, 1, 1, None), (2, 3, 97, "left"), (3, 2, 64, "right")])
def test_per_head_selection_is_each_heads_own_uniform_selection(b, hkv, t, padding):
    g = torch.Generator().manual_seed(t)
    scores = torch.randint(0, 6, (b, hkv, t), generator=g)  # many ties
    valid = torch.ones(b, t, dtype=torch.bool)
    if padding == "left":
        valid[1:, :9] = False
    elif padding == "right":
        valid[0, t - 5 :] = False
    heads = tuple(float(f) for f in torch.linspace(0.0, 1.0, hkv).tolist())
    budget = Budget(0.3, 2, 1, 2, heads=heads)
    got = select_topk(scores, valid, budget)
    for h in range(hkv):
        want = select_topk(scores[:, h : h + 1], valid, Budget(heads[h], 2, 1, 2))[:, 0]
        assert torch.equal(got[:, h, : want.shape[-1]], want) and (got[:, h, want.shape[-1] :] == -1).all()


def _codes(shape, g):
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("b,hq,hkv,t", [(1, 4, 4, 37), (3, 6, 2, 97), (2, 3, 1, 130)])
def test_score_select_with_per_head_bounds_equals_the_reference(b, hq, hkv, t):
    g = torch.Generator().manual_seed(b * t)
    q, codes = _codes((b, hq, 1, 2), g), _codes((b, hkv, t, 2), g) & 0x0F0F0F0F
    lengths = torch.tensor([t, t // 2, 1][:b])
    valid = torch.arange(t)[None, :] < lengths[:, None]
    heads = tuple(float(f) for f in torch.linspace(0.0, 0.6, hkv).tolist())
    budget = Budget(0.3, 2, 1, 2, heads=heads)
    want = score_select_reference(q, codes, valid, budget, 64)
    plan = plan_select(valid, budget, hkv)
    assert plan.bounds.shape == (b, hkv, 3) and plan.k == want.shape[-1]
    got = ops.score_select_op(q, codes, plan.bounds, plan.k, 64, budget.sink, budget.window, torch.empty(0), 0)
    assert torch.equal(got, want)
    torch.library.opcheck(ops.score_select_op, (q, codes, plan.bounds, plan.k, 64, budget.sink, budget.window, torch.empty(0), 0))
    # (the Triton kernels with per-head bounds: tests/test_kernels.py)
    with pytest.raises(ValueError, match="fractions for"):
        plan_select(valid, budget, hkv + 1)


@pytest.mark.parametrize("method", ["linear", "spotlight", "oracle"])
def test_generate_with_head_budgets_reads_each_heads_share_on_both_caches(tmp_path, method):
    model = tiny_model("llama", 4, 2, 16, layers=4, seed=1)
    hasher = hasher_for(model, method, bits=32)
    base = dict(method=method, budget=0.2, bits=32, dense_layers=(0, 1), min_tokens=2, sink=1, window=2)
    profile = profile_for(model, SpotlightConfig(**base), hasher, seed=3, dense=(0, 1))
    path = save_profile(profile, tmp_path / "heads.safetensors")
    shares = profile.allocate(0.2, [2, 3])
    assert not torch.allclose(shares, torch.full_like(shares, 0.2))  # the split is uneven
    ids, mask = padded_prompts(2, 40, (0, 9))
    runs = {}
    caches = ("dynamic", "static") if method != "oracle" else ("dynamic",)
    for cache in caches:
        sa.enable(model, hasher, SpotlightConfig(**base, cache=cache, head_budgets=str(path)))
        assert model.spotlight.budget_for(2).heads == tuple(shares[0].tolist())
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        runs[cache] = (out.sequences, sa.attention.read_fraction(compat.output_cache(out)))
    if len(runs) == 2:
        assert torch.equal(runs["dynamic"][0], runs["static"][0])
        assert runs["dynamic"][1] == pytest.approx(runs["static"][1])
    # keys read: the dense layers whole, each sparse (layer, head) its own share of every step's keys
    held = mask.sum(-1)[:, None] + torch.arange(5)[None, :]  # [B, steps]: keys held at each decode step
    held = held[:, 1:]  # the first new token comes from the prefill
    read = sum(
        Budget(0.2, 2, 1, 2, heads=tuple(shares[i].tolist())).head_tokens_for(int(n), 2)[h]
        for i in range(2) for h in range(2) for n in held.flatten()
    ) + 2 * 2 * int(held.sum())
    assert runs["dynamic"][1] == pytest.approx(read / (4 * 2 * int(held.sum())))
    sa.disable(model)


def test_enable_refuses_a_profile_of_another_hash_model_or_budget(tmp_path):
    model = tiny_model("llama", 4, 2, 16, layers=4, seed=1)
    hasher = hasher_for(model, "spotlight", bits=32)
    config = SpotlightConfig(method="spotlight", budget=0.2, dense_layers=(0, 1))
    path = save_profile(profile_for(model, config, hasher, dense=(0, 1)), tmp_path / "heads.safetensors")
    other = hasher_for(model, "spotlight", bits=32)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1.0)
    assert hasher_digest(other) != hasher_digest(hasher)
    with pytest.raises(HasherMismatchError, match="hasher sha256"):
        sa.enable(model, other, SpotlightConfig(method="spotlight", budget=0.2, dense_layers=(0, 1), head_budgets=str(path)))
    with pytest.raises(HasherMismatchError, match="measured the selection of spotlight"):
        sa.enable(model, None, SpotlightConfig(method="linear", budget=0.2, dense_layers=(0, 1), head_budgets=str(path)))
    with pytest.raises(SpotlightError, match="no curves for layers \\[1\\]"):
        sa.enable(model, hasher, SpotlightConfig(method="spotlight", budget=0.2, dense_layers=(0,), head_budgets=str(path)))
    with pytest.raises(SpotlightError, match="token count"):
        SpotlightConfig(method="spotlight", budget=50, head_budgets=str(path))
    with pytest.raises(HasherMismatchError, match="num_kv_heads"):
        sa.enable(tiny_model("llama", 4, 4, 16, layers=4), None,
                  SpotlightConfig(method="linear", budget=0.2, dense_layers=(0, 1), head_budgets=str(path)))
    with pytest.raises(CheckpointError, match="not found"):
        sa.enable(model, hasher, SpotlightConfig(method="spotlight", dense_layers=(0, 1), head_budgets=str(tmp_path / "nope")))
    assert getattr(model, "spotlight", None) is None  # nothing was left half-enabled
    sa.enable(model, hasher, SpotlightConfig(method="spotlight", budget=0.2, dense_layers=(0, 1), head_budgets=str(path)))
    sa.disable(model)


def test_calibrate_cli_writes_a_profile_that_eval_runs_beside_the_even_budget(tmp_path, tiny_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the cat sat on a mat and dog ran to red blue house tree sun moon".split()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(400)))
    out = tmp_path / "heads.safetensors"
    args = ["calibrate", "--model", tiny_dir, "--device", "cpu", "--method", "linear32", "--data", corpus, "--split", "all",
            "--context", "64", "--chunks", "2", "--steps", "4", "--fractions", "0.1,0.2,0.4", "--show", "0.2", "--out", out]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "| 0.2 |" in printed and out.is_file() and out.with_suffix(".json").is_file()
    profile = load_profile(out)
    assert profile.selector == {"method": "linear", "bits": 32, "seed": 0} and profile.layers == [2]
    assert profile.calibration["chunks"] == 2 and profile.fractions.tolist() == [0.1, 0.2, 0.4]
    res = tmp_path / "ppl.json"
    args = ["eval", "ppl", "--model", tiny_dir, "--device", "cpu", "--data", corpus, "--methods", "dense,linear32",
            "--head-budgets", f"linear32={out}", "--budgets", "0.2", "--length", "96", "--prefix", "32", "--chunks", "2",
            "--min-tokens", "4", "--out", res]
    assert main([str(a) for a in args]) == 0
    assert json.loads(res.read_text())["meta"]["methods"] == ["dense", "linear32", "linear32+heads"]
    assert main(["eval", "ppl", "--model", str(tiny_dir), "--head-budgets", "oracle=" + str(out), "--methods", "dense,linear32",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "names methods ['oracle']" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--method", "quest", "--out", str(out)]) == 2
    assert "--method takes one of" in capsys.readouterr().err
    assert load_profile(out).layers == [2]  # refused runs left the profile alone


def test_speed_rows_spread_keeps_the_mean_and_widens_one_head_a_layer():
    from spotlight_attn.decode_bench import spread_budgets

    model = tiny_model("llama", 8, 4, 16, layers=6)
    config = SpotlightConfig(method="linear", budget=0.02, dense_layers=(0, 1))
    budgets = spread_budgets(config, ModelGeometry.from_model(model), 4.0)
    assert sorted(budgets) == [2, 3, 4, 5]
    for n, (layer, budget) in enumerate(sorted(budgets.items())):
        assert sum(budget.heads) / 4 == pytest.approx(0.02) and max(budget.heads) == pytest.approx(0.08)
        assert budget.heads.index(max(budget.heads)) == n % 4  # a different head each layer
    with pytest.raises(SpotlightError, match="does not fit"):
        spread_budgets(config, ModelGeometry.from_model(model), 5.0)
