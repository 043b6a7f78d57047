"""`spotlight train`: stream a model over a corpus and train a hasher on its queries and keys.

    spotlight train --model smollm2-135m --data stdlib --out hasher.safetensors [--bits 128]
        [--placement shared|asymmetric] [--budget 0.1] [--steps 400] [--chunks 8] [--chunk-len 4096]
        [--batch-chunks N] [--epochs 1] [--checkpoint-every 10] [--dtype auto]

One frozen forward per batch of chunks trains every layer's hash; nothing is recorded to disk.
Re-running the same command resumes from the last checkpoint (every --checkpoint-every batches).
Data-parallel: `torchrun --nproc_per_node N $(which spotlight) train ...` (each rank forwards its
share of every batch; --batch-chunks defaults to N, one chunk per rank).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a learned hasher for a model", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local HF folder, .gguf file, or smollm2-135m")
    parser.add_argument("--data", required=True, nargs="+",
                        help="text file/folder, .jsonl, .parquet, or stdlib|kjv|licenses|pydocs; several mix domains (--chunks from each)")
    parser.add_argument("--out", required=True, type=Path, help="hasher file to write (and resume from)")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--placement", choices=("shared", "asymmetric"), default="shared")
    parser.add_argument("--width", type=int, default=64, help="hidden width of each residual MLP block")
    parser.add_argument("--depth", type=int, default=2, help="residual MLP blocks per head")
    parser.add_argument("--budget", type=float, default=0.1, help="training budget: fraction of the past in the true set")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per layer in all, spread over the batches")
    parser.add_argument("--chunks", type=int, default=8, help="training chunks to read from each --data source")
    parser.add_argument("--batch-chunks", type=int, default=None,
                        help="chunks per frozen forward and optimiser step, all ranks together (default: the number of ranks)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the chunks, each in a fresh seeded order")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="batches between checkpoints (a killed run loses at most these)")
    parser.add_argument("--chunk-len", type=int, default=4096, help="tokens per chunk: train at the context lengths you serve")
    parser.add_argument("--queries", type=int, default=128, help="query positions sampled per step")
    parser.add_argument("--top", type=int, default=32, help="true-top keys sampled per query")
    parser.add_argument("--others", type=int, default=64, help="other keys sampled per query (half near the boundary)")
    parser.add_argument("--mass-weight", type=float, default=0.5, help="0..1: weight pairs by the attention mass a swap loses")
    parser.add_argument("--listwise", type=float, default=1.0,
                        help="0..1: weight of the listwise loss (KL from the attention to the draft's softmax) beside the pairwise one "
                             "(default: the listwise loss alone, which trained the shipped hasher; 0: the pairwise loss alone)")
    parser.add_argument("--list-scale", type=float, default=2.0,
                        help="sharpness of the listwise loss's softmax over the standardised draft (2 measured better than 4 and 8)")
    parser.add_argument("--list-power", type=float, default=1.0,
                        help="the listwise target is the attention to this power, renormalised (< 1 flattens it; 1: the attention)")
    parser.add_argument("--straight-through", action="store_true", help="hard codes forward, soft gradient backward")
    parser.add_argument("--gain", type=float, default=8.0, help="soft-sign gain g in s = g h / (1 + |g h|) (8 measured better than 64)")
    parser.add_argument("--min-position", type=int, default=None,
                        help="sampled training queries see at least this many keys (default: a quarter of --chunk-len)")
    parser.add_argument("--dense-layers", default="0,1", metavar="I,J",
                        help="layers left without a hash (they read every key); the rest are trained (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator if any)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="the frozen model's dtype (default: bfloat16 on CUDA, float32 on the CPU); the hash trains in float32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 avoids oversubscription on busy machines)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="unused: the trainer streams and records nothing (kept so older command lines still run)")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    import torch

    from spotlight_attn.cli.main import parse_layers
    from spotlight_attn.errors import SpotlightError
    from spotlight_attn.hashing import load_hasher
    from spotlight_attn.train import PairSampling, train_hasher

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_dir is not None:
        print("spotlight train: --cache-dir is no longer used (nothing is recorded to disk)", file=sys.stderr)
    sampling = PairSampling(
        num_queries=args.queries, num_top=args.top, num_other=args.others, num_hard=args.others // 2,
        mass_weight=args.mass_weight, straight_through=args.straight_through, gain=args.gain,
        listwise=args.listwise, list_scale=args.list_scale, list_power=args.list_power,
        min_position=args.chunk_len // 4 if args.min_position is None else args.min_position,
    )
    dense_layers = parse_layers(args.dense_layers, "--dense-layers")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: data parallel over the chunks of each batch (see train/trainer.py)
        import torch.distributed as dist

        on_cuda = torch.cuda.is_available() and args.device in (None, "cuda")
        if on_cuda:  # one GPU per rank: rank r of a node trains on cuda:LOCAL_RANK
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:
                raise SpotlightError(
                    f"torchrun started rank {local_rank} on a node with {gpus} GPU(s): use --nproc_per_node {gpus} "
                    "or less, or --device cpu (ranks on the CPU use gloo)"
                )
            args.device = f"cuda:{local_rank}"
            torch.cuda.set_device(torch.device(args.device))
        dist.init_process_group("nccl" if on_cuda else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    start = time.perf_counter()
    try:
        out = train_hasher(
            args.model, args.data, args.out, bits=args.bits, placement=args.placement, budget=args.budget, steps=args.steps,
            width=args.width, depth=args.depth, chunk_len=args.chunk_len, num_chunks=args.chunks, device=args.device,
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), seed=args.seed, sampling=sampling,
            batch_chunks=args.batch_chunks or world, epochs=args.epochs, checkpoint_every=args.checkpoint_every,
            progress=_printer(start) if rank == 0 else False, dense_layers=dense_layers,
        )
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    hasher = load_hasher(out, hasher_geometry(out))
    print(f"wrote {out} ({len(hasher.layers)} layers, {hasher.bits} bits) in {time.perf_counter() - start:.0f} s")
    return 0


def _printer(start: float, every_s: float = 10.0):
    """A progress callback that prints a line to stderr at most every `every_s` seconds, and after the last batch."""
    last = [-every_s]

    def show(p) -> None:
        now = time.perf_counter() - start
        if now - last[0] < every_s and p.batches_done < p.batches:
            return
        last[0] = now
        print(f"spotlight train: batch {p.batches_done}/{p.batches}, {p.tokens_per_s:,.0f} tokens/s, "
              f"ETA {_duration(p.eta_s)}, loss {p.loss:.4f}, mis-order {p.misorder:.3f}",
              file=sys.stderr, flush=True)

    return show


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def hasher_geometry(path):
    from spotlight_attn.hashing import read_header
    from spotlight_attn.models import ModelGeometry

    return ModelGeometry(**read_header(path)["model"])
