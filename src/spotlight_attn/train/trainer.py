"""Streaming hash trainer: one frozen forward per batch of chunks trains every layer's hash on that batch.

- The model reads `batch_chunks` chunks at once through the library's dense attention path with a
  recorder hook (record.recording). When layer l's post-RoPE q/k arrive, layer l's hash takes its
  optimiser steps on them and they are dropped; then the forward goes on to layer l+1. Memory: the
  model, one layer's q/k of one batch (float32 copies for the loss), and every layer's hash with its
  AdamW moments. Disk: the checkpoints only.
- Steps: `steps` per layer in all, spread evenly over the batches (`epochs` passes over the chunks,
  each in a seeded order, floor(N / batch_chunks) batches a pass; a remainder is left out of that
  pass). A step: per chunk of the batch, sample pairs and back-propagate loss / batch_chunks; clip
  the layer's gradient norm; AdamW. The reference recipe: AdamW (lr 1e-3, betas (0.9, 0.98),
  weight decay 0.1), linear warmup then cosine decay over the total steps, clipping at 1.0.
- Seeded: a layer's initial weights come from the hasher seed; the pairs of (layer, step, chunk) from a
  generator seeded by those numbers, on the training device. Same seed, same hasher on the CPU, bit for
  bit, resumed or not; a data-parallel run samples the pairs of a one-process run.
- Resumable: a checkpoint every `checkpoint_every` batches and at the end (state.py); a killed run
  loses the batches since the last one. A checkpoint of other settings is refused, never overwritten.
- Data parallel: under torchrun (torch.distributed initialised, world > 1) rank r forwards chunks
  r::world of each batch; one all-reduce per (layer, step) sums the gradients and loss statistics, so
  every rank takes the same step. Rank 0 writes checkpoints and logs.
- Logs: one JSONL file per layer (`<out stem>.logs/layer007.jsonl`), a line every 10 steps;
  progress (tokens/s, ETA) through `logging` and the `progress` callback. The library prints nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from spotlight_attn.config import TrainConfig  # re-exported here
from spotlight_attn.errors import SpotlightError
from spotlight_attn.hashing.hasher import MLPHasher
from spotlight_attn.identity import model_identity
from spotlight_attn.models import ModelGeometry
from spotlight_attn.train.layer import LayerTrainer
from spotlight_attn.train.record import recording
from spotlight_attn.train.state import find_resume, save_checkpoint, training_header

log = logging.getLogger(__name__)
LOG_SECONDS = 10.0  # at most one INFO progress line per this many seconds (and the last batch)


def batch_plan(num_chunks: int, config: TrainConfig) -> list[list[int]]:
    """Chunk indices of every batch of the run, in order: `epochs` seeded permutations cut into full batches."""
    per_epoch = num_chunks // config.batch_chunks
    if per_epoch == 0:
        raise SpotlightError(f"batch_chunks {config.batch_chunks} is more than the {num_chunks} training chunks")
    plan = []
    for epoch in range(config.epochs):
        order = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)).tolist()
        plan += [order[i * config.batch_chunks : (i + 1) * config.batch_chunks] for i in range(per_epoch)]
    if config.steps < len(plan):
        raise SpotlightError(f"steps {config.steps} is fewer than the {len(plan)} batches: every batch needs a step "
                             "(raise steps, or lower epochs or the chunk count, or raise batch_chunks)")
    return plan


def first_step(batch: int, batches: int, steps: int) -> int:
    """Steps of every layer before batch `batch` (batch `batches` gives the total)."""
    return batch * steps // batches


@dataclass
class Progress:
    """Where a run stands after a batch (passed to the `progress` callback)."""

    batches_done: int
    batches: int
    batches_this_run: int  # batches done by this process's run (a resumed run started later)
    tokens: int  # tokens the model read in this process's run, all ranks together
    seconds: float  # since this process's run started
    loss: float  # smoothed over steps, mean of the trained layers
    misorder: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def eta_s(self) -> float:
        return (self.batches - self.batches_done) * self.seconds / max(self.batches_this_run, 1)


def stream_train(
    model, chunks: torch.Tensor, config: TrainConfig, out: Path, data_id: str, layers: list[int] | None = None,
    checkpoint_every: int = 10, progress: bool | Callable[[Progress], None] = True,
    on_batch_done: Callable[[int], None] | None = None,
) -> Path:
    """Train the hashes of `layers` (default: every layer not in dense_layers) of `model` on chunks [N, L]
    int64 into `out`, resuming an earlier run of the same settings there. Returns `out`.

    checkpoint_every: batches between checkpoints (the last batch always writes one). progress: False,
    True (INFO log lines), or a callable taking a Progress after every batch (rank 0). on_batch_done:
    called with the batches done after each batch and its checkpoint (tests use it to kill a run)."""
    device = next(model.parameters()).device
    geometry = ModelGeometry.from_model(model)
    identity = model_identity(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise SpotlightError(f"checkpoint_every must be an int >= 1 (batches), got {checkpoint_every!r}")
    if config.batch_chunks % world:
        raise SpotlightError(f"batch_chunks {config.batch_chunks} must be a multiple of the {world} ranks "
                             "(each rank forwards an equal share of every batch)")
    sparse = [i for i in range(geometry.num_layers) if i not in config.dense_layers]
    layers = sparse if layers is None else sorted(int(i) for i in layers)
    if set(layers) - set(sparse):
        raise SpotlightError(f"layers {sorted(set(layers) - set(sparse))} are dense or outside the model's {geometry.num_layers} layers")
    plan = batch_plan(chunks.shape[0], config)
    hasher = MLPHasher(geometry, config.hasher_config, layers=sparse, seed=config.seed).to(device)
    hasher.identity = identity
    trainers = {layer: LayerTrainer(hasher, layer, config, device) for layer in layers}
    resumed = find_resume(out, geometry, config, data_id, layers, identity)
    done = resumed.batches_done if resumed is not None else 0
    if resumed is not None and resumed.tensors is None:
        log.info("%s is complete (%d batches): nothing to do", out, done)
        return out
    if resumed is not None:
        resumed.restore(hasher, {layer: t.optimizer for layer, t in trainers.items()})
        for layer, t in trainers.items():
            saved = resumed.header["layer_stats"][str(layer)]
            t.ema = torch.tensor([saved["loss"], saved["misorder"]], device=device)
        log.info("resuming %s after batch %d of %d", out, done, len(plan))
    if rank == 0:
        log_dir = out.parent / f"{out.stem}.logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for layer, t in trainers.items():
            t.open_log(log_dir / f"layer{layer:03d}.jsonl", first_step(done, len(plan), config.steps))
    scaling = geometry.head_dim**-0.5
    current: dict = {}

    def recorder(layer_idx, query, key, attention_mask):
        trainer = trainers.get(layer_idx)
        if trainer is not None:
            with torch.enable_grad():  # the frozen forward runs under no_grad; the hash's step needs autograd
                trainer.steps(query, key, **current)

    def header(batches_done: int) -> dict:
        return training_header(config, data_id, layers, batches_done, len(plan), {i: t.stats() for i, t in trainers.items()}, world)

    start, last_log, length = time.perf_counter(), 0.0, chunks.shape[1]
    try:
        with recording(model, recorder):
            for batch in range(done, len(plan)):
                chunk_ids = plan[batch][rank::world]
                first = first_step(batch, len(plan), config.steps)
                current.update(chunk_ids=chunk_ids, first=first, count=first_step(batch + 1, len(plan), config.steps) - first,
                               total_chunks=len(plan[batch]), total_steps=config.steps, scaling=scaling)
                with torch.no_grad():
                    model(input_ids=chunks[chunk_ids].to(device), use_cache=False, logits_to_keep=1)
                finished = batch + 1
                if rank == 0 and (finished % checkpoint_every == 0 or finished == len(plan)):
                    save_checkpoint(out, hasher, {i: t.optimizer for i, t in trainers.items()}, header(finished))
                if rank == 0 and progress:
                    stats = [t.stats() for t in trainers.values()] or [{"loss": float("nan"), "misorder": float("nan")}]
                    now = Progress(finished, len(plan), finished - done, (finished - done) * config.batch_chunks * length,
                                   time.perf_counter() - start, sum(s["loss"] for s in stats) / len(stats),
                                   sum(s["misorder"] for s in stats) / len(stats))
                    if callable(progress):
                        progress(now)
                    if now.seconds - last_log >= LOG_SECONDS or finished == len(plan):
                        last_log = now.seconds
                        log.info("batch %d/%d: %.0f tokens/s, ETA %.0f s, loss %.4f, mis-order %.3f", finished, len(plan),
                                 now.tokens_per_s, now.eta_s, now.loss, now.misorder)
                if on_batch_done is not None:
                    on_batch_done(finished)
    finally:
        for t in trainers.values():
            if t.log_file is not None:
                t.log_file.close()
    if world > 1:
        dist.barrier()  # rank 0's final checkpoint is written before any rank returns
    return out


def train_hasher(
    model_spec, data, out: str | os.PathLike, bits: int = 128, placement: str = "shared", budget: float = 0.1,
    steps: int = 300, chunk_len: int = 2048, num_chunks: int = 32, device: str | torch.device | None = None,
    dtype: torch.dtype | None = None, progress: bool | Callable[[Progress], None] = True, config: TrainConfig | None = None,
    layers: list[int] | None = None, checkpoint_every: int = 10, on_batch_done: Callable[[int], None] | None = None,
    **overrides,
) -> Path:
    """Train a hasher for `data` with `model_spec` into `out`, streaming (stream_train). Returns `out`.

    model_spec: a model spec for load_model (loaded in `dtype`: default bfloat16 on CUDA, float32
    elsewhere), (model, tokenizer), or a loaded model (its tokenizer is needed only when `data` is
    text). data: a data spec (see data.py; its train split is used), a list of specs (`num_chunks`
    chunks from each, e.g. code and prose, so the hash does not learn one domain only), or token
    chunks [N, L] int64. `overrides` set other TrainConfig fields; `config` replaces them all.
    Under torchrun every rank calls this with the same arguments (see stream_train).
    """
    from spotlight_attn.data import chunks_fingerprint, load_chunks
    from spotlight_attn.models import load_model, resolve_device

    if config is not None and overrides:
        raise SpotlightError(f"pass either config or TrainConfig fields, not both (got config and {', '.join(sorted(overrides))})")
    config = config or TrainConfig(bits=bits, placement=placement, budget=budget, steps=steps, **overrides)
    device = resolve_device(device)
    tokenizer = None
    if isinstance(model_spec, (str, os.PathLike)):
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, tokenizer = load_model(model_spec, device=device, dtype=dtype)
    elif isinstance(model_spec, tuple):
        model, tokenizer = model_spec
    else:
        model = model_spec
    model = model.to(device)
    if isinstance(data, torch.Tensor):
        chunks = data.to(torch.int64)
    else:
        if tokenizer is None:
            raise SpotlightError("text data needs a tokenizer: pass a model spec or (model, tokenizer)")
        specs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        chunks = torch.cat([load_chunks(spec, tokenizer, chunk_len, num_chunks, split="train", seed=config.seed) for spec in specs])
    data_id = f"{chunks_fingerprint(chunks)}:{chunks.shape[0]}x{chunks.shape[1]}"  # shape repeated, readable in the header
    if dist.is_initialized() and dist.get_world_size() > 1:
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, data_id)
        if len(set(seen)) > 1:
            raise SpotlightError(f"the ranks loaded different training data ({', '.join(seen)}): give every rank the same data")
    log.info("streaming training on %s: %d chunks of %d tokens, %d per batch, %d epoch(s)", device, chunks.shape[0],
             chunks.shape[1], config.batch_chunks, config.epochs)
    return stream_train(model, chunks, config, Path(out), data_id, layers=layers, checkpoint_every=checkpoint_every,
                        progress=progress, on_batch_done=on_batch_done)
