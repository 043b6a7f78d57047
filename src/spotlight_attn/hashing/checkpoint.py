"""Hasher checkpoints: safetensors tensors + a JSON header, validated on load, written atomically.

Header (safetensors metadata, all strings):
  format          "spotlight-attn/hasher"
  format_version  "1"
  kind            "mlp" | "linear"
  model           JSON: family, num_layers, num_q_heads, num_kv_heads, head_dim (+ rope_theta, max_positions)
  hasher          JSON: HasherConfig (mlp) or {"bits", "seed"} (linear)
  layers          JSON list of the layer indices the hasher covers
  training        JSON: free-form training settings and results (may be {})
  identity        JSON: the weights' fingerprint of the model it was trained for (identity.py), or null;
                  optional (files written before it existed are checked by geometry alone)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spotlight_attn.config import HasherConfig
from spotlight_attn.errors import CheckpointError, HasherMismatchError
from spotlight_attn.hashing.hasher import LinearHasher, MLPHasher
from spotlight_attn.identity import TOLERANCE, identity_difference, model_identity
from spotlight_attn.models import ModelGeometry

FORMAT = "spotlight-attn/hasher"
FORMAT_VERSION = "1"
CHECKED_FIELDS = ("family", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")


def _geometry_of(model_or_geometry):
    if isinstance(model_or_geometry, ModelGeometry):
        return model_or_geometry
    return ModelGeometry.from_model(model_or_geometry)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_hasher(
    hasher: MLPHasher | LinearHasher, path: str | os.PathLike, training: dict | None = None, identity: dict | None = None
) -> Path:
    """Write `hasher` to `path` (safetensors + header). Returns the path.

    `identity` (identity.model_identity of the model it was trained for) defaults to `hasher.identity`,
    which load_hasher and the trainer set."""
    path = Path(path)
    identity = identity if identity is not None else getattr(hasher, "identity", None)
    geometry = hasher.geometry
    if isinstance(hasher, MLPHasher):
        kind, hasher_meta = "mlp", hasher.config.to_dict()
    else:
        kind, hasher_meta = "linear", {"bits": hasher.bits, "seed": hasher.seed}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": json.dumps(geometry.to_dict()),
        "hasher": json.dumps(hasher_meta),
        "layers": json.dumps(list(hasher.layers)),
        "training": json.dumps(training or {}),
        "identity": json.dumps(identity),
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in hasher.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def stamp_identity(path: str | os.PathLike, model) -> Path:
    """Record `model`'s identity in the header of an existing hasher file (one written before headers
    held identities); the tensors are kept byte for byte, the geometry must match, the write is atomic."""
    path = Path(path)
    header = read_header(path)
    check_geometry(header["model"], _geometry_of(model), str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    metadata["identity"] = json.dumps(model_identity(model))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_metadata(path: Path, kind: str, fmt: str, version: str, fields: tuple[str, ...]) -> tuple[dict, dict]:
    """(raw metadata, {field: parsed JSON}) of a safetensors file of this library's format `fmt`.
    Raises CheckpointError, naming the `kind` of file, when it is missing, unreadable, of another
    format or version, or lacks one of `fields`."""
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if metadata.get("format") != fmt:
        raise CheckpointError(f"{path} is not a spotlight-attn {kind} (header format={metadata.get('format')!r})")
    if metadata.get("format_version") != version:
        raise CheckpointError(f"{path} has {kind} format_version {metadata.get('format_version')!r}; this library reads {version}")
    parsed = {}
    for key in fields:
        try:
            parsed[key] = json.loads(metadata[key])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a missing or corrupt '{key}' header field") from None
    return metadata, parsed


def read_header(path: str | os.PathLike) -> dict:
    """The parsed header of a hasher file. Raises CheckpointError when it is not one."""
    path = Path(path)
    metadata, parsed = read_metadata(path, "hasher", FORMAT, FORMAT_VERSION, ("model", "hasher", "layers", "training"))
    header = {"kind": metadata.get("kind"), **parsed}
    try:
        header["identity"] = json.loads(metadata.get("identity", "null"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has a corrupt 'identity' header field") from None
    if header["kind"] not in ("mlp", "linear"):
        raise CheckpointError(f"{path} has unknown hasher kind {header['kind']!r}")
    return header


def check_geometry(header_model: dict, geometry, source: str) -> None:
    """Refuse a hasher trained for another model, naming the first field that differs."""
    actual = geometry.to_dict()
    for field in CHECKED_FIELDS:
        if header_model.get(field) != actual.get(field):
            raise HasherMismatchError(
                f"{source} was trained for a model with {field}={header_model.get(field)!r}, "
                f"but this model has {field}={actual.get(field)!r}"
            )


def check_model_identity(header_identity: dict | None, model, source: str) -> None:
    """Refuse a hasher trained for other weights than `model`'s (a transformers model), by their fingerprints."""
    actual = model_identity(model)
    if header_identity is None or actual is None:
        return  # nothing recorded (an older file), or a model with nothing to fingerprint: geometry only
    difference = identity_difference(header_identity, actual)
    if difference > TOLERANCE:
        raise HasherMismatchError(
            f"{source} was trained for another model of this geometry: its model identity is "
            f"{header_identity.get('digest')}, this model's is {actual['digest']} (weights differ by {difference:.3g} "
            f"relative, more than {TOLERANCE}); train a hasher for this model, or pass check_identity=False to use it anyway"
        )


def load_hasher(
    path: str | os.PathLike, model, device: torch.device | str | None = None, check_identity: bool = True
) -> MLPHasher | LinearHasher:
    """Load a hasher and check it against `model` (a transformers model or a ModelGeometry): the
    geometry always, and for a model, the identity of its weights when the file records one."""
    path = Path(path)
    header = read_header(path)
    geometry = _geometry_of(model)
    check_geometry(header["model"], geometry, str(path))
    if check_identity and not isinstance(model, ModelGeometry):
        check_model_identity(header["identity"], model, str(path))
    if header["kind"] == "mlp":
        try:
            config = HasherConfig(**header["hasher"])
        except TypeError as err:
            raise CheckpointError(f"{path} has a corrupt 'hasher' header field ({err})") from None
        hasher = MLPHasher(geometry, config, layers=header["layers"])
    else:
        hasher = LinearHasher(geometry, bits=header["hasher"]["bits"], seed=header["hasher"]["seed"], layers=header["layers"])
    expected = hasher.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise CheckpointError(f"{path} tensors do not match its header (missing {missing[:3]}, unexpected {extra[:3]})")
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, header implies {tuple(expected[name].shape)}"
            )
    hasher.load_state_dict(tensors)
    hasher.training_info = header["training"]
    hasher.identity = header["identity"]
    if device is not None:
        hasher.to(device)
    return hasher.eval().requires_grad_(False)
