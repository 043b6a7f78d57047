"""Per-layer hash trainer: one layer's hash at a time, on that layer's recorded queries and keys.

- AdamW (lr 1e-3, betas (0.9, 0.98), weight decay 0.1), linear warmup then cosine decay, gradient
  clipping at 1.0: the reference recipe.
- Seeded and deterministic on the CPU: a layer's initial weights come from the hasher seed (the
  same whether or not earlier layers were trained in this run), its sampling from (seed, layer).
- Resumable: the checkpoint at `out` is rewritten atomically after each finished layer, with the
  training settings, the data fingerprint and the finished layers in its header. A new run with the
  same settings skips finished layers; a killed run loses at most the layer in progress. A
  checkpoint with other settings, another model or corrupt contents is refused, never overwritten.
- Layer-parallel: under torchrun (torch.distributed initialised, world > 1) each rank records a
  share of the chunks, trains layers[rank::world] into `out.rank{r}`, and rank 0 merges them into `out`.
- TrainConfig (config.py) holds every setting that decides the weights; it is written to the header.
- Logs: one JSONL file per layer (`<out stem>.logs/layer007.jsonl`), a line every `log_every` steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from spotlight_attn.config import TrainConfig  # re-exported here
from spotlight_attn.errors import CheckpointError, SpotlightError
from spotlight_attn.hashing.checkpoint import check_geometry, load_hasher, read_header, save_hasher
from spotlight_attn.hashing.hasher import MLPHasher
from spotlight_attn.identity import identity_matches, model_identity
from spotlight_attn.models import ModelGeometry
from spotlight_attn.train.loss import ranking_loss, sample_pairs
from spotlight_attn.train.record import load_layer, qk_folder, record_qk

log = logging.getLogger(__name__)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over max(1, warmup * steps) steps, then cosine decay to 0 at `steps`."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _bank_names(hasher: MLPHasher, layer: int) -> list[str]:
    return [name for name in (f"k{layer}", f"q{layer}") if name in hasher.banks]


def train_one_layer(
    hasher: MLPHasher, layer: int, queries: torch.Tensor, keys: torch.Tensor, config: TrainConfig, scaling: float,
    device: torch.device, log_path: Path | None = None, progress=None,
) -> dict:
    """Train the hash of `layer` in place on queries [N, Hq, L, D], keys [N, Hkv, L, D]. Returns final stats."""
    banks = [hasher.banks[name] for name in _bank_names(hasher, layer)]
    params = [p for bank in banks for p in bank.parameters()]
    for bank in banks:
        bank.to(device).train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)
    budget, sampling = config.budget_spec, config.sampling
    log = log_path.open("w") if log_path is not None else None
    ema_loss = ema_wrong = None
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            n = int(torch.randint(queries.shape[0], (1,), generator=generator))
            q, k = queries[n].to(device, torch.float32), keys[n].to(device, torch.float32)  # [Hq, L, D], [Hkv, L, D]
            with torch.no_grad():
                pairs = sample_pairs(q, k, budget, sampling, scaling, generator)
            loss, wrong = ranking_loss(hasher, layer, q, k, pairs, sampling)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            schedule.step()
            loss_v, wrong_v = float(loss.detach()), float(wrong)
            ema_loss = loss_v if ema_loss is None else 0.95 * ema_loss + 0.05 * loss_v
            ema_wrong = wrong_v if ema_wrong is None else 0.95 * ema_wrong + 0.05 * wrong_v
            if log is not None and (step % 10 == 0 or step == config.steps - 1):
                record = {"layer": layer, "step": step, "loss": loss_v, "misorder": wrong_v, "grad_norm": float(grad_norm),
                          "lr": schedule.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 3)}
                log.write(json.dumps(record) + "\n")
                log.flush()
            if progress is not None:
                progress.set_postfix(layer=layer, loss=f"{ema_loss:.4f}", misorder=f"{ema_wrong:.3f}", refresh=False)
                progress.update(1)
    finally:
        if log is not None:
            log.close()
    for bank in banks:
        bank.to("cpu").eval()
    return {"loss": ema_loss, "misorder": ema_wrong, "seconds": round(time.perf_counter() - start, 2)}


def _training_header(config: TrainConfig, data_id: str, finished: dict) -> dict:
    return {"config": config.to_dict(), "data": data_id, "finished_layers": sorted(int(i) for i in finished),
            "layer_stats": {str(i): s for i, s in sorted(finished.items())}}


def _resume(out: Path, geometry: ModelGeometry, config: TrainConfig, data_id: str, hasher: MLPHasher) -> dict:
    """Copy the finished layers of an earlier run at `out` into `hasher`; refuse a checkpoint of another run."""
    if not out.exists():
        return {}
    try:
        header = read_header(out)
        check_geometry(header["model"], geometry, str(out))
        previous = header["training"]
        if previous.get("config") != config.to_dict():
            old, new = previous.get("config") or {}, config.to_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(f"{out} was trained with other settings ({', '.join(diff)} differ)")
        if previous.get("data") != data_id:
            raise CheckpointError(f"{out} was trained on other data ({previous.get('data')!r}, now {data_id!r})")
        if not identity_matches(header["identity"], hasher.identity):
            raise CheckpointError(f"{out} was trained for another model of this geometry (model identity {header['identity']['digest']})")
        saved = load_hasher(out, geometry)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}. Delete it or choose another --out to start over.") from None
    finished = {int(i): s for i, s in previous.get("layer_stats", {}).items()}
    state = saved.state_dict()
    with torch.no_grad():
        for layer in finished:
            for name in _bank_names(hasher, layer):
                for key, tensor in hasher.banks[name].state_dict().items():
                    tensor.copy_(state[f"banks.{name}.{key}"])
    return finished


def train_layers(
    geometry: ModelGeometry, folder: Path, num_chunks: int, config: TrainConfig, out: str | os.PathLike, data_id: str,
    layers: list[int] | None = None, device: torch.device | str = "cpu", progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None, log_dir: str | os.PathLike | None = None,
    identity: dict | None = None,
) -> Path:
    """Train the hashes of `layers` (default: every layer not in dense_layers) from recorded q/k; resume from `out`.
    `identity` (identity.model_identity of the recorded model) goes into the file's header."""
    out, device = Path(out), torch.device(device)
    sparse = [i for i in range(geometry.num_layers) if i not in config.dense_layers]
    layers = sparse if layers is None else list(layers)
    hasher = MLPHasher(geometry, config.hasher_config, layers=sparse, seed=config.seed)
    hasher.identity = identity
    finished = _resume(out, geometry, config, data_id, hasher)
    todo = [i for i in layers if i not in finished]
    log_dir = Path(log_dir) if log_dir is not None else out.parent / f"{out.stem}.logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    scaling = geometry.head_dim**-0.5
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps * len(todo), desc=f"train {out.name}", unit="step", disable=not progress)
    try:
        for layer in todo:
            queries, keys = load_layer(folder, layer, num_chunks)  # [N, Hq, L, D], [N, Hkv, L, D] float16
            stats = train_one_layer(hasher, layer, queries, keys, config, scaling, device, log_dir / f"layer{layer:03d}.jsonl", bar)
            finished[layer] = stats
            save_hasher(hasher, out, training=_training_header(config, data_id, finished))
            if on_layer_done is not None:
                on_layer_done(layer)
    finally:
        bar.close()
    if not todo:  # nothing left: make sure the file exists (e.g. zero layers asked)
        save_hasher(hasher, out, training=_training_header(config, data_id, finished))
    return out


def _merge(out: Path, parts: list[Path], geometry: ModelGeometry, config: TrainConfig, data_id: str, identity: dict | None) -> None:
    """Rank 0: merge the per-rank checkpoints (each holding its own finished layers) into `out`."""
    sparse = [i for i in range(geometry.num_layers) if i not in config.dense_layers]
    hasher = MLPHasher(geometry, config.hasher_config, layers=sparse, seed=config.seed)
    hasher.identity = identity
    finished = {}
    for part in parts:
        finished.update(_resume(part, geometry, config, data_id, hasher))
    save_hasher(hasher, out, training=_training_header(config, data_id, finished))


def train_hasher(
    model_spec, data, out: str | os.PathLike, bits: int = 128, placement: str = "shared", budget: float = 0.1,
    steps: int = 300, chunk_len: int = 2048, num_chunks: int = 32, cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None, progress: bool = True, config: TrainConfig | None = None,
    on_layer_done: Callable[[int], None] | None = None, **overrides,
) -> Path:
    """Record q/k for `data` with `model_spec` and train a hasher into `out`. Returns `out`.

    model_spec: a model spec for load_model, or an already loaded model (its tokenizer is needed only
    when `data` is text). data: a data spec (see data.py; its train split is used), a list of specs
    (`num_chunks` chunks from each, in order: e.g. code and prose, so the hash does not learn one
    domain only), or token chunks [N, L] int64. `overrides` set other TrainConfig fields; `config`
    replaces them all.
    """
    import torch.distributed as dist

    from spotlight_attn.data import chunks_fingerprint, load_chunks
    from spotlight_attn.models import default_device, load_model

    config = config or TrainConfig(bits=bits, placement=placement, budget=budget, steps=steps, **overrides)
    tokenizer = None
    if isinstance(model_spec, (str, os.PathLike)):
        model, tokenizer = load_model(model_spec, device=device)
    elif isinstance(model_spec, tuple):
        model, tokenizer = model_spec
    else:
        model = model_spec
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device)
    geometry = ModelGeometry.from_model(model)
    identity = model_identity(model)
    if isinstance(data, torch.Tensor):
        chunks = data.to(torch.int64)
    else:
        if tokenizer is None:
            raise SpotlightError("text data needs a tokenizer: pass a model spec or (model, tokenizer)")
        specs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        chunks = torch.cat([load_chunks(spec, tokenizer, chunk_len, num_chunks, split="train", seed=config.seed) for spec in specs])
    data_id = f"{chunks_fingerprint(chunks)}:{chunks.shape[0]}x{chunks.shape[1]}"  # shape repeated, readable in the header
    folder = qk_folder(model, chunks, cache_dir)

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    record_qk(model, chunks, folder, progress=progress and rank == 0, indices=list(range(rank, chunks.shape[0], world)))
    out = Path(out)
    if not distributed:
        log.info("training layers on %s", device)
        return train_layers(geometry, folder, chunks.shape[0], config, out, data_id, device=device, progress=progress,
                            on_layer_done=on_layer_done, identity=identity)
    dist.barrier()  # every chunk recorded
    sparse = [i for i in range(geometry.num_layers) if i not in config.dense_layers]
    part = out.with_name(f"{out.name}.rank{rank}")
    log.info("rank %d of %d trains layers %s on %s", rank, world, sparse[rank::world], device)
    train_layers(geometry, folder, chunks.shape[0], config, part, data_id, layers=sparse[rank::world], device=device,
                 progress=progress and rank == 0, on_layer_done=on_layer_done, log_dir=out.parent / f"{out.stem}.logs",
                 identity=identity)
    dist.barrier()  # every rank's layers written
    if rank == 0:
        _merge(out, [out.with_name(f"{out.name}.rank{r}") for r in range(world)], geometry, config, data_id, identity)
    dist.barrier()
    return out
