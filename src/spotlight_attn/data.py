"""Corpora for hash training and evaluation: documents -> fixed-length token chunks.

A data spec (`D` in the CLI) is one of
- a text file or a folder of text files (every file under it whose name ends in one of
  TEXT_SUFFIXES; one file = one document);
- a `.jsonl` file: one document per line, its `text` field;
- a `.parquet` file (needs pyarrow): one document per row of its `text` column;
- a built-in offline corpus that exists on any fresh machine:
    "stdlib"   the Python standard library's .py sources (sysconfig's `stdlib` path): code;
    "kjv"      the King James Bible, English prose: Debian's `bible-kjv-text`
               (read through its `bible` program; `apt-get install bible-kjv-text`);
    "licenses" the licence texts under /usr/share/common-licenses and Python's LICENSE: legal prose;
    "pydocs"   the Python reference docs' topics (the standard library's pydoc_data): technical prose
               with some code. The needle tasks' filler comes from the same text.

Splits are by document: a document's id (its path, or path:line) is hashed with the split seed,
and that hash alone decides whether the document is held out. Train and held-out chunks therefore
never share a document, whatever else is asked. Within a split the documents are shuffled with the
seed, joined with the tokenizer's EOS between them, and cut into `chunk_len` tokens (the tail that
does not fill a chunk is dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from spotlight_attn.errors import SpotlightError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".c", ".h", ".html")
Document = tuple[str, str]  # (id, text)


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        yield f"stdlib:{path.relative_to(root)}", path.read_text(encoding="utf-8", errors="replace")


def _kjv_documents() -> Iterator[Document]:
    """One document per book of the Bible, read with Debian's `bible` program."""
    program = shutil.which("bible")
    if program is None:
        raise SpotlightError("corpus 'kjv' needs Debian's bible-kjv-text: apt-get install bible-kjv-text")
    text = subprocess.run(
        [program, "-l0", "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    ).stdout
    # The program prints "<Book> <chapter>" headers (e.g. "1 Samuel 3"), then indented verses.
    book, lines = None, []
    for line in text.splitlines():
        words = line.split()
        if words and not line.startswith(" ") and words[-1].isdigit() and len(words) >= 2:
            if " ".join(words[:-1]) != book:
                if book is not None:
                    yield f"kjv:{book}", "\n".join(lines).strip() + "\n"
                book, lines = " ".join(words[:-1]), []
        lines.append(line)
    if book is not None:
        yield f"kjv:{book}", "\n".join(lines).strip() + "\n"


def _license_documents() -> Iterator[Document]:
    paths = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file() and not p.is_symlink())
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    for path in paths + ([python_license] if python_license.is_file() else []):
        yield f"license:{path.name}", path.read_text(encoding="utf-8", errors="replace")


def _pydocs_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SpotlightError("the 'pydocs' corpus needs the standard library module pydoc_data") from None
    for name in sorted(topics):
        yield f"pydocs:{name}", topics[name]


BUILTIN = {"stdlib": _stdlib_documents, "kjv": _kjv_documents, "licenses": _license_documents, "pydocs": _pydocs_documents}


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
    """(id, text) for every document of a data spec (see the module docstring)."""
    if str(spec) in BUILTIN:
        yield from BUILTIN[str(spec)]()
        return
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


def default_split(spec: str | os.PathLike) -> str:
    """The split an evaluation reads by default: "heldout" for a built-in corpus (its train split is what
    `spotlight train` reads), "all" for a user's own files (a single document would otherwise land
    wholly in one split, most likely train, and leave nothing to evaluate)."""
    return "heldout" if str(spec) in BUILTIN else "all"


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
    held out is never in "train", and the other way round.
    """
    if split not in ("train", "heldout", "all"):
        raise SpotlightError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    docs = [
        (doc_id, text)
        for doc_id, text in iter_documents(spec)
        if text.strip() and (split == "all" or is_heldout(doc_id, heldout_fraction, seed) == (split == "heldout"))
    ]
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    wanted = None if num_chunks is None else num_chunks * chunk_len
    for _, text in docs:
        tokens.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            tokens.append(eos)
        if wanted is not None and len(tokens) >= wanted:
            break
    n = len(tokens) // chunk_len if wanted is None else min(len(tokens) // chunk_len, num_chunks)
    if n == 0:
        hint = " (the held-out split holds ~5% of the documents; --split all reads every one)" if split == "heldout" else ""
        raise SpotlightError(
            f"data {str(spec)!r} ({split} split) holds {len(tokens)} tokens, fewer than one chunk of {chunk_len}{hint}"
        )
    return torch.tensor(tokens[: n * chunk_len], dtype=torch.int64).view(n, chunk_len)  # [N, chunk_len]


def chunks_fingerprint(chunks: torch.Tensor) -> str:
    """A short digest of token chunks and their shape (the same tokens cut 2 x 4096 or 4 x 2048 are
    different contexts): recordings and resumed runs check they see the same data."""
    digest = hashlib.sha256(repr(tuple(chunks.shape)).encode())
    digest.update(chunks.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
