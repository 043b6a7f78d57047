"""Record each layer's post-RoPE queries and keys while the frozen model reads corpus chunks.

Recording goes through the library's own attention path: `enable(model, None, dense)` (or the
setting already installed) plus the `recorder` hook, called on every attention call with
query [B, Hq, S, D] and key [B, Hkv, T, D] after RoPE. No model code is copied. `recording()`
installs a hook for the length of a `with` block; the streaming trainer (trainer.py) trains each
layer inside its hook, so nothing is kept.

`record_qk` spills to disk for the evaluation (metrics.evaluate_retrieval), which scores one layer
at a time over every chunk, against several selectors: each chunk's q/k (all layers, float16) go
to `chunk{n:05d}.safetensors`, and `load_layer` reads only one layer's tensors back. Peak memory is
one chunk of all layers while recording (SmolLM2-135M, 2K tokens: 95 MB a chunk), one layer of all
chunks after. Shards already present with the right fingerprint are reused, so an interrupted
recording resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spotlight_attn.config import SpotlightConfig
from spotlight_attn.data import chunks_fingerprint
from spotlight_attn.hashing.checkpoint import atomic_write
from spotlight_attn.models import ModelGeometry, default_cache_dir


def model_fingerprint(model) -> str:
    geometry = ModelGeometry.from_model(model)
    name = getattr(model.config, "_name_or_path", "") or ""
    first = next(model.parameters())
    return json.dumps({"geometry": geometry.to_dict(), "name": name, "p0": float(first.detach().float().sum())}, sort_keys=True)


def qk_folder(model, chunks: torch.Tensor, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the q/k shards of `model` over `chunks` [N, L] live: <cache>/qk/<digest of weights and tokens>."""
    key = hashlib.sha256((model_fingerprint(model) + chunks_fingerprint(chunks)).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "qk" / key


def _shard_path(folder: Path, n: int) -> Path:
    return folder / f"chunk{n:05d}.safetensors"


def _shard_ok(path: Path, meta: dict) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() == meta
    except (SafetensorError, OSError, ValueError):
        return False


@contextmanager
def recording(model, recorder: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]):
    """Within the block, every attention call of `model` first calls recorder(layer_idx, query
    [B, Hq, S, D], key [B, Hkv, T, D], attention_mask) with post-RoPE tensors. Installs dense
    attention if nothing is installed, and leaves the model as it found it."""
    from spotlight_attn.attention import disable, enable

    installed_before = getattr(model, "spotlight", None)
    if installed_before is None:
        enable(model, None, SpotlightConfig(method="dense"))
    previous_recorder = model.spotlight.recorder
    model.spotlight.recorder = recorder
    try:
        yield
    finally:
        model.spotlight.recorder = previous_recorder
        if installed_before is None:
            disable(model)


def record_qk(model, chunks: torch.Tensor, folder: str | os.PathLike, dtype: torch.dtype = torch.float16, progress: bool = True) -> Path:
    """Run `model` over chunks [N, L] int64 and write one q/k shard per chunk under `folder`.

    Shard n holds, for every layer l, `q{l}` [Hq, L, D] and `k{l}` [Hkv, L, D] in `dtype`.
    Returns the folder. Shards that already match (same chunk tokens, same model) are kept.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model_id = model_fingerprint(model)
    todo = []
    for n in range(chunks.shape[0]):
        meta = {"model": model_id, "chunk": chunks_fingerprint(chunks[n : n + 1]), "dtype": str(dtype)}
        if not _shard_ok(_shard_path(folder, n), meta):
            todo.append((n, meta))
    if not todo:
        return folder
    captured: dict[str, torch.Tensor] = {}

    def recorder(layer_idx, query, key, attention_mask):
        captured[f"q{layer_idx}"] = query[0].detach().to("cpu", dtype).contiguous()  # [Hq, L, D]
        captured[f"k{layer_idx}"] = key[0].detach().to("cpu", dtype).contiguous()  # [Hkv, L, D]

    from tqdm.auto import tqdm

    with recording(model, recorder):
        for n, meta in tqdm(todo, desc="record q/k", unit="chunk", disable=not progress):
            captured.clear()
            with torch.no_grad():
                model(input_ids=chunks[n : n + 1].to(device), use_cache=False, logits_to_keep=1)
            tensors = dict(captured)
            atomic_write(_shard_path(folder, n), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return folder


def load_layer(folder: str | os.PathLike, layer: int, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of the first `num_chunks` shards: (q [N, Hq, L, D], k [N, Hkv, L, D]) in the stored dtype."""
    folder = Path(folder)
    qs, ks = [], []
    for n in range(num_chunks):
        with safe_open(str(_shard_path(folder, n)), framework="pt") as f:
            qs.append(f.get_tensor(f"q{layer}"))
            ks.append(f.get_tensor(f"k{layer}"))
    return torch.stack(qs), torch.stack(ks)
