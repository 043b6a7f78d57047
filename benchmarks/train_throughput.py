"""Throughput of the streaming hash trainer on a random-weight model of a real shape (speed does not depend on values).

    PYTHONPATH=src python benchmarks/train_throughput.py                      # CUDA, Llama-3-8B shape, 8192-token chunks
    PYTHONPATH=src python benchmarks/train_throughput.py --device cpu --shape smollm2-135m --chunk-len 256 --threads 1   # CPU smoke

Builds the model of `--shape` (decode_bench.SHAPES, transformers' LlamaConfig, random init, bfloat16
on CUDA), feeds random token chunks, and runs the trainer (train.stream_train) exactly as `spotlight
train` does, with the CLI's sampling defaults: `--warmup` batches, then `--batches` timed batches
(wall clock from the end of the warm-up to the end of the last batch, device synchronised; the
run's one checkpoint, written after the last batch, is inside the timed span). Also times
`--batches` bare forwards of the same batches (no training) to split the time. Reports training
tokens/s (tokens the frozen model reads per second, each training every layer's hash),
peak device memory (torch.cuda.max_memory_allocated) and the projected time for `--sequences` x
`--seq-len` tokens at the measured rate (attention cost grows with the chunk length, so project from
a run at that length). Prints a table last; appends a JSON row to OUT/train_throughput.jsonl.
The default run (1 + 8 batches of 8192 tokens, 8B shape) takes about a minute on one H200 after the model is built.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import torch

from spotlight_attn.config import PairSampling, TrainConfig
from spotlight_attn.decode_bench import SHAPES, build_model
from spotlight_attn.models import resolve_device
from spotlight_attn.train import stream_train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="the frozen model's dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--chunk-len", type=int, default=8192, help="tokens per chunk (default: %(default)s)")
    parser.add_argument("--batch-chunks", type=int, default=1, help="chunks per forward (default: %(default)s)")
    parser.add_argument("--steps-per-batch", type=int, default=1, help="optimiser steps per layer per batch (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="hidden width of the hash MLP (default: %(default)s, the CLI's)")
    parser.add_argument("--queries", type=int, default=128, help="query positions per step (default: %(default)s, the CLI's)")
    parser.add_argument("--sequences", type=int, default=7000, help="projection: sequences (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=8192, help="projection: tokens per sequence (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 on a busy machine: OpenMP oversubscription)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"), help="folder for train_throughput.jsonl")
    args = parser.parse_args(argv)
    for name in ("chunk_len", "batch_chunks", "steps_per_batch", "batches", "sequences", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # refuses a device this machine lacks, in one line
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {args.shape} (random weights, {dtype}) on {device} ({name}); torch {torch.__version__}", flush=True)

    start = time.perf_counter()
    model = build_model(shape, args.chunk_len, device, dtype)
    print(f"# model built in {time.perf_counter() - start:.1f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    total = args.warmup + args.batches
    chunks = torch.randint(0, shape.vocab, (total * args.batch_chunks, args.chunk_len), generator=torch.Generator().manual_seed(0))
    sampling = PairSampling(num_queries=args.queries, num_top=32, num_other=64, num_hard=32, mass_weight=0.5, gain=8.0,
                            min_position=args.chunk_len // 4)
    config = TrainConfig(bits=args.bits, width=args.width, steps=total * args.steps_per_batch, batch_chunks=args.batch_chunks,
                         sampling=sampling)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    marks: dict[int, float] = {}

    def on_batch(progress) -> None:
        _sync(device)
        marks[progress.batches_done] = time.perf_counter()
        print(f"batch {progress.batches_done}/{progress.batches}: {time.perf_counter() - run_start:.1f} s into the run, "
              f"loss {progress.loss:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:  # a fresh run every time: nothing to resume
        run_start = time.perf_counter()
        stream_train(model, chunks, config, pathlib.Path(tmp) / "hasher.safetensors", "random", checkpoint_every=total,
                     progress=on_batch)
    train_s = marks[total] - marks.get(args.warmup, run_start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    forward_s = []  # the same batches without the hook: the frozen model's share of the time
    with torch.no_grad():
        for batch in range(args.warmup, total):
            ids = chunks[batch * args.batch_chunks : (batch + 1) * args.batch_chunks].to(device)
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync(device)
            forward_s.append(time.perf_counter() - t0)
    forward_s.sort()

    tokens = args.batches * args.batch_chunks * args.chunk_len
    tokens_per_s = tokens / train_s
    projected_s = args.sequences * args.seq_len / tokens_per_s
    trained_layers = shape.layers - len(config.dense_layers)
    row = {
        "shape": args.shape, "device": name, "dtype": str(dtype).removeprefix("torch."), "chunk_len": args.chunk_len,
        "batch_chunks": args.batch_chunks, "steps_per_batch": args.steps_per_batch, "trained_layers": trained_layers,
        "bits": args.bits, "width": args.width, "queries": args.queries, "warmup_batches": args.warmup, "timed_batches": args.batches,
        "tokens_per_s": round(tokens_per_s, 1), "s_per_batch": round(train_s / args.batches, 4),
        "forward_s_median": round(forward_s[len(forward_s) // 2], 4), "peak_gib": None if peak is None else round(peak, 2),
        "sequences": args.sequences, "seq_len": args.seq_len, "projected_s": round(projected_s), "projected_h": round(projected_s / 3600, 2),
        "torch": torch.__version__, "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train_throughput.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")

    batch_s, fwd = train_s / args.batches, row["forward_s_median"]
    print(f"\nwrote a row to {args.out / 'train_throughput.jsonl'}")
    print(f"{'shape':13s} {'device':24s} {'chunk':>6s} {'B':>3s} {'st/b':>4s} {'tok/s':>9s} {'s/batch':>8s} {'fwd s':>7s} "
          f"{'hash s':>7s} {'peakGiB':>7s} {'projected':>10s}")
    print(f"{args.shape:13s} {name[:24]:24s} {args.chunk_len:6d} {args.batch_chunks:3d} {args.steps_per_batch:4d} "
          f"{tokens_per_s:9.1f} {batch_s:8.3f} {fwd:7.3f} {batch_s - fwd:7.3f} {'-' if peak is None else f'{peak:.2f}':>7s} "
          f"{projected_s / 3600:9.2f}h")
    steps = args.sequences * args.seq_len // (args.batch_chunks * args.chunk_len) * args.steps_per_batch
    print(f"projected: {args.sequences} x {args.seq_len} tokens at {tokens_per_s:,.0f} tokens/s = {projected_s / 3600:.2f} h "
          f"({trained_layers} layers x {steps} steps each; target <= 2 h on one H200)")
    if args.chunk_len != args.seq_len:
        print(f"note: measured on {args.chunk_len}-token chunks; attention grows with length, so time --chunk-len {args.seq_len} to project")
    return 0


if __name__ == "__main__":
    sys.exit(main())
