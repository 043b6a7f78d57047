"""Data specs -> documents, and the split rule (see the package docstring)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterator

from spotlight_attn.data.builtin import BUILTIN, Document
from spotlight_attn.errors import SpotlightError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".c", ".h", ".html")
PACKED_SUFFIX = ".safetensors"
SPLITS = ("train", "heldout", "all")


def packed_path(spec: str | os.PathLike) -> tuple[Path, tuple[str, ...]] | None:
    """(file, chosen sources) when `spec` names a packed token file ("corpus.safetensors", or
    "corpus.safetensors#go,rust" for some of its sources), else None."""
    text = str(spec)
    file, _, sources = text.partition("#") if PACKED_SUFFIX + "#" in text else (text, "", "")
    if not file.endswith(PACKED_SUFFIX):
        return None
    return Path(file).expanduser(), tuple(s.strip() for s in sources.split(",") if s.strip())


def _file_documents(path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record.get("text"), str):
                        raise SpotlightError(f"{path}:{i + 1} has no string 'text' field")
                    yield f"{path}:{i}", record["text"]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SpotlightError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path, columns=["text"])
        except Exception as error:  # pyarrow raises several kinds (no such column, not a parquet file)
            raise SpotlightError(f"{path}: cannot read a 'text' column from this parquet file ({error})") from None
        for i, text in enumerate(table.column("text").to_pylist()):
            yield f"{path}:{i}", text or ""
    else:
        yield str(path), path.read_text(encoding="utf-8", errors="replace")


def iter_documents(spec: str | os.PathLike) -> Iterator[Document]:
    """(id, text) for every document of a data spec (see the package docstring)."""
    if str(spec) in BUILTIN:
        yield from BUILTIN[str(spec)]()
        return
    if packed_path(spec) is not None:
        raise SpotlightError(f"{spec} is a packed token file: it holds token chunks (load_chunks reads it), not documents")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet"))
        if not files:
            raise SpotlightError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet)")
        for file in files:
            yield from _file_documents(file)
    elif path.is_file():
        yield from _file_documents(path)
    else:
        raise SpotlightError(f"data {str(spec)!r} is neither a file, a folder, nor a built-in corpus ({', '.join(BUILTIN)})")


def is_heldout(doc_id: str, heldout_fraction: float, seed: int = 0) -> bool:
    """Whether a document belongs to the held-out split: a pure function of (id, fraction, seed)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise SpotlightError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def split_documents(spec: str | os.PathLike, split: str = "train", heldout_fraction: float = 0.05, seed: int = 0) -> list[Document]:
    """The non-empty documents of one split of a data spec, in the seeded order they are tokenised in."""
    check_split(split)
    docs = [
        (doc_id, text)
        for doc_id, text in iter_documents(spec)
        if text.strip() and (split == "all" or is_heldout(doc_id, heldout_fraction, seed) == (split == "heldout"))
    ]
    random.Random(seed).shuffle(docs)
    return docs


def default_split(spec: str | os.PathLike) -> str:
    """The split an evaluation reads by default: "heldout" for a built-in corpus (its train split is what
    `spotlight train` reads), "all" for a user's own files (a single document would otherwise land
    wholly in one split, most likely train, and leave nothing to evaluate), and for a packed token
    file the one split it holds."""
    packed = packed_path(spec)
    if packed is not None:
        from spotlight_attn.data.packed import read_header

        return read_header(packed[0])["split"]
    return "heldout" if str(spec) in BUILTIN else "all"
