"""Corpora for hash training and evaluation: documents -> fixed-length token chunks.

A data spec (`D` in the CLI) is one of
- a text file or a folder of text files (every file under it whose name ends in one of
  TEXT_SUFFIXES; one file = one document);
- a `.jsonl` file: one document per line, its `text` field;
- a `.parquet` file (needs pyarrow): one document per row of its `text` column;
- a packed token file (`.safetensors`, written by `pack_chunks` / `spotlight data pack`): token
  chunks tokenised elsewhere, for machines without the text; `FILE.safetensors#go,rust` reads
  some of its sources (packed.py describes the file and what loading it checks);
- a built-in offline corpus (builtin.py; docs/CORPORA.md gives each one's size in tokens):
    "stdlib"   the Python standard library's .py sources (sysconfig's `stdlib` path): code;
    "kjv"      the King James Bible, English prose: Debian's `bible-kjv-text`
               (read through its `bible` program; `apt-get install bible-kjv-text`);
    "licenses" the licence texts under /usr/share/common-licenses and Python's LICENSE: legal prose;
    "pydocs"   the Python reference docs' topics (the standard library's pydoc_data): technical prose
               with some code. The needle tasks' filler comes from the same text.
  and, each from the Debian packages named (`apt-get install ...`; missing ones raise an error
  that names them), one installed file = one document:
    "linux-doc"     the Linux kernel's Documentation/ tree, reST and plain text (linux-doc);
    "python-docs"   the Python documentation's reST sources (python3.X-doc, X this Python's);
    "debian-docs"   the Debian Administrator's Handbook (English HTML), Debian Reference, Policy and
                    Developer's Reference (debian-handbook debian-reference-en debian-policy
                    developers-reference);
    "manpages"      the Linux man-pages project, troff turned into text (manpages manpages-dev);
    "postgres-docs" the PostgreSQL manual, HTML turned into text (postgresql-doc);
    "perl-docs"     Perl's POD documentation (perl-doc);
    "git-docs"      git's AsciiDoc manual pages and guides (git-doc);
    "go"            the Go toolchain's and standard library's source, testdata and generated files
                    left out (golang-src);
    "rust"          the Rust standard library's and compiler's source, tests and generated files left
                    out (rust-src);
    "elisp"         GNU Emacs's Lisp source (emacs-el).
  markup.py turns .gz, HTML and troff into plain text.

Splits are by document: a document's id (its path, or path:line) is hashed with the split seed,
and that hash alone decides whether the document is held out. Train and held-out chunks therefore
never share a document, whatever else is asked. Within a split the documents are shuffled with the
seed, joined with the tokenizer's EOS between them, and cut into `chunk_len` tokens (the tail that
does not fill a chunk is dropped).
"""

from spotlight_attn.data.builtin import ABOUT, BUILTIN, PACKAGE_CORPORA, Document, PackageCorpus
from spotlight_attn.data.chunks import TokenizeProgress, chunks_fingerprint, interleave, load_chunks, pack_chunks, tokenize_documents
from spotlight_attn.data.packed import read_header as read_packed_header
from spotlight_attn.data.packed import tokenizer_identity
from spotlight_attn.data.specs import (
    SPLITS, TEXT_SUFFIXES, default_split, is_heldout, iter_documents, packed_path, split_documents,
)

__all__ = [
    "ABOUT", "BUILTIN", "PACKAGE_CORPORA", "SPLITS", "TEXT_SUFFIXES", "Document", "PackageCorpus", "TokenizeProgress",
    "chunks_fingerprint", "default_split", "interleave", "is_heldout", "iter_documents", "load_chunks", "pack_chunks",
    "packed_path", "read_packed_header", "split_documents", "tokenize_documents", "tokenizer_identity",
]
