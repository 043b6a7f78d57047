"""Documents -> fixed-length token chunks, and packing them into a file (see the package docstring)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from spotlight_attn.data import packed
from spotlight_attn.data.builtin import Document
from spotlight_attn.data.specs import check_split, packed_path, split_documents
from spotlight_attn.errors import SpotlightError

BATCH_CHARS = 1 << 20  # documents are tokenised in batches of about this many characters (the fast tokenizer's threads share one batch)


@dataclass(frozen=True, slots=True)
class TokenizeProgress:
    """Where tokenising one source stands (passed to a `progress` callback after every batch)."""

    source: str
    documents_done: int
    documents: int
    chars_done: int
    chars: int
    tokens: int
    tokens_wanted: int | None  # None: the whole split
    seconds: float


def tokenize_documents(
    docs: Sequence[Document], tokenizer, limit: int | None = None, source: str = "",
    progress: Callable[[TokenizeProgress], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T] int32 of the documents in order, each followed by the tokenizer's EOS; ends [D]
    int64, where each document read ends in them). Stops after the batch that reaches `limit` tokens
    (None: read them all), so D may be fewer than the documents given.
    `progress` is called once before the first batch (nothing done yet) and after every batch."""
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    total_chars = sum(len(text) for _, text in docs)
    tokens = chars = done = 0
    started = time.perf_counter()
    if progress is not None:
        progress(TokenizeProgress(source, 0, len(docs), 0, total_chars, 0, limit, 0.0))
    while done < len(docs) and (limit is None or tokens < limit):
        end, size = done, 0
        while end < len(docs) and (end == done or size < BATCH_CHARS):
            size += len(docs[end][1])
            end += 1
        for ids in tokenizer([text for _, text in docs[done:end]], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int32))
            tokens += len(parts[-1])
        done, chars = end, chars + size
        if progress is not None:
            progress(TokenizeProgress(source, done, len(docs), chars, total_chars, tokens, limit, time.perf_counter() - started))
    ends = np.cumsum([len(part) for part in parts], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), ends


def _cut(tokens: np.ndarray, chunk_len: int, num_chunks: int | None, spec, split: str) -> torch.Tensor:
    n = len(tokens) // chunk_len if num_chunks is None else min(len(tokens) // chunk_len, num_chunks)
    if n == 0:
        hint = " (the held-out split holds ~5% of the documents; --split all reads every one)" if split == "heldout" else ""
        raise SpotlightError(
            f"data {str(spec)!r} ({split} split) holds {len(tokens)} tokens, fewer than one chunk of {chunk_len}{hint}"
        )
    return torch.from_numpy(tokens[: n * chunk_len].astype(np.int64)).view(n, chunk_len)  # [N, chunk_len]


def interleave(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of several [N_s, L] tensors taken in turn (s0 row 0, s1 row 0, ..., s0 row 1, ...), a source
    dropping out once it is used up: any prefix mixes the sources as evenly as their sizes allow."""
    order = sorted((row, s) for s, chunks in enumerate(sources) for row in range(chunks.shape[0]))
    return torch.stack([sources[s][row] for row, s in order]) if order else torch.zeros(0, 0, dtype=torch.int64)


def load_chunks(
    spec: str | os.PathLike,
    tokenizer,
    chunk_len: int,
    num_chunks: int | None = None,
    split: str = "train",
    heldout_fraction: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """Token chunks [N, chunk_len] int64 of one split ("train", "heldout" or "all") of a data spec.

    Stops reading once `num_chunks` chunks are filled (None: the whole split). A document that is
    held out is never in "train", and the other way round. A packed file gives its sources' chunks
    interleaved (see `interleave`), after checking it was packed with this tokenizer, chunk_len,
    split, seed and held-out fraction.
    """
    check_split(split)
    packed_file = packed_path(spec)
    if packed_file is not None:
        path, sources = packed_file
        chunks = interleave(packed.read_packed(path, tokenizer, chunk_len, split, heldout_fraction, seed, sources))
        return chunks if num_chunks is None else chunks[:num_chunks]
    docs = split_documents(spec, split, heldout_fraction, seed)
    tokens, _ = tokenize_documents(docs, tokenizer, None if num_chunks is None else num_chunks * chunk_len)
    return _cut(tokens, chunk_len, num_chunks, spec, split)


def pack_chunks(
    specs: Sequence[str | os.PathLike],
    tokenizer,
    chunk_len: int,
    out: str | os.PathLike,
    num_chunks: int | None = None,
    split: str = "train",
    heldout_fraction: float = 0.05,
    seed: int = 0,
    model: str = "",
    progress: Callable[[TokenizeProgress], None] | None = None,
) -> dict:
    """Tokenise each spec's split as load_chunks would (`num_chunks` from each, None: all) and write
    the chunks to one packed file `out` (see packed.py), atomically. Returns its header, read back.
    load_chunks(out, ...) with the same settings then equals interleave([load_chunks(spec, ...) ...])."""
    check_split(split)
    names = [str(spec) for spec in specs]
    if not names or len(set(names)) < len(names) or any("#" in n or "," in n for n in names):
        raise SpotlightError(f"pack needs one or more distinct data specs without '#' or ',', got {names}")
    sources, records = {}, []
    for spec, name in zip(specs, names):
        docs = split_documents(spec, split, heldout_fraction, seed)
        limit = None if num_chunks is None else num_chunks * chunk_len
        tokens, ends = tokenize_documents(docs, tokenizer, limit, source=name, progress=progress)
        sources[name] = _cut(tokens, chunk_len, num_chunks, spec, split)
        kept = sources[name].numel()
        used = int(np.searchsorted(ends - np.diff(ends, prepend=0), kept))  # documents that start inside the chunks
        records.append({"name": name, "documents": len(docs), "documents_used": used, "chunks": sources[name].shape[0]})
    header = {"tokenizer": packed.tokenizer_identity(tokenizer), "model": model, "chunk_len": chunk_len, "split": split,
              "seed": seed, "heldout_fraction": heldout_fraction, "sources": records}
    return packed.read_header(packed.write_packed(Path(out), sources, header))


def chunks_fingerprint(chunks: torch.Tensor) -> str:
    """A short digest of token chunks and their shape (the same tokens cut 2 x 4096 or 4 x 2048 are
    different contexts): recordings and resumed runs check they see the same data."""
    digest = hashlib.sha256(repr(tuple(chunks.shape)).encode())
    digest.update(chunks.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
