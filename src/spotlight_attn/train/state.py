"""Checkpoints of a streaming training run: the hasher at `out`, and beside it what continuing needs.

Two files, each written atomically (hashing.checkpoint.atomic_write), with the same `training` header
(settings, data fingerprint, trained layers, batches done of batches in all, per-layer statistics):
- `out`: a hasher file like any other (load_hasher reads it at any point of the run).
- `<out stem>.state.safetensors`: the same weights (`hasher.<name>`) plus each trained layer's AdamW
  moments and step count (`adam.<layer>.<param index>.<exp_avg|exp_avg_sq|step>`). Written before
  `out`, so it is never the older of the two; deleted once the run is complete.
A run resumes from the state file (else finds `out` complete, or starts fresh), and refuses a file of
another run (settings, data, model, layers) or a corrupt one, naming what differs; it never overwrites it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spotlight_attn.config import TrainConfig
from spotlight_attn.errors import CheckpointError
from spotlight_attn.hashing.checkpoint import atomic_write, check_geometry, load_hasher, read_header, save_hasher
from spotlight_attn.hashing.hasher import MLPHasher
from spotlight_attn.identity import identity_matches
from spotlight_attn.models import ModelGeometry

STATE_FORMAT = "spotlight-attn/train-state"
STATE_VERSION = "1"
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def state_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.state.safetensors")


def training_header(config: TrainConfig, data_id: str, layers: list[int], batches_done: int, batches: int,
                    layer_stats: dict, world: int) -> dict:
    """The `training` header field. `finished_layers`: every trained layer once the run is complete, else none."""
    complete = batches_done == batches
    return {"config": config.to_dict(), "data": data_id, "layers": list(layers), "batches_done": batches_done,
            "batches": batches, "finished_layers": list(layers) if complete else [],
            "layer_stats": {str(i): s for i, s in sorted(layer_stats.items())}, "world": world}


def save_checkpoint(out: Path, hasher: MLPHasher, optimizers: dict[int, torch.optim.Optimizer], header: dict) -> None:
    """Write the state file (unless the run is complete), then `out`; a complete run's state file is removed."""
    state = state_path(out)
    complete = header["batches_done"] == header["batches"]
    if not complete:
        tensors = {f"hasher.{name}": t.detach().to("cpu").contiguous() for name, t in hasher.state_dict().items()}
        for layer, optimizer in optimizers.items():
            for i, param in enumerate(optimizer.param_groups[0]["params"]):
                for key in ADAM_KEYS:
                    value = optimizer.state[param][key]
                    tensors[f"adam.{layer}.{i}.{key}"] = value.detach().to("cpu").contiguous()
        metadata = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "training": json.dumps(header),
                    "model": json.dumps(hasher.geometry.to_dict()), "identity": json.dumps(getattr(hasher, "identity", None))}
        atomic_write(state, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    save_hasher(hasher, out, training=header)
    if complete:
        state.unlink(missing_ok=True)


@dataclass
class Resumed:
    header: dict  # the `training` header of the file resumed from
    tensors: dict[str, torch.Tensor] | None  # the state file's tensors; None when `out` is complete

    @property
    def batches_done(self) -> int:
        return int(self.header["batches_done"])

    def restore(self, hasher: MLPHasher, optimizers: dict[int, torch.optim.Optimizer]) -> None:
        """Load the saved weights into `hasher` and the saved moments into each layer's optimizer."""
        try:
            hasher.load_state_dict({name[len("hasher."):]: t for name, t in self.tensors.items() if name.startswith("hasher.")})
            for layer, optimizer in optimizers.items():
                saved = optimizer.state_dict()
                saved["state"] = {i: {key: self.tensors[f"adam.{layer}.{i}.{key}"] for key in ADAM_KEYS}
                                  for i in range(len(optimizer.param_groups[0]["params"]))}
                optimizer.load_state_dict(saved)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"cannot resume: the training state does not fit this run ({err})") from None


def _check_run(source: Path, header: dict, model: dict, identity, geometry: ModelGeometry, config: TrainConfig,
               data_id: str, layers: list[int], actual_identity) -> None:
    check_geometry(model, geometry, str(source))
    old, new = header.get("config") or {}, config.to_dict()
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CheckpointError(f"{source} was trained with other settings ({', '.join(diff)} differ)")
    if header.get("data") != data_id:
        raise CheckpointError(f"{source} was trained on other data ({header.get('data')!r}, now {data_id!r})")
    if header.get("layers") != list(layers):
        raise CheckpointError(f"{source} trains layers {header.get('layers')}, this run {list(layers)}")
    if not identity_matches(identity, actual_identity):
        raise CheckpointError(f"{source} was trained for another model of this geometry (model identity {identity['digest']})")


def _read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if (metadata.get("format"), metadata.get("format_version")) != (STATE_FORMAT, STATE_VERSION):
        raise CheckpointError(f"{path} is not a spotlight-attn training state, version {STATE_VERSION}")
    try:
        return {key: json.loads(metadata[key]) for key in ("training", "model", "identity")}, tensors
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a missing or corrupt header") from None


def find_resume(out: Path, geometry: ModelGeometry, config: TrainConfig, data_id: str, layers: list[int],
                identity) -> Resumed | None:
    """What an earlier run with these settings left at `out` (None: nothing; start fresh)."""
    state = state_path(out)
    try:
        if state.exists():
            meta, tensors = _read_state(state)
            _check_run(state, meta["training"], meta["model"], meta["identity"], geometry, config, data_id, layers, identity)
            return Resumed(meta["training"], tensors)
        if not out.exists():
            return None
        header = read_header(out)
        _check_run(out, header["training"], header["model"], header["identity"], geometry, config, data_id, layers, identity)
        training = header["training"]
        if training.get("batches_done") != training.get("batches"):
            raise CheckpointError(f"{out} is a partly trained run whose training state {state.name} is missing")
        load_hasher(out, geometry)  # complete: make sure its tensors read back
        return Resumed(training, None)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}. Delete it or choose another --out to start over.") from None
