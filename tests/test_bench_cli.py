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
