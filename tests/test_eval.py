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
    assert main(["report", str(out)]) == 0
    assert png.is_file() and "| linear32 | 20% |" in capsys.readouterr().out


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


def test_builtin_corpora_stay_held_out_by_default():
    from spotlight_attn.data import BUILTIN, default_split

    assert {default_split(name) for name in BUILTIN} == {"heldout"}
    assert default_split("my_book.txt") == "all"
