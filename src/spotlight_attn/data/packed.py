"""Packed token files: the chunks of several sources, tokenised once, readable where the text is not.

A packed file is safetensors: one tensor per source, [chunks, chunk_len] token ids (uint16 when the
vocabulary fits in 16 bits, else int32), and a header (safetensors metadata, str -> str) of
    format "spotlight-chunks", version "1",
    tokenizer         JSON {name, vocab_size, eos_token_id, digest} (tokenizer_identity),
    model             the model spec it was packed with (informational),
    chunk_len, split, seed, heldout_fraction: the arguments load_chunks was given,
    sources           JSON [{name, documents, documents_used, chunks}] in the file's order: the
                      documents of the split, those with tokens in the chunks (fewer when the chunks
                      were capped), and the chunks.
Reading checks the tokenizer's digest, chunk_len, split, seed and heldout fraction against what is
asked and refuses a file that differs in any, naming each difference: the ids would be other words,
other contexts, or documents of the other split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from spotlight_attn.errors import SpotlightError

logger = logging.getLogger(__name__)
FORMAT, VERSION = "spotlight-chunks", 1
# Text whose tokenisation joins the vocabulary in the digest: it exercises the normaliser, the
# pre-tokeniser and the merges (code, prose, digits, whitespace runs, accents, CJK, an emoji).
PROBE = "def f(x):\n    return x ** 2  # square\n\nThe naïve café's 3.14159 × 2 — 日本語 🙂\t\tend.  "


def tokenizer_identity(tokenizer, eos_token_id: int | None = None) -> dict:
    """{name, vocab_size, eos_token_id, digest}: the digest covers the vocabulary, the eos id and the
    ids of PROBE, so the same tokenizer matches wherever it was loaded from (the name is for messages).
    `eos_token_id` replaces the tokenizer's own in the digest (check_header's EOS-only comparison)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    digest.update(json.dumps([eos, tokenizer(PROBE, add_special_tokens=False)["input_ids"]]).encode())
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    return {"name": name, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "digest": digest.hexdigest()[:16]}


def write_packed(path: str | os.PathLike, sources: dict[str, torch.Tensor], header: dict) -> Path:
    """Write {source: chunks [N, chunk_len] int} and `header` (the module docstring's fields, less
    format and version) atomically: a reader sees the old file or the new one, never a part."""
    from safetensors.torch import save_file

    from spotlight_attn.hashing.checkpoint import atomic_write

    vocab = header["tokenizer"]["vocab_size"]
    dtype = torch.uint16 if vocab <= 2**16 else torch.int32
    tensors = {name: chunks.to(torch.int32).to(dtype).contiguous() for name, chunks in sources.items()}
    metadata = {"format": FORMAT, "version": str(VERSION)}
    metadata.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in header.items()})
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The parsed header of a packed file; SpotlightError when the file is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpotlightError(f"packed token file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own errors for a truncated or foreign file
        raise SpotlightError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise SpotlightError(f"{path} is not a packed token file (its header has no format {FORMAT!r}; `spotlight data pack` writes them)")
    if metadata.get("version") != str(VERSION):
        raise SpotlightError(f"{path} is packed in format version {metadata.get('version')}, this library reads {VERSION}")
    header = {key: json.loads(value) if key in ("tokenizer", "chunk_len", "seed", "heldout_fraction", "sources") else value
              for key, value in metadata.items()}
    return header


def check_header(path, header: dict, tokenizer, chunk_len: int, split: str, heldout_fraction: float, seed: int) -> None:
    """Refuse a packed file made for another tokenizer, chunk length, split, seed or held-out fraction."""
    recorded, actual = header["tokenizer"], tokenizer_identity(tokenizer)
    problems = []
    if recorded["digest"] != actual["digest"]:
        if tokenizer_identity(tokenizer, recorded["eos_token_id"])["digest"] == recorded["digest"]:
            # Same vocabulary and tokenisation, another EOS id: transformers 5.17 loads SmolLM2's GGUF with EOS 1
            # (<|im_start|>), 5.24 with 2 (<|im_end|>). The ids in the file mean the same tokens to the model; only
            # the separator between documents is the packer's EOS, not this tokenizer's.
            logger.warning("%s: packed with EOS id %s between documents, the tokenizer given has EOS id %s (same vocabulary "
                           "and tokenisation): the ids are read as packed", path, recorded["eos_token_id"], actual["eos_token_id"])
        else:
            problems.append(
                f"tokenizer: packed with {recorded['name']} (vocab {recorded['vocab_size']}, digest {recorded['digest']}), "
                f"given {actual['name']} (vocab {actual['vocab_size']}, digest {actual['digest']})"
            )
    for name, asked in (("chunk_len", chunk_len), ("split", split), ("seed", seed), ("heldout_fraction", heldout_fraction)):
        if header[name] != asked:
            problems.append(f"{name}: packed {header[name]!r}, asked {asked!r}")
    if problems:
        raise SpotlightError(
            f"{path} does not hold the data asked for ({'; '.join(problems)}): ask for what it holds, or pack it again "
            "(`spotlight data pack`) with these settings"
        )


def read_packed(path, tokenizer, chunk_len: int, split: str, heldout_fraction: float, seed: int,
                sources: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The chunks of each chosen source (all when `sources` is empty), [N_s, chunk_len] int64, in the
    file's order, after check_header."""
    from safetensors import safe_open

    header = read_header(path)
    check_header(path, header, tokenizer, chunk_len, split, heldout_fraction, seed)
    names = [source["name"] for source in header["sources"]]
    unknown = [s for s in sources if s not in names]
    if unknown:
        raise SpotlightError(f"{path} holds no source {', '.join(map(repr, unknown))}; it holds {', '.join(names)}")
    with safe_open(str(path), framework="pt") as f:
        return [f.get_tensor(name).to(torch.int64) for name in (sources or names)]
