"""Hash training: ranking loss, pair sampling, recording, the streaming trainer (resume, refusal, data
parallelism), data splits, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from spotlight_attn.config import Budget
from spotlight_attn.data import is_heldout, iter_documents, load_chunks
from spotlight_attn.errors import CheckpointError, SpotlightError
from spotlight_attn.hashing import LinearHasher, MLPHasher, load_hasher, read_header
from spotlight_attn.metrics import layer_quality
from spotlight_attn.models import ModelGeometry
from spotlight_attn.train.loss import budget_tokens, list_loss, pair_loss
from spotlight_attn.train import PairSampling, TrainConfig, load_layer, ranking_loss, record_qk, sample_pairs, train_hasher
from spotlight_attn.train.state import state_path
from spotlight_attn.train.trainer import batch_plan, first_step

GEOMETRY = ModelGeometry("llama", num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=16, rope_theta=1e4, max_positions=1024)
SMALL = PairSampling(num_queries=24, num_top=8, num_other=12, num_hard=6, min_position=16)


def _chunk(seed: int = 0, length: int = 97):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, length, 16, generator=g), torch.randn(2, length, 16, generator=g) * 2  # q [Hq,L,D], k [Hkv,L,D]


def _config(**kw) -> TrainConfig:
    base = dict(bits=32, depth=1, width=16, budget=0.2, min_tokens=4, sink=1, window=2, steps=4, dense_layers=(0,), sampling=SMALL)
    base.update(kw)
    return TrainConfig(**base)


def test_sampling_bounds_and_sets():
    q, k = _chunk()
    budget = Budget(0.2, 4, 1, 2)
    pairs = sample_pairs(q, k, budget, SMALL, 0.25, torch.Generator().manual_seed(1))
    hkv, nq = 2, pairs.positions.numel()
    assert nq <= SMALL.num_queries and int(pairs.positions.min()) >= SMALL.min_position
    assert pairs.top.shape == (hkv, nq, SMALL.num_top) and pairs.other.shape == (hkv, nq, SMALL.num_other)
    pos = pairs.positions[None, :, None]
    assert bool(((pairs.top <= pos) | ~pairs.top_ok).all()) and bool(((pairs.other <= pos) | ~pairs.other_ok).all())
    # every valid top key outranks every valid other key in the true (group-summed probability) order
    p_top = pairs.probs.gather(-1, pairs.top).masked_fill(~pairs.top_ok, float("inf")).amin(-1)
    p_other = pairs.probs.gather(-1, pairs.other).masked_fill(~pairs.other_ok, -1.0).amax(-1)
    assert bool((p_top >= p_other).all())
    # forced sink / window keys are left out; no key is drawn twice as "other"
    forced = (pairs.top == 0) | (pairs.top >= pos - 1)
    assert not bool((forced & pairs.top_ok).any())
    for h in range(hkv):
        for i in range(nq):
            picked = pairs.other[h, i][pairs.other_ok[h, i]].tolist()
            assert len(picked) == len(set(picked))


@pytest.mark.parametrize("mass_weight", [0.0, 0.7])
def test_loss_gradient_sign(mass_weight):
    """Raising a true-top key's draft score lowers the loss; raising an other key's score raises it."""
    q, k = _chunk(2)
    sampling = PairSampling(num_queries=24, num_top=8, num_other=12, num_hard=6, min_position=16, mass_weight=mass_weight, logit_scale=0.1)
    pairs = sample_pairs(q, k, Budget(0.2, 4, 1, 2), sampling, 0.25, torch.Generator().manual_seed(0))
    draft = torch.randn(pairs.probs.shape, generator=torch.Generator().manual_seed(5), requires_grad=True)  # [Hkv, Nq, L]
    loss, misorder = pair_loss(draft, pairs, sampling)
    loss.backward()
    top_grad = draft.grad.gather(-1, pairs.top)[pairs.top_ok]
    other_grad = draft.grad.gather(-1, pairs.other)[pairs.other_ok]
    assert bool((top_grad <= 0).all()) and float(top_grad.sum()) < 0
    assert bool((other_grad >= 0).all()) and float(other_grad.sum()) > 0
    assert 0.0 < float(misorder) < 1.0  # random drafts mis-order some pairs
    h, i = torch.nonzero(pairs.top_ok.any(-1))[0].tolist()
    raised = draft.detach().clone()
    raised[h, i, pairs.top[h, i, 0]] += 1.0
    assert float(pair_loss(raised, pairs, sampling)[0]) < float(loss.detach())


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_list_loss_against_a_per_row_reference(power):
    """list_loss equals KL(p' || softmax(scale * z)) computed row by row over the candidate keys (p' the
    attention to list_power, renormalised), and it is invariant to the draft's scale and offset (inference
    ranks by the order alone)."""
    q, k = _chunk(2)
    sampling = PairSampling(num_queries=24, num_top=8, num_other=12, num_hard=6, min_position=16, listwise=1.0,
                            list_scale=3.0, list_power=power)
    pairs = sample_pairs(q, k, Budget(0.2, 4, 1, 2), sampling, 0.25, torch.Generator().manual_seed(0))
    draft = torch.randn(pairs.probs.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = list_loss(draft, pairs, sampling)
    terms = []
    for h in range(draft.shape[0]):
        for i in range(draft.shape[1]):
            keep = pairs.candidate[i]
            d, p = draft[h, i][keep], pairs.probs[h, i][keep].double() ** power
            p = p / p.sum()
            z = (d - d.mean()) / d.var(unbiased=False).add(1e-6).sqrt()
            terms.append(torch.sum(torch.xlogy(p, p) - p * torch.log_softmax(3.0 * z, 0)))
    assert torch.allclose(got, torch.stack(terms).mean(), rtol=1e-6)
    assert torch.allclose(list_loss(draft * 7.0 + 2.0, pairs, sampling), got, rtol=1e-5)
    better = torch.log(pairs.probs.double() + 1e-4)  # orders the keys as the attention does: a smaller divergence
    assert float(list_loss(better, pairs, sampling)) < float(got)


def test_listwise_settings_are_range_checked():
    with pytest.raises(ValueError, match="listwise"):
        PairSampling(listwise=1.5)
    with pytest.raises(ValueError, match="list_scale"):
        PairSampling(list_scale=0.0)
    with pytest.raises(ValueError, match="list_power"):
        PairSampling(list_power=0.0)


@pytest.mark.parametrize("listwise", [0.0, 0.5, 1.0])
def test_ranking_loss_trains_the_hash(listwise):
    """A few AdamW steps on one chunk lower the mis-order rate of the hash (the loss reaches the weights),
    with the pairwise loss alone and with the listwise term in it; the loss stays finite."""
    q, k = _chunk(3)
    sampling = PairSampling(num_queries=24, num_top=8, num_other=12, num_hard=6, min_position=16, listwise=listwise)
    hasher = MLPHasher(GEOMETRY, _config().hasher_config, layers=[1, 2])
    opt = torch.optim.AdamW(hasher.parameters(), lr=1e-2)
    pairs = sample_pairs(q, k, Budget(0.2, 4, 1, 2), sampling, 0.25, torch.Generator().manual_seed(0))
    first = None
    for _ in range(30):
        loss, wrong = ranking_loss(hasher, 1, q, k, pairs, sampling)
        assert bool(torch.isfinite(loss))
        first = float(wrong) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(ranking_loss(hasher, 1, q, k, pairs, sampling)[1]) < first


def _tiny_chunks(n=3, length=96, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_record_matches_layers(tmp_path):
    model = tiny_model(layers=3)
    chunks = _tiny_chunks(2, 40)
    folder = record_qk(model, chunks, tmp_path / "qk", progress=False)
    q, k = load_layer(folder, 2, 2)
    assert q.shape == (2, 4, 40, 16) and k.shape == (2, 2, 40, 16) and q.dtype == torch.float16
    assert getattr(model, "spotlight", None) is None  # recording leaves the model as it found it
    mtime = (folder / "chunk00000.safetensors").stat().st_mtime_ns
    record_qk(model, chunks, folder, progress=False)  # already there: reused
    assert (folder / "chunk00000.safetensors").stat().st_mtime_ns == mtime


def _train(tmp_path, out, model=None, **kw):
    """Stream-train the tiny 4-layer model (layers 1-3 sparse) on 3 chunks; kw: TrainConfig fields or train_hasher's."""
    run = {k: kw.pop(k) for k in ("checkpoint_every", "on_batch_done", "layers", "progress") if k in kw}
    run.setdefault("progress", False)
    return train_hasher(model or tiny_model(layers=4), _tiny_chunks(), out, device="cpu", config=_config(**kw), **run)


def _same_file(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_end_to_end_tiny(tmp_path):
    seen, model = [], tiny_model(layers=4)
    out = _train(tmp_path, tmp_path / "h.safetensors", model=model, progress=seen.append)
    assert getattr(model, "spotlight", None) is None  # training leaves the model as it found it
    header = read_header(out)["training"]
    assert header["finished_layers"] == [1, 2, 3] and (header["batches_done"], header["batches"]) == (3, 3)
    hasher = load_hasher(out, tiny_model(layers=4))
    assert hasher.layers == (1, 2, 3) and hasher.bits == 32
    logs = sorted((tmp_path / "h.logs").glob("layer*.jsonl"))
    assert [p.name for p in logs] == ["layer001.jsonl", "layer002.jsonl", "layer003.jsonl"]
    assert [p.batches_done for p in seen] == [1, 2, 3] and seen[-1].tokens == 3 * 96 and seen[-1].eta_s == 0
    # streaming: nothing but the hasher and its logs is left on disk (the state file goes once the run is complete)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.logs", "h.safetensors"]


def test_batch_plan_spreads_the_steps_over_every_batch():
    config = _config(steps=10, batch_chunks=2, epochs=3)
    plan = batch_plan(5, config)
    assert len(plan) == 6 and all(len(b) == 2 for b in plan)  # 2 full batches a pass; the fifth chunk sits out
    for epoch in range(3):
        assert len(set(plan[2 * epoch] + plan[2 * epoch + 1])) == 4
    assert plan[:2] != plan[2:4] or plan[2:4] != plan[4:]  # each pass in its own order
    counts = [first_step(i + 1, 6, 10) - first_step(i, 6, 10) for i in range(6)]
    assert sum(counts) == 10 and min(counts) >= 1 and max(counts) - min(counts) <= 1
    with pytest.raises(SpotlightError, match="fewer than the 6 batches"):
        batch_plan(5, _config(steps=5, batch_chunks=2, epochs=3))
    with pytest.raises(SpotlightError, match="more than the 5 training chunks"):
        batch_plan(5, _config(batch_chunks=6))


def test_budget_tokens_matches_tokens_for():
    n = torch.arange(1, 3000)
    for budget in (Budget(0.02), Budget(0.1, 4, 1, 2), Budget(0.333, 0, 0, 0), Budget(37, 20, 4, 16), Budget(1.0)):
        assert budget_tokens(budget, n).tolist() == [budget.tokens_for(int(i)) for i in n]


def test_same_seed_same_hasher_and_batches_of_two(tmp_path):
    a = _train(tmp_path, tmp_path / "a.safetensors", steps=4, batch_chunks=2)
    b = _train(tmp_path, tmp_path / "b.safetensors", steps=4, batch_chunks=2)
    assert _same_file(a, b)
    c = _train(tmp_path, tmp_path / "c.safetensors", steps=4, batch_chunks=2, seed=1)
    assert not _same_file(a, c)


class Killed(Exception):
    pass


def _kill_after(n):
    def check(batches_done):
        if batches_done == n:
            raise Killed

    return check


@pytest.mark.parametrize("every, kill_after", [(1, 1), (2, 3)])
def test_resume_after_kill_is_identical(tmp_path, every, kill_after):
    """A run killed after `kill_after` batches (checkpoints every `every`) resumes from its last checkpoint
    and ends bit for bit where an uninterrupted run ends; its logs hold each step once."""
    kw = dict(steps=9, epochs=2, checkpoint_every=every)
    full = _train(tmp_path, tmp_path / "full.safetensors", **kw)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(Killed):
        _train(tmp_path, out, on_batch_done=_kill_after(kill_after), **kw)
    header = read_header(out)["training"]
    assert header["batches_done"] == kill_after // every * every and header["finished_layers"] == []
    assert state_path(out).exists()
    load_hasher(out, tiny_model(layers=4))  # a mid-run checkpoint is a usable hasher
    _train(tmp_path, out, **kw)
    assert _same_file(full, out) and not state_path(out).exists()
    lines = (tmp_path / "resumed.logs" / "layer002.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_resume_refuses_other_settings_and_corrupt(tmp_path):
    out = _train(tmp_path, tmp_path / "h.safetensors")
    before = out.read_bytes()
    with pytest.raises(CheckpointError, match="steps"):
        _train(tmp_path, out, steps=5)
    with pytest.raises(CheckpointError, match="batch_chunks"):
        _train(tmp_path, out, steps=4, batch_chunks=3)
    with pytest.raises(CheckpointError, match="layers"):
        _train(tmp_path, out, layers=[2])
    assert out.read_bytes() == before  # refused, never overwritten
    _train(tmp_path, out)  # the same settings: complete, nothing to do
    assert out.read_bytes() == before
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot resume"):
        _train(tmp_path, bad)
    partial = tmp_path / "partial.safetensors"
    with pytest.raises(Killed):
        _train(tmp_path, partial, checkpoint_every=1, on_batch_done=_kill_after(1))
    state_path(partial).write_bytes(b"not a state file")
    with pytest.raises(CheckpointError, match="cannot resume.*not a readable"):
        _train(tmp_path, partial)
    state_path(partial).unlink()
    with pytest.raises(CheckpointError, match="training state .* is missing"):
        _train(tmp_path, partial)
    other = tmp_path / "other.safetensors"
    train_hasher(tiny_model(layers=5), _tiny_chunks(), other, device="cpu", progress=False, config=_config())
    with pytest.raises(SpotlightError, match="num_layers"):
        _train(tmp_path, other)


def test_train_a_subset_of_layers(tmp_path):
    """`layers` trains only those hashes; the others stay at their seeded initial weights."""
    out = _train(tmp_path, tmp_path / "h.safetensors", layers=[2])
    trained, untouched = load_file(str(out)), MLPHasher(ModelGeometry.from_model(tiny_model(layers=4)), _config().hasher_config, layers=[1, 2, 3]).state_dict()
    assert not torch.equal(trained["banks.k2.proj"], untouched["banks.k2.proj"])
    assert torch.equal(trained["banks.k1.proj"], untouched["banks.k1.proj"]) and torch.equal(trained["banks.k3.w1"], untouched["banks.k3.w1"])
    assert read_header(out)["training"]["finished_layers"] == [2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_bf16_model(tmp_path):
    """On CUDA: the frozen model in bfloat16, the hash in float32, pairs drawn on the device; resume works there too."""
    model = tiny_model(layers=4).to("cuda", torch.bfloat16)
    out = tmp_path / "h.safetensors"
    with pytest.raises(Killed):
        train_hasher(model, _tiny_chunks(), out, device="cuda", progress=False, config=_config(steps=6), checkpoint_every=1,
                     on_batch_done=_kill_after(2))
    train_hasher(model, _tiny_chunks(), out, device="cuda", progress=False, config=_config(steps=6))
    hasher = load_hasher(out, model)
    assert hasher.banks["k1"].proj.dtype == torch.float32 and read_header(out)["training"]["finished_layers"] == [1, 2, 3]


def test_metrics_oracle_and_full_budget():
    q, k = _chunk(4, 80)
    positions = torch.arange(20, 80, 7)
    linear = LinearHasher(GEOMETRY, bits=64, layers=[1])
    at_10 = layer_quality(q, k, 1, positions, Budget(0.1), {"linear": linear})
    assert at_10["oracle"][0] == pytest.approx(1.0)
    assert at_10["linear"][1] <= at_10["oracle"][1] + 1e-6
    assert set(at_10) == {"oracle", "logit", "linear"}
    assert 0.0 < at_10["logit"][0] <= 1.0 and at_10["logit"][1] <= at_10["oracle"][1] + 1e-6
    full = layer_quality(q, k, 1, positions, Budget(1.0), {"linear": linear})
    for iou, mass in full.values():
        assert iou == pytest.approx(1.0) and mass == pytest.approx(1.0, abs=1e-5)


def test_logit_oracle_ranks_by_group_summed_logits():
    """The logit oracle's pick equals the top-k of sum_g q_g . k (outside the forced sink / window keys)."""
    from types import SimpleNamespace

    from spotlight_attn.metrics import LogitSelector

    q, k = _chunk(6, 64)
    query = q[:, 50][None, :, None]  # [1, Hq, 1, D]
    valid = torch.arange(64)[None] <= 50
    state = SimpleNamespace(keys=k[None], key_valid=valid, layer_idx=1)
    picked = LogitSelector().select(query, state, Budget(10, 0, 0, 0), 0.25)  # [1, Hkv, 10]
    logits = (q[:, 50].view(2, 3, 16).sum(1)[:, None] * k).sum(-1)[:, :51]  # [Hkv, 51]
    expected = logits.topk(10, dim=-1).indices.sort(-1).values
    assert torch.equal(picked[0], expected)


def test_sampling_at_given_positions_and_hard_top():
    q, k = _chunk(7)
    sampling = PairSampling(num_queries=24, num_top=8, num_other=12, num_hard=6, num_hard_top=4, min_position=16)
    positions = torch.tensor([20, 50, 96])
    pairs = sample_pairs(q, k, Budget(0.2, 4, 1, 2), sampling, 0.25, torch.Generator().manual_seed(0), positions=positions)
    assert torch.equal(pairs.positions, positions)
    for h in range(2):
        for i in range(3):
            top = pairs.top[h, i][pairs.top_ok[h, i]].tolist()
            assert len(top) == len(set(top))  # hard and uniform top keys never repeat
    with pytest.raises(ValueError):
        PairSampling(num_top=4, num_hard_top=5)


class _WordTokenizer:
    """Word "d7" -> token 9: every document's tokens are its own. Takes one text or a list, as HF tokenizers do."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, str):
            return {"input_ids": [int(w[1:]) + 2 for w in text.split()]}
        return {"input_ids": [self(t)["input_ids"] for t in text]}


def test_data_splits_never_overlap(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(" ".join([f"d{i}"] * 50))
    (tmp_path / "more.jsonl").write_text("\n".join('{"text": "%s"}' % " ".join([f"d{100 + i}"] * 30) for i in range(10)))
    ids = [doc_id for doc_id, _ in iter_documents(tmp_path)]
    assert len(ids) == 50
    held = {d for d in ids if is_heldout(d, 0.25)}
    assert held and len(held) < len(ids)
    tok = _WordTokenizer()
    train = load_chunks(tmp_path, tok, 16, split="train", heldout_fraction=0.25)
    heldout = load_chunks(tmp_path, tok, 16, split="heldout", heldout_fraction=0.25)
    assert not (set(train.flatten().tolist()) & set(heldout.flatten().tolist())) - {1}
    assert torch.equal(load_chunks(tmp_path, tok, 16, split="train", heldout_fraction=0.25), train)  # deterministic
    assert load_chunks(tmp_path, tok, 16, num_chunks=3, split="all").shape == (3, 16)
    with pytest.raises(SpotlightError):
        load_chunks(tmp_path / "missing", tok, 16)


def test_stdlib_corpus_is_offline():
    doc_id, text = next(iter_documents("stdlib"))
    assert doc_id.startswith("stdlib:") and text


def test_pydocs_corpus_is_offline_prose():
    docs = list(iter_documents("pydocs"))
    assert len(docs) > 50 and all(doc_id.startswith("pydocs:") for doc_id, _ in docs)
    assert sum(len(text) for _, text in docs) > 200_000  # enough for several 4096-token chunks


def _data_parallel_worker(rank: int, world: int, init_file: str, tmp: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with pytest.raises(SpotlightError, match="multiple of the 2 ranks"):
            _train(Path(tmp), Path(tmp) / "odd.safetensors", batch_chunks=1)
        _train(Path(tmp), Path(tmp) / "parallel.safetensors", steps=6, batch_chunks=2, epochs=2, checkpoint_every=1)
    finally:
        dist.destroy_process_group()


def test_data_parallel_gloo_matches_single_process(tmp_path):
    """torchrun-style data parallelism (2 gloo ranks, one chunk of each 2-chunk batch each, gradients
    all-reduced): rank 0's file loads and matches a one-process run on the same batches. The ranks
    forward one chunk where the single process forwards two, so q/k (and from there the weights) may
    differ in the last float32 bits: allowed 1e-5 absolute, against training moves of ~4e-3 from the
    initial weights here (ranks that skip the all-reduce end ~7e-3 off; measured
    bit-equal on the 2-core development machine)."""
    import torch.multiprocessing as mp

    single = _train(tmp_path, tmp_path / "single.safetensors", steps=6, batch_chunks=2, epochs=2)
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    merged = tmp_path / "parallel.safetensors"
    header = read_header(merged)["training"]
    assert header["finished_layers"] == [1, 2, 3] and header["world"] == 2
    load_hasher(merged, tiny_model(layers=4))
    a, b = load_file(str(single)), load_file(str(merged))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_cli_train_defaults_to_the_listwise_loss_at_pairsampling_scale():
    """`spotlight train` with no loss flags trains the listwise loss alone, at PairSampling's list scale."""
    import argparse

    from spotlight_attn.cli import train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "h.safetensors"])
    assert args.listwise == 1.0
    assert args.list_scale == PairSampling().list_scale == 2.0


@pytest.mark.slow
def test_cli_train_small_corpus_real_model(tmp_path):
    """`spotlight train` on a small offline corpus with the real model: a few steps, and the output loads."""
    import argparse

    from spotlight_attn.cli import train_cmd
    from spotlight_attn.models import load_model

    parser = argparse.ArgumentParser()
    train_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "h.safetensors"
    args = parser.parse_args(["train", "--model", "smollm2-135m", "--data", "licenses", "--out", str(out), "--steps", "2",
                              "--chunks", "2", "--chunk-len", "256", "--queries", "16", "--cache-dir", str(tmp_path / "c")])
    assert args.run(args) == 0
    model, _ = load_model("smollm2-135m", device="cpu")
    assert load_hasher(out, model).layers == tuple(range(2, 30))


def test_plot_png_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    from spotlight_attn.metrics import plot_png

    results = {0.1: {"oracle": {2: (1.0, 0.9), 3: (1.0, 0.95)}, "learned": {2: (0.4, 0.85), 3: (0.5, 0.9)}}}
    path = plot_png(results, [2, 3], 0.1, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_torchrun_cli_two_ranks_real_model(tmp_path):
    """`torchrun --nproc_per_node 2 ... spotlight train` (gloo on the CPU): data parallel, rank 0 writes the hasher."""
    import os
    import subprocess
    import sys

    out = tmp_path / "h.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "spotlight_attn.cli.main", "train", "--model", "smollm2-135m", "--data", "licenses", "--out", str(out),
           "--steps", "2", "--chunks", "2", "--chunk-len", "256", "--queries", "16", "--device", "cpu", "--threads", "1",
           "--checkpoint-every", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    header = read_header(out)
    assert header["training"]["finished_layers"] == list(range(2, 30)) and header["training"]["world"] == 2
    assert header["training"]["config"]["batch_chunks"] == 2  # one chunk per rank by default
    assert "batch 1/1" in done.stderr  # progress, printed by the CLI on rank 0


def test_chunks_fingerprint_sees_the_shape():
    from spotlight_attn.data import chunks_fingerprint

    tokens = torch.arange(64)
    assert chunks_fingerprint(tokens.reshape(2, 32)) != chunks_fingerprint(tokens.reshape(4, 16))
    assert chunks_fingerprint(tokens.reshape(2, 32)) == chunks_fingerprint(tokens.reshape(2, 32).clone())
    assert chunks_fingerprint(tokens.reshape(2, 32)) != chunks_fingerprint((tokens + 1).reshape(2, 32))


def test_selection_quality_against_hand_counts():
    from spotlight_attn.metrics import selection_quality

    truth = torch.tensor([[[True, True, False, False, False]]])
    picked = torch.tensor([[[True, False, True, False, False]]])
    probs = torch.tensor([[[1.0, 0.5, 0.25, 0.25, 0.0]]])  # sums to G = 2
    iou, mass = selection_quality(picked, truth, probs, group=2)
    assert iou.item() == pytest.approx(1 / 3)  # one shared of three distinct
    assert mass.item() == pytest.approx((1.0 + 0.25) / 2)
    iou, mass = selection_quality(truth, truth, probs, group=2)
    assert iou.item() == 1.0 and mass.item() == pytest.approx(0.75)


def test_parquet_corpus_reads_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", None, "third doc"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    docs = list(iter_documents(tmp_path / "c.parquet"))
    assert [text for _, text in docs] == ["first doc", "", "third doc"]
    assert len({doc_id for doc_id, _ in docs}) == 3  # one id per row: splits are by row
    assert [text for _, text in iter_documents(tmp_path)] == ["first doc", "", "third doc"]  # found in a folder
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "bad.parquet")
    with pytest.raises(SpotlightError, match="bad.parquet.*'text' column"):
        list(iter_documents(tmp_path / "bad.parquet"))


def test_real_query_scores_against_brute_force():
    from types import SimpleNamespace

    from spotlight_attn.metrics import RealQuerySelector
    from spotlight_attn.config import Method

    hasher = LinearHasher(GEOMETRY, bits=40, layers=[1])
    keys = torch.randn(1, 2, 13, 16)
    query = torch.randn(1, 6, 1, 16)
    layer = SimpleNamespace(keys=keys, codes=hasher.key_codes(1, keys), key_valid=torch.ones(1, 13, dtype=torch.bool), layer_idx=1)
    scores = RealQuerySelector(hasher, Method.LINEAR).scores(query, layer, 16**-0.5)  # [1, Hkv, T]
    q = hasher.hash_queries(1, query)[0, :, 0]  # [Hq, bits] real
    k = torch.sign(hasher.hash_keys(1, keys)[0])  # [Hkv, T, bits]
    for h in range(2):
        for t in range(13):
            expected = sum(float(q[j] @ k[h, t]) for j in range(3 * h, 3 * h + 3))
            assert scores[0, h, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    picked = RealQuerySelector(hasher, Method.LINEAR).select(query, layer, Budget(1.0, 0, 0, 0), 16**-0.5)
    assert sorted(picked[0, 0].tolist()) == list(range(13))


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("group", [1, 3])
def test_quantised_query_scores_against_brute_force(levels, group):
    from types import SimpleNamespace

    from spotlight_attn.config import Method
    from spotlight_attn.metrics import RealQuerySelector
    geometry = ModelGeometry("llama", num_layers=2, num_q_heads=2 * group, num_kv_heads=2, head_dim=16, rope_theta=1e4, max_positions=64)
    hasher = LinearHasher(geometry, bits=40, layers=[1])
    keys, query = torch.randn(2, 2, 11, 16), torch.randn(2, 2 * group, 1, 16)  # batch 2, odd length
    layer = SimpleNamespace(keys=keys, codes=hasher.key_codes(1, keys), key_valid=torch.ones(2, 11, dtype=torch.bool), layer_idx=1)
    scores = RealQuerySelector(hasher, Method.LINEAR, levels=levels).scores(query, layer, 16**-0.5)  # [B, Hkv, T]
    y = hasher.hash_queries(1, query)[:, :, 0]  # [B, Hq, bits]
    k = torch.sign(hasher.hash_keys(1, keys))  # [B, Hkv, T, bits]
    top = 2**levels - 1
    for b in range(2):
        for h in range(2):
            summed = y[b, h * group : (h + 1) * group].sum(0)  # [bits]
            weights = [round(abs(v) / float(summed.abs().max()) * top) * (1 if v > 0 else -1) for v in summed.tolist()]
            assert max(abs(w) for w in weights) == top
            for t in range(11):
                expected = sum(w * float(c) for w, c in zip(weights, k[b, h, t]))
                assert scores[b, h, t].item() == expected  # integer weights: exact
    with pytest.raises(ValueError, match="levels must be"):
        RealQuerySelector(hasher, Method.LINEAR, levels=0)


def test_train_hasher_refuses_a_config_and_loose_fields_together(tmp_path):
    from spotlight_attn.config import TrainConfig

    with pytest.raises(SpotlightError, match="either config or TrainConfig fields.*cache_dir"):
        train_hasher(tiny_model(layers=3), torch.zeros(2, 16, dtype=torch.long), tmp_path / "h.safetensors", device="cpu",
                     config=TrainConfig(), cache_dir=tmp_path)
    assert not (tmp_path / "h.safetensors").exists()
