"""`spotlight bench` argument parsing, and its clear refusal on a machine without a CUDA GPU."""

from __future__ import annotations

import argparse

import pytest
import torch

from spotlight_attn.cli import bench_cmd
from spotlight_attn.errors import SpotlightError


def parse(argv):
    parser = argparse.ArgumentParser(prog="spotlight")
    bench_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_token_lists():
    assert bench_cmd.parse_tokens("32K, 128k,1M,4096") == [32768, 131072, 1 << 20, 4096]
    with pytest.raises(SpotlightError, match="token count"):
        bench_cmd.parse_tokens("32Q")
    assert bench_cmd.parse_budgets("0.02,10%,512") == [0.02, 0.1, 512]
    with pytest.raises(SpotlightError):
        bench_cmd.parse_budgets("2.0")


def test_decode_options():
    args = parse(["bench", "decode", "--shape", "llama3-8b", "--context", "32K,128K", "--batch", "1,3,8", "--budget", "0.02,0.1"])
    assert args.run is bench_cmd.run_decode and args.baselines == "hf-static,dense" and args.hasher == "linear,mlp"
    args = parse(["bench", "decode", "--shape", "gpt5"])
    with pytest.raises(SpotlightError, match="unknown shape"):
        args.run(args)
    args = parse(["bench", "decode", "--baselines", "vllm"])
    with pytest.raises(SpotlightError, match="unknown baseline"):
        args.run(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("kind", ["retrieval", "attention", "decode"])
def test_without_gpu_a_clear_error(kind):
    args = parse(["bench", kind, "--context", "4K", "--batch", "1"])
    with pytest.raises(SpotlightError, match="CUDA GPU"):
        args.run(args)


def test_isolated_rows_run_one_process_each_and_share_the_dense_reference(monkeypatch):
    """`bench decode` measures each row in a child process (`--no-isolate`, one method) and merges
    them: x_dense of every row is against the faster dense row of its configuration."""
    import json
    import subprocess
    from pathlib import Path

    from spotlight_attn import decode_bench as db

    calls = []
    speed = {"hf-static": 10.0, "dense": 40.0, "linear": 120.0}

    def fake_run(argv, capture_output, text):
        calls.append(argv)
        opt = {argv[i]: argv[i + 1] for i in range(argv.index("decode") + 1, len(argv) - 1) if argv[i].startswith("--")}
        assert "--no-isolate" in argv and (opt["--hasher"] == "") != (opt["--baselines"] == "")
        method = opt["--baselines"] or opt["--hasher"]
        row = db.DecodeRow("gpu", "llama3-8b", int(opt["--context"]), int(opt["--batch"]), method,
                           "none" if opt["--baselines"] else method, None if opt["--baselines"] else 0.02,
                           speed[method], 1e3 / speed[method], floor_ms=1.0)
        Path(opt["--json"]).write_text(json.dumps(db.rows_as_dicts([row])))
        return subprocess.CompletedProcess(argv, 0, f"#   {method}: done\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    lines = []
    settings = db.Settings(budgets=[0.02], hashers=("linear",))
    rows = db.run_decode_bench(["llama3-8b"], [4096], [2], settings, log=lines.append, command="spotlight bench decode")
    assert len(calls) == 3 and [r.method for r in rows] == ["hf-static", "dense", "linear"]
    assert [round(r.x_dense, 3) for r in rows] == [0.25, 1.0, 3.0] and rows[2].x_floor == rows[2].ms_per_step
    assert all(r.command == "spotlight bench decode" for r in rows) and "#   linear: done" in lines

    def failing(argv, capture_output, text):
        return subprocess.CompletedProcess(argv, 1, "", "RuntimeError: boom")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(SpotlightError, match="boom"):
        db.run_decode_bench(["llama3-8b"], [4096], [2], settings, log=lines.append)


def test_bench_json_is_strict_json_with_null_for_figures_not_measured(tmp_path):
    import json

    from spotlight_attn.cli.bench_cmd import _write_json

    path = tmp_path / "rows.json"
    _write_json(path, [{"method": "spotlight", "x_dense": float("nan"), "ms_per_step": 9.3}])
    text = path.read_text()
    assert "NaN" not in text and json.loads(text) == [{"method": "spotlight", "x_dense": None, "ms_per_step": 9.3}]
    assert not list(tmp_path.glob("*.tmp"))
