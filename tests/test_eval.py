"""Evaluation suite on tiny random models: the metrics mean what they say, the modes agree, files hold up."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from spotlight_attn.cli.main import main
from spotlight_attn.config import SpotlightConfig
from spotlight_attn.errors import SpotlightError
from spotlight_attn.eval import common
from spotlight_attn.eval.fidelity import evaluate_fidelity, passage_task, token_agreement
from spotlight_attn.eval.needle import evaluate_needle
from spotlight_attn.eval.ppl import evaluate_ppl
from spotlight_attn.eval.report import markdown, plot
from spotlight_attn.eval.retrieval import evaluate_retrieval
from spotlight_attn.tasks import KINDS, encode_task, filler_paragraphs, make_task

SMALL = SpotlightConfig(min_tokens=3, sink=1, window=2, dense_layers=(0,))


def _setup(q_heads=4, kv_heads=2):
    model = tiny_model("llama", q_heads=q_heads, kv_heads=kv_heads, layers=3)
    return model, common.Methods(model, "tiny", SMALL)


def test_method_specs_parse_and_refuse_nonsense():
    specs = common.parse_methods("dense,oracle,linear1024,linear:64,quest,quest:32,streaming,spotlight=h.st,dense")
    assert [s.label for s in specs] == ["dense", "oracle", "linear1024", "linear64", "quest16", "quest32", "streaming", "spotlight"]
    assert specs[-1].hasher == "h.st"
    assert common.parse_budgets("0.1,2%,512") == [0.1, 0.02, 512]
    for bad in ("magic", "oracle5", "quest=x.st", ""):
        with pytest.raises(SpotlightError):
            common.parse_methods(bad)
    with pytest.raises(SpotlightError, match="out of range"):
        common.parse_budgets("1.5")
    pairs = common.runs(common.parse_methods("oracle,dense"), [0.1, 0.02])
    assert [(s.label, b) for s, b in pairs] == [("dense", None), ("oracle", 0.1), ("oracle", 0.02)]


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (3, 3)])
def test_retrieval_oracle_scores_itself_perfectly_and_full_budget_is_everything(q_heads, kv_heads):
    model, methods = _setup(q_heads, kv_heads)
    torch.manual_seed(0)
    chunks = {40: torch.randint(3, 128, (2, 47)), 61: torch.randint(3, 128, (1, 68))}  # batch of chunks, odd lengths
    specs = common.parse_methods("oracle,linear32,streaming")
    results = evaluate_retrieval(model, methods, specs, [1.0, 0.2], chunks, steps=7, progress=False)
    rows = {(r["context"], r["method"], r["budget"]): r for r in results["rows"]}
    assert len(rows) == 2 * 3 * 2
    for context in chunks:
        for method in ("oracle", "linear32", "streaming"):
            full = rows[context, method, 1.0]
            assert full["iou"] == pytest.approx(1.0) and full["mass"] == pytest.approx(1.0, abs=1e-6)
        small = rows[context, "oracle", 0.2]
        assert small["iou"] == pytest.approx(1.0) and 0.2 < small["mass"] < 1.0
        assert rows[context, "streaming", 0.2]["mass"] < small["mass"]  # the oracle bounds every method
        assert rows[context, "linear32", 0.2]["iou"] < 1.0
    grid = torch.tensor(rows[40, "linear32", 0.2]["mass_layer_head"])
    assert grid.shape == (2, kv_heads)  # sparse layers 1, 2 x KV heads


def test_dense_ppl_is_the_models_own_loss():
    model, methods = _setup()
    torch.manual_seed(1)
    chunks = torch.randint(3, 128, (2, 45))
    prefix = 11
    results = evaluate_ppl(model, methods, common.parse_methods("dense"), [0.1], chunks, prefix, progress=False)
    labels = chunks.clone()
    labels[:, : prefix + 1] = -100  # only tokens after the prefix are scored
    with torch.no_grad():
        common.dense_prefill(model, chunks[:1, :1])  # leaves spotlight disabled
        loss = model(chunks, labels=labels).loss
    row = results["rows"][0]
    assert row["tokens"] == 2 * (45 - prefix - 1)
    assert row["nll"] == pytest.approx(float(loss), rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_fast_ppl_equals_token_by_token_decoding():
    model, methods = _setup(6, 2)
    torch.manual_seed(2)
    chunks = torch.randint(3, 128, (1, 53))
    specs = common.parse_methods("oracle,linear64,quest:4,streaming")
    fast = evaluate_ppl(model, methods, specs, [0.2], chunks, 17, mode="fast", progress=False)["rows"]
    slow = evaluate_ppl(model, methods, specs, [0.2], chunks, 17, mode="decode", progress=False)["rows"]
    for a, b in zip(fast, slow):
        assert a["method"] == b["method"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
        assert a["read_fraction"] == pytest.approx(b["read_fraction"], rel=1e-6) and a["read_fraction"] < 1
    dense = evaluate_ppl(model, methods, common.parse_methods("dense"), [0.2], chunks, 17, progress=False)["rows"][0]
    assert all(abs(a["nll"] - dense["nll"]) > 1e-4 for a in fast)  # selection really changed the predictions


@pytest.mark.parametrize("kind", KINDS)
def test_needle_tasks_are_deterministic_and_hide_their_answers(kind):
    tokenizer = tiny_tokenizer(128)
    task = make_task(tokenizer, kind, 400, depth=0.3, seed=5)
    again = make_task(tokenizer, kind, 400, depth=0.3, seed=5)
    assert task == again
    assert make_task(tokenizer, kind, 400, depth=0.3, seed=6).answers != task.answers
    for answer in task.answers:
        assert answer in task.context and answer not in task.question
    assert task.score(" ".join(task.answers)) == 1.0 and task.score("nothing") == 0.0
    ids, split = encode_task(tokenizer, task)
    assert 400 <= len(ids) <= 400 + max(len(tokenizer(p)["input_ids"]) for p in filler_paragraphs()) + 1
    question = tokenizer(task.question, add_special_tokens=False)["input_ids"]
    prefix = tokenizer(task.answer_prefix, add_special_tokens=False)["input_ids"]
    assert ids[split : split + len(question)] == question  # decoding starts at the question...
    assert ids[-len(prefix) :] == prefix  # ...and ends with the answer prefix
    assert len(ids) - split <= len(question) + len(prefix) + 2  # the template's closing markers between them
    if kind == "single":  # the needle sits at the asked depth
        first = task.context.index(task.answers[0]) / len(task.context)
        assert 0.2 < first < 0.4


def test_needle_eval_runs_every_method_and_dense_is_exact():
    model, methods = _setup()
    tokenizer = tiny_tokenizer(128)
    specs = common.parse_methods("dense,oracle,quest:4")
    results = evaluate_needle(model, tokenizer, methods, specs, [0.1, 1.0], ["passkey", "multiquery"], [200], [0.5], [0, 1],
                              max_new_tokens=4, progress=False)
    rows = results["rows"]
    assert len(rows) == 2 * 2 * (1 + 2 * 2)
    by = {(r["kind"], r["seed"], r["method"], r["budget"]): r["reply"] for r in rows}
    for kind in ("passkey", "multiquery"):  # at full budget every method answers as dense does
        for seed in (0, 1):
            assert by[kind, seed, "oracle", 1.0] == by[kind, seed, "quest4", 1.0] == by[kind, seed, "dense", None]
    assert "| dense | all |" in markdown(results)


def test_fidelity_compares_with_the_dense_reply():
    assert token_agreement([1, 2, 3], [1, 2, 4, 5]) == 0.5 and token_agreement([], []) == 1.0
    text = " ".join(f"Sentence {i} says the cat sat on a mat and the dog ran to the red house." for i in range(12))
    task = passage_task(text, seed=0)
    assert task.answers[0] in text and task.answers[0] not in task.question
    assert passage_task("Too short. Only two sentences here at all.", seed=0) is None
    model, methods = _setup()
    tokenizer = tiny_tokenizer(128)
    results = evaluate_fidelity(model, tokenizer, methods, common.parse_methods("oracle"), [1.0, 0.1], [text, text[:300]],
                                max_new_tokens=5, progress=False)
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert rows["dense", None]["exact"] and rows["dense", None]["rouge_l_dense"] == pytest.approx(1.0)
    assert rows["oracle", 1.0]["exact"] and rows["oracle", 1.0]["agreement"] == 1.0
    # Every fidelity run computes the dense replies it compares with: parts split by method share them.
    parts = [evaluate_fidelity(model, tokenizer, methods, common.parse_methods(m), [1.0, 0.1], [text, text[:300]],
                               max_new_tokens=5, progress=False) for m in ("oracle", "linear32")]
    merged = common.merge_results(parts)
    assert [r["method"] for r in merged["rows"]].count("dense") == 2  # one row per prompt, once
    asked = evaluate_fidelity(model, tokenizer, methods, common.parse_methods("dense"), [1.0], [text, text[:300]],
                              max_new_tokens=5, progress=False)
    assert [r["method"] for r in common.merge_results([parts[0], asked])["rows"]].count("dense") == 2  # either order
    with pytest.raises(SpotlightError, match="repeats method dense"):  # asked for twice
        common.merge_results([asked, parts[0], asked])
    assert {(s["method"], s["budget"]) for s in merged["summary"]} == {("dense", None), ("oracle", 1.0), ("oracle", 0.1),
                                                                      ("linear32", 1.0), ("linear32", 0.1)}
    parts[1]["rows"][0]["reply"] += " (changed)"  # a reference that differs between parts is refused
    with pytest.raises(SpotlightError, match="repeats method dense"):
        common.merge_results(parts)


def test_eval_cli_writes_results_table_and_plots_then_report_redraws(tmp_path, tiny_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # your own folder: read whole (--split auto); which ids a held-out split takes depends on tmp_path
        (corpus / f"doc{i}.txt").write_text(" ".join(["the cat sat on a mat and dog ran to red blue house"] * 30))
    out = tmp_path / "res" / "ppl.json"
    args = ["eval", "ppl", "--model", tiny_dir, "--device", "cpu", "--data", corpus, "--methods", "dense,oracle,linear32",
            "--budgets", "0.2", "--length", "96", "--prefix", "32", "--chunks", "2", "--min-tokens", "4", "--out", out]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["kind"] == "ppl" and results["meta"]["methods"] == ["dense", "oracle", "linear32"]
    assert results["meta"]["machine"]["torch"] == torch.__version__ and results["meta"]["budgets"] == [0.2]
    assert "| oracle | 20% |" in printed and out.with_suffix(".md").read_text().startswith("| method")
    png = out.with_name("ppl.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    png.unlink()
    assert main(["report", str(out), "--summary", str(tmp_path / "summary.json"), "--domain", "cats"]) == 0
    assert png.is_file() and "| linear32 | 20% |" in capsys.readouterr().out
    summary = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert summary.keys() == {"dense", "oracle", "linear32"} and summary["linear32"]["bits"] == 32
    assert summary["oracle"]["domain"] == "cats" and summary["oracle"]["ppl_vs_dense_lo"] <= summary["oracle"]["ppl_vs_dense"]


def test_eval_cli_refuses_bad_input_without_touching_results(tmp_path, tiny_dir, capsys):
    out = tmp_path / "keep.json"
    out.write_text("precious")
    base = ["eval", "ppl", "--model", str(tiny_dir), "--device", "cpu", "--out", str(out)]
    assert main(base + ["--methods", "magic"]) == 2
    assert "method 'magic' is not one of" in capsys.readouterr().err
    assert main(base + ["--methods", "spotlight"]) == 2  # no hasher ships for a local folder
    assert "no hasher ships" in capsys.readouterr().err
    assert main(base + ["--budgets", "2.0"]) == 2
    assert out.read_text() == "precious"
    assert main(["report", str(out)]) == 2
    assert "not a results file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("kind,extra,methods", [
    ("ppl", ["--length", "96", "--prefix", "32", "--chunks", "2"], {"dense", "oracle"}),
    ("retrieval", ["--contexts", "64", "--chunks", "1", "--steps", "4"], {"oracle"}),  # dense is the truth, not a row
    # the tiny tokenizer has no '.', so its passages hold no sentences to ask about: no rows, but the data loads
    ("fidelity", ["--length", "96", "--prompts", "1", "--max-new-tokens", "4"], set()),
])
def test_eval_of_your_own_single_file_reads_all_of_it(tmp_path, tiny_dir, capsys, kind, extra, methods):
    """One document lands wholly in one split; a user's own file is read whole by default (--split auto)."""
    book = tmp_path / "my_book.txt"
    book.write_text(" ".join(["the cat sat on a mat and the dog ran to the red blue house ."] * 40))
    out = tmp_path / f"{kind}.json"
    base = ["eval", kind, "--model", str(tiny_dir), "--device", "cpu", "--data", str(book), "--methods", "dense,oracle",
            "--budgets", "0.25", "--min-tokens", "4", "--out", str(out), *extra]
    assert main(base) == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["meta"]["split"] == "all" and {r["method"] for r in results["rows"]} == methods
    capsys.readouterr()
    from spotlight_attn.data import is_heldout

    if is_heldout(str(book), 0.05):  # the file's one document sits wholly in one split (which: a hash of its path)
        assert main(base + ["--split", "heldout"]) == 0
    else:
        assert main(base + ["--split", "heldout"]) == 2
        assert "--split all" in capsys.readouterr().err


def test_eval_says_when_the_corpus_holds_fewer_chunks_than_asked(tmp_path, tiny_dir, capsys):
    book = tmp_path / "short.txt"
    book.write_text(" ".join(["the cat sat on a mat and the dog ran to the red blue house ."] * 40))
    out = tmp_path / "ppl.json"
    args = ["eval", "ppl", "--model", str(tiny_dir), "--device", "cpu", "--data", str(book), "--methods", "dense",
            "--length", "96", "--prefix", "32", "--chunks", "500", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "holds" in err and "fewer than the 500 chunks asked for" in err, err
    assert json.loads(out.read_text())["kind"] == "ppl"


def test_builtin_corpora_stay_held_out_by_default():
    from spotlight_attn.data import BUILTIN, default_split

    assert {default_split(name) for name in BUILTIN} == {"heldout"}
    assert default_split("my_book.txt") == "all"


def test_bootstrap_intervals_cover_the_mean_repeat_and_narrow_with_more_units():
    from spotlight_attn.eval.stats import mean_interval

    g = torch.Generator().manual_seed(0)
    few, many = torch.rand(8, generator=g), torch.rand(800, generator=g)
    lo, hi = mean_interval(few)
    assert lo < float(few.mean()) < hi and (lo, hi) == mean_interval(few)  # seeded: the same interval again
    lo2, hi2 = mean_interval(many)
    assert hi2 - lo2 < (hi - lo) / 4  # 100x the units: about a tenth of the width
    assert mean_interval([0.7] * 5) == (pytest.approx(0.7), pytest.approx(0.7))  # no spread, no width


def _ppl_results(rows):
    return {"kind": "ppl", "meta": {"model": "tiny", "settings": {}}, "rows": rows}


def test_ppl_vs_dense_is_paired_over_chunks():
    """A method that adds the same NLL per token to every chunk is exactly that much worse, whatever the
    chunks' own spread: the paired interval has no width, the unpaired PPL interval has."""
    from spotlight_attn.eval.stats import summarize

    nll_dense = [100.0, 250.0, 80.0, 400.0]  # chunks of very different difficulty
    tokens = [50, 50, 50, 50]
    worse = [n + 0.1 * t for n, t in zip(nll_dense, tokens)]

    def row(method, nll):
        return {"method": method, "budget": None if method == "dense" else 0.1, "ppl": math.exp(sum(nll) / sum(tokens)), "tokens": 200,
                "read_fraction": 1.0,
                "chunk_nll": nll, "chunk_tokens": tokens}

    results = summarize(_ppl_results([row("dense", nll_dense), row("oracle", worse)]))
    dense, method = results["rows"]
    assert method["ppl_vs_dense"] == pytest.approx(math.exp(0.1) - 1)
    assert method["ppl_vs_dense_lo"] == pytest.approx(math.exp(0.1) - 1) == pytest.approx(method["ppl_vs_dense_hi"])
    assert dense["ppl_lo"] < dense["ppl"] < dense["ppl_hi"] and "ppl_vs_dense" not in dense
    assert "[+10.52, +10.52]" in markdown(results) and results["meta"]["intervals"]["level"] == 0.95


def test_needle_summary_has_accuracy_and_paired_difference_with_intervals():
    from spotlight_attn.eval.stats import summarize

    rows = []
    for seed in range(20):
        for method, budget, score in (("dense", None, 1.0), ("oracle", 0.1, float(seed % 2))):
            rows.append({"kind": "passkey", "length": 100, "depth": 0.5, "seed": seed, "method": method, "budget": budget,
                         "score": score})
    results = summarize({"kind": "needle", "meta": {"model": "tiny", "settings": {"kinds": ["passkey"], "lengths": [100]}}, "rows": rows})
    summary = {r["method"]: r for r in results["summary"]}
    assert summary["dense"]["accuracy"] == 1.0 and summary["dense"]["units"] == 20
    oracle = summary["oracle"]
    assert oracle["accuracy"] == 0.5 and oracle["accuracy_lo"] < 0.5 < oracle["accuracy_hi"]
    assert oracle["accuracy_vs_dense"] == -0.5 and oracle["accuracy_vs_dense_hi"] < 0  # worse than dense, surely
    table = markdown(results)
    assert "**50.0** [" in table and "-50.0 [" in table


def test_evaluations_write_per_unit_figures_and_intervals_and_old_files_still_render():
    model, methods = _setup()
    torch.manual_seed(3)
    chunks = torch.randint(3, 128, (3, 40))
    results = evaluate_ppl(model, methods, common.parse_methods("dense,oracle"), [0.2], chunks, 11, progress=False)
    for row in results["rows"]:
        assert len(row["chunk_nll"]) == 3 and row["ppl_lo"] <= row["ppl"] <= row["ppl_hi"]
    oracle = next(r for r in results["rows"] if r["method"] == "oracle")
    assert oracle["ppl_vs_dense_lo"] <= oracle["ppl_vs_dense"] <= oracle["ppl_vs_dense_hi"]
    retrieval = evaluate_retrieval(model, methods, common.parse_methods("linear32"), [0.2], {20: torch.randint(3, 128, (2, 26))},
                                   steps=4, progress=False)
    row = retrieval["rows"][0]
    assert len(row["chunk_mass"]) == 2 and row["mass_lo"] <= row["mass"] + 1e-9 and row["mass"] <= row["mass_hi"] + 1e-9
    assert row["mass"] == pytest.approx(sum(row["chunk_mass"]) / 2)  # equal steps per chunk: the mean of the chunks
    for old in (results, retrieval):  # a results file from before the intervals: tables without them
        for r in old["rows"]:
            for key in [k for k in r if k.endswith(("_lo", "_hi")) or k.startswith("chunk_")]:
                del r[key]
        assert " [" not in markdown(old).split("\n\n")[-2]


def test_quality_summary_merges_the_kinds_per_domain_and_keeps_other_domains(tmp_path):
    from spotlight_attn.eval.stats import summarize
    from spotlight_attn.eval.summary import quality_summary, write_summary

    meta = {"model": "tiny", "data": "kjv", "settings": {"kinds": ["passkey"], "lengths": [100]},
            "hashers": {"h.safetensors": "ab" * 32}, "hasher_bits": {"h.safetensors": 128}}
    retrieval = {"kind": "retrieval", "meta": dict(meta), "rows": [
        {"context": c, "method": "spotlight", "budget": 0.1, "iou": 0.5, "mass": 0.9, "chunk_iou": [0.5, 0.5],
         "chunk_mass": [0.88, 0.92]} for c in (512, 1024)]}
    tokens = [40, 40, 40]
    ppl = summarize({"kind": "ppl", "meta": dict(meta), "rows": [
        {"method": "dense", "budget": None, "ppl": math.exp(1.0), "chunk_nll": [40.0, 40.0, 40.0], "chunk_tokens": tokens},
        {"method": "linear1024", "budget": 0.1, "ppl": math.exp(1.1), "chunk_nll": [44.0, 44.0, 44.0], "chunk_tokens": tokens}]})
    needle = summarize({"kind": "needle", "meta": dict(meta, data="generated (tasks.py)"), "rows": [
        {"kind": "passkey", "length": 100, "depth": 0.5, "seed": s, "method": m, "budget": b, "score": float(m == "dense" or s < 3)}
        for s in range(4) for m, b in (("dense", None), ("spotlight", 0.1))]})
    rows = quality_summary([retrieval, ppl, needle], domain="kjv")
    by = {(r["method"], r["budget"]): r for r in rows}
    learned = by["spotlight", 0.1]
    assert learned["domain"] == "kjv" and learned["bits"] == 128 and learned["hasher_sha256"] == "ab" * 32
    assert learned["mass"] == pytest.approx(0.9) and learned["mass_lo"] < 0.9 < learned["mass_hi"]
    assert learned["needle_acc"] == 0.75 and learned["ppl_vs_dense"] is None  # no ppl row for it: None, not 0
    simhash = by["linear1024", 0.1]
    assert simhash["bits"] == 1024 and simhash["hasher_sha256"] is None
    assert simhash["ppl_vs_dense"] == pytest.approx(math.exp(0.1) - 1) == pytest.approx(simhash["ppl_vs_dense_hi"])
    assert by["dense", None]["ppl_vs_dense"] == 0.0 and by["dense", None]["needle_acc"] == 1.0
    out = tmp_path / "quality_summary.json"
    write_summary(out, rows)
    write_summary(out, quality_summary([ppl], domain="stdlib"))  # another domain: added, kjv kept
    write_summary(out, quality_summary([ppl], domain="kjv"))  # kjv again: its rows replaced
    saved = json.loads(out.read_text())
    assert {r["domain"] for r in saved} == {"kjv", "stdlib"} and len([r for r in saved if r["domain"] == "kjv"]) == 2
    out.write_text("not json")
    with pytest.raises(SpotlightError, match="not a quality summary"):
        write_summary(out, rows)
    assert out.read_text() == "not json"  # refused, not overwritten


def _summary_row(domain, method, budget, bits=None, **figures):
    row = {"domain": domain, "method": method, "budget": budget, "bits": bits, "hasher_sha256": None}
    for name in ("mass", "ppl_vs_dense", "needle_acc"):
        value = figures.get(name)
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = value, *((value - 0.01, value + 0.01) if value is not None else (None, None))
    return row


def test_summary_table_bolds_the_best_hash_per_budget_and_never_the_oracle():
    from spotlight_attn.eval.summary import summary_table

    rows = [_summary_row("kjv", "dense", None, ppl_vs_dense=0.0, needle_acc=0.9),
            _summary_row("kjv", "spotlight", 0.1, 128, ppl_vs_dense=0.03, mass=0.93, needle_acc=0.85),
            _summary_row("kjv", "linear1024", 0.1, 1024, ppl_vs_dense=0.04, mass=0.94),
            _summary_row("kjv", "oracle", 0.1, ppl_vs_dense=0.01, mass=0.96, needle_acc=0.95),
            _summary_row("kjv", "spotlight", 0.02, 128, ppl_vs_dense=0.25, mass=0.80),
            _summary_row("kjv", "linear1024", 0.02, 1024, ppl_vs_dense=0.20, mass=0.80)]
    lines = summary_table(rows).split("\n")
    assert lines[0] == ("|  | dense | spotlight-128 10% | SimHash-1024 10% | oracle 10% | spotlight-128 2% | SimHash-1024 2% |")
    cells = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert cells["perplexity vs dense, kjv"] == ["-", "**+3.00%** [+2.00, +4.00]", "+4.00% [+3.00, +5.00]", "+1.00% [+0.00, +2.00]",
                                                 "+25.00% [+24.00, +26.00]", "**+20.00%** [+19.00, +21.00]"]
    assert cells["attention-mass recall, kjv"] == ["-", "0.930 [0.920, 0.940]", "**0.940** [0.930, 0.950]", "0.960 [0.950, 0.970]",
                                                   "**0.800** [0.790, 0.810]", "**0.800** [0.790, 0.810]"]  # a tie: both bold
    assert cells["needle accuracy, kjv"] == ["90.0% [89.0, 91.0]", "**85.0%** [84.0, 86.0]", "-", "95.0% [94.0, 96.0]", "-", "-"]
    with pytest.raises(SpotlightError, match="no rows"):
        summary_table([])


def _results_md():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "results_md.py"
    spec = importlib.util.spec_from_file_location("results_md", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_replaces_only_the_marked_block_and_refuses_a_document_without_markers():
    results_md = _results_md()
    rows = [_summary_row("kjv", "spotlight", 0.1, 128, mass=0.93)]
    doc = f"# Results\n\nbefore\n{results_md.BEGIN}\nold table\n{results_md.END}\nafter\n"
    new = results_md.render(doc, rows)
    assert new.startswith("# Results\n\nbefore\n") and new.endswith(f"{results_md.END}\nafter\n")
    assert "old table" not in new and "| attention-mass recall, kjv | - | **0.930** [0.920, 0.940] |" in new  # the only hash: the best
    assert results_md.render(new, rows) == new  # idempotent
    for broken in ("no markers", f"{results_md.END}\n{results_md.BEGIN}", doc + results_md.BEGIN):
        with pytest.raises(SpotlightError, match="marker lines"):
            results_md.render(broken, rows)


def test_results_md_builds_the_summary_from_a_run_folder_or_writes_nothing(tmp_path):
    from spotlight_attn.eval.stats import summarize

    results_md = _results_md()
    run, meta = tmp_path / "run", {"model": "tiny", "hashers": {"h.safetensors": "cd" * 32}, "hasher_bits": {"h.safetensors": 128}}
    for folder in ("quality", "mass", "select"):
        (run / folder).mkdir(parents=True)
    (run / "select" / "best.txt").write_text("long2 /root/hashers/long2.fp16.safetensors\n")
    tokens = [40, 40]
    for domain in ("kjv", "perl-docs"):
        ppl = summarize({"kind": "ppl", "meta": dict(meta, data=domain), "rows": [
            {"method": "dense", "budget": None, "ppl": math.exp(1.0), "chunk_nll": [40.0, 40.0], "chunk_tokens": tokens},
            {"method": "spotlight", "budget": 0.1, "ppl": math.exp(1.05), "chunk_nll": [42.0, 42.0], "chunk_tokens": tokens}]})
        (run / "quality" / f"ppl_{domain}.json").write_text(json.dumps(ppl))
        for name, method, mass in (("linear1024", "linear1024", [0.90, 0.92]), ("long2", "spotlight", [0.93, 0.95])):
            retrieval = {"kind": "retrieval", "meta": dict(meta, data=domain), "rows": [
                {"context": 64, "method": method, "budget": 0.1, "iou": 0.5, "mass": sum(mass) / 2, "chunk_mass": mass}]}
            (run / "mass" / f"{domain}_{name}.json").write_text(json.dumps(retrieval))
    summary = tmp_path / "quality_summary.json"
    kept = [_summary_row("stdlib", "spotlight", 0.1, 128, mass=0.5)]
    summary.write_text(json.dumps(kept))
    (run / "mass" / "perl-docs_long2.json").rename(tmp_path / "aside.json")
    with pytest.raises(SpotlightError, match="perl-docs_long2.json; nothing written"):
        results_md.build(run, summary)
    assert json.loads(summary.read_text()) == kept
    (tmp_path / "aside.json").rename(run / "mass" / "perl-docs_long2.json")
    assert results_md.build(run, summary) == ["kjv", "perl-docs"]  # no needle file: no needle domain
    rows = {(r["domain"], r["method"], r["budget"]): r for r in json.loads(summary.read_text())}
    assert rows["stdlib", "spotlight", 0.1]["mass"] == 0.5  # another domain's row kept
    learned = rows["kjv", "spotlight", 0.1]
    assert learned["mass"] == pytest.approx(0.94) and learned["ppl_vs_dense"] == pytest.approx(math.exp(0.05) - 1)
    assert rows["perl-docs", "linear1024", 0.1]["mass"] == pytest.approx(0.91)


def test_the_results_document_table_is_the_quality_summary():
    """docs/RESULTS.md's headline table is what benchmarks/results_md.py writes from quality_summary.json."""
    results_md = _results_md()
    root = __import__("pathlib").Path(__file__).parents[1]
    doc = (root / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    rows = json.loads((root / "docs" / "results" / "quality_summary.json").read_text(encoding="utf-8"))
    assert results_md.render(doc, rows) == doc, "run: python benchmarks/results_md.py"


def test_results_of_processes_split_by_method_merge_into_the_one_process_figures(tmp_path, capsys):
    model, methods = _setup()
    torch.manual_seed(4)
    chunks = torch.randint(3, 128, (3, 41))
    one = evaluate_ppl(model, methods, common.parse_methods("dense,oracle,linear32"), [0.2, 0.1], chunks, 9, progress=False)
    parts = [evaluate_ppl(model, methods, common.parse_methods(m), [0.2, 0.1], chunks, 9, progress=False)
             for m in ("oracle", "dense,linear32")]
    for part in parts:
        part["meta"]["seconds"] = 1.0
    merged = common.merge_results(parts)
    key = lambda r: (r["method"], r["budget"])  # noqa: E731
    assert sorted(map(key, merged["rows"]), key=repr) == sorted(map(key, one["rows"]), key=repr)
    for row in one["rows"]:
        twin = next(r for r in merged["rows"] if key(r) == key(row))
        for field in ("ppl", "ppl_lo", "ppl_hi", "ppl_vs_dense", "ppl_vs_dense_lo", "ppl_vs_dense_hi"):
            assert twin.get(field) == pytest.approx(row.get(field)), field
    assert "ppl_vs_dense" in next(r for r in merged["rows"] if r["method"] == "oracle")  # paired across the parts
    assert merged["meta"]["methods"] == ["oracle", "dense", "linear32"]

    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, parts):
        common.write_results(part, path)
    assert main(["report", *map(str, paths), "--merge", str(tmp_path / "all.json"), "--out", str(tmp_path)]) == 0
    assert len(common.read_results(tmp_path / "all.json")["rows"]) == len(one["rows"])

    with pytest.raises(SpotlightError, match="repeats method oracle"):
        common.merge_results([parts[0], parts[0]])
    other = evaluate_ppl(model, methods, common.parse_methods("dense"), [0.2], chunks[:2], 9, progress=False)
    with pytest.raises(SpotlightError, match="settings differ"):
        common.merge_results([parts[0], other])
    before = (tmp_path / "all.json").read_bytes()
    assert main(["report", str(paths[0]), str(paths[0]), "--merge", str(tmp_path / "all.json")]) != 0
    assert (tmp_path / "all.json").read_bytes() == before  # a refused merge leaves the old file alone
    assert "repeats method" in capsys.readouterr().err
