"""`spotlight data`: the corpora there are, and packed token files for machines without them.

    spotlight data list [--model M]                      built-in corpora: installed?, documents, text, tokens
    spotlight data pack --model M --data stdlib,go,... --out corpus.safetensors
        [--chunk-len 8192] [--split train] [--chunks N] [--seed 0] [--heldout-fraction 0.05]
    spotlight data show corpus.safetensors               what a packed file holds

A packed file is a data spec wherever one is taken (`spotlight train --data corpus.safetensors`,
`spotlight eval ppl --data corpus.safetensors`, or `corpus.safetensors#go,rust` for some of its
sources); it is refused for another tokenizer, chunk length, split, seed or held-out fraction.
Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROGRESS_SECONDS = 5.0


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", parents=list(parents), help="list the built-in corpora; pack token files",
                                   description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    def split_args(sub) -> None:
        sub.add_argument("--heldout-fraction", type=float, default=0.05, help="documents held out (default: %(default)s)")
        sub.add_argument("--seed", type=int, default=0, help="split and order seed (default: %(default)s)")

    show = kinds.add_parser("list", parents=list(parents), help="each built-in corpus: installed?, documents, text size, tokens")
    show.add_argument("--model", help="count tokens with this model's tokenizer (local HF folder, .gguf, smollm2-135m)")
    show.add_argument("--only", metavar="A,B", help="comma-separated corpora to list (default: all)")
    split_args(show)
    show.set_defaults(run=run_list)

    pack = kinds.add_parser("pack", parents=list(parents), help="tokenise data specs into one packed .safetensors file")
    pack.add_argument("--model", required=True, help="whose tokenizer: local HF folder, .gguf file, or smollm2-135m")
    pack.add_argument("--data", required=True, help="comma-separated data specs (built-in names, files, folders)")
    pack.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    pack.add_argument("--chunk-len", type=int, default=8192, help="tokens per chunk (default: %(default)s)")
    pack.add_argument("--split", choices=("train", "heldout", "all"), default="train", help="(default: %(default)s)")
    pack.add_argument("--chunks", type=int, default=None, metavar="N", help="at most N chunks from each spec (default: all)")
    split_args(pack)
    pack.set_defaults(run=run_pack)

    info = kinds.add_parser("show", parents=list(parents), help="the header and sources of a packed file")
    info.add_argument("file", type=Path)
    info.set_defaults(run=run_show)
    return parser


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from spotlight_attn.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(spec))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _printer(prog: str):
    """A TokenizeProgress callback: a line to stderr at most every PROGRESS_SECONDS, and at each source's end."""
    last = {"at": -PROGRESS_SECONDS, "source": None}

    def show(p) -> None:
        now = time.perf_counter()
        if p.documents_done == 0:
            print(f"{prog}: {p.source}: {p.documents:,} documents, {p.chars / 1e6:,.1f} M characters to tokenise",
                  file=sys.stderr, flush=True)
            last["at"] = now
            return
        finished = p.documents_done == p.documents or (p.tokens_wanted is not None and p.tokens >= p.tokens_wanted)
        if now - last["at"] < PROGRESS_SECONDS and not finished:
            return
        last["at"] = now
        rate = p.tokens / max(p.seconds, 1e-9)
        eta = (p.chars - p.chars_done) * p.seconds / max(p.chars_done, 1)
        if p.tokens_wanted is not None:
            eta = min(eta, (p.tokens_wanted - p.tokens) / max(rate, 1e-9))
        tail = f"done in {_duration(p.seconds)}" if finished else f"ETA {_duration(max(eta, 0.0))} for this source"
        print(f"{prog}: {p.source}: {p.documents_done:,}/{p.documents:,} documents, {p.tokens:,} tokens, "
              f"{rate:,.0f} tokens/s, {tail}", file=sys.stderr, flush=True)

    return show


def run_list(args) -> int:
    from spotlight_attn.data import ABOUT, BUILTIN, is_heldout, iter_documents, tokenize_documents
    from spotlight_attn.errors import SpotlightError

    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(BUILTIN)
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise SpotlightError(f"no built-in corpus {', '.join(map(repr, unknown))}; built-in: {', '.join(BUILTIN)}")
    tokenizer = load_tokenizer(args.model) if args.model else None
    progress = _printer("spotlight data list")
    head = f"{'corpus':<14} {'documents':>9} {'held out':>8} {'MB text':>8}" + (f" {'tokens':>12} {'held out':>10}" if tokenizer else "")
    rows = [head]
    for name in names:
        try:
            docs = [(doc_id, text) for doc_id, text in iter_documents(name) if text.strip()]
        except SpotlightError as error:
            rows.append(f"{name:<14} not installed: {error}")
            continue
        held = [is_heldout(doc_id, args.heldout_fraction, args.seed) for doc_id, _ in docs]
        row = f"{name:<14} {len(docs):>9,} {sum(held):>8,} {sum(len(t.encode()) for _, t in docs) / 1e6:>8.1f}"
        if tokenizer is not None:
            heldout = [d for d, h in zip(docs, held) if h]
            train = [d for d, h in zip(docs, held) if not h]
            train_tokens = len(tokenize_documents(train, tokenizer, source=f"{name} (train)", progress=progress)[0])
            heldout_tokens = len(tokenize_documents(heldout, tokenizer, source=f"{name} (held out)")[0])
            row += f" {train_tokens + heldout_tokens:>12,} {heldout_tokens:>10,}"
        rows.append(f"{row}   {ABOUT[name]}")
    print("\n".join(rows), flush=True)
    return 0


def run_pack(args) -> int:
    from spotlight_attn.data import pack_chunks
    from spotlight_attn.errors import SpotlightError

    if args.out.suffix != ".safetensors":
        raise SpotlightError(f"--out must name a .safetensors file, got {args.out}")
    if args.chunk_len < 1 or (args.chunks is not None and args.chunks < 1):
        raise SpotlightError("--chunk-len and --chunks must be positive")
    specs = [s.strip() for s in args.data.split(",") if s.strip()]
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    header = pack_chunks(specs, tokenizer, args.chunk_len, args.out, num_chunks=args.chunks, split=args.split,
                         heldout_fraction=args.heldout_fraction, seed=args.seed, model=args.model,
                         progress=_printer("spotlight data pack"))
    _print_header(args.out, header)
    print(f"wrote {args.out} in {_duration(time.perf_counter() - started)}", flush=True)
    return 0


def _print_header(path: Path, header: dict) -> None:
    tokenizer = header["tokenizer"]
    print(f"{path}: {path.stat().st_size / 2**20:,.1f} MiB, split {header['split']!r}, chunk_len {header['chunk_len']}, "
          f"seed {header['seed']}, held-out fraction {header['heldout_fraction']}, tokenizer {tokenizer['name']} "
          f"(vocab {tokenizer['vocab_size']}, digest {tokenizer['digest']}), model {header.get('model') or '?'}")
    print(f"{'source':<14} {'documents':>9} {'used':>9} {'chunks':>7} {'tokens':>12}")
    for s in header["sources"]:
        print(f"{s['name']:<14} {s['documents']:>9,} {s['documents_used']:>9,} {s['chunks']:>7,} {s['chunks'] * header['chunk_len']:>12,}")
    total = sum(s["chunks"] for s in header["sources"])
    print(f"{'total':<14} {sum(s['documents'] for s in header['sources']):>9,} "
          f"{sum(s['documents_used'] for s in header['sources']):>9,} {total:>7,} {total * header['chunk_len']:>12,}")


def run_show(args) -> int:
    from spotlight_attn.data import read_packed_header

    _print_header(args.file, read_packed_header(args.file))
    return 0
