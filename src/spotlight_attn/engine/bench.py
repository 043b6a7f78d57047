"""End-to-end decode throughput on a GPU: `spotlight bench decode` (issue 6).

For each model shape, context, batch and method, a DecodeEngine over a random-weight model of that
geometry (speed does not depend on the weight values) decodes greedily:
- the cache is filled with random keys/values (N(0, 1)) and the keys' real hash codes instead of a
  real prefill (a prefill of 128K tokens x batch 3 would need its own memory);
- `warmup` steps (graph capture, kernel compilation), then `steps` timed steps, each timed with CUDA
  events around engine.step() + the greedy argmax; the median is reported;
- the dense baseline runs through the same engine (static cache, CUDA graphs, same modules), with the
  faster of the two dense kernels measured on that configuration (flash-attention varlen with one
  graph per 256-token bucket, or SDPA over the exact prefix with one graph per step); the spotlight
  rows use that same kernel for their dense layers;
- bytes floor per step: the weights read (every parameter except the embedding table, of which B rows)
  + the dense layers' K/V + for sparse layers the key codes, the selected K/V rows, the indices
  (written once, read once) and the hash weights, over the measured copy bandwidth.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from spotlight_attn.config import HasherConfig, SpotlightConfig
from spotlight_attn.engine.dense import DenseKernel, flash_varlen_available
from spotlight_attn.engine.engine import DecodeEngine
from spotlight_attn.hashing.hasher import MLPHasher
from spotlight_attn.models import ModelGeometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Shape:
    """A Llama-architecture geometry (public model configs)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    tied: bool = False

    def config(self, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.q_heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, rope_theta=self.rope_theta, max_position_embeddings=max_positions,
            tie_word_embeddings=self.tied,
        )


SHAPES = {
    "llama3-8b": Shape(128256, 4096, 14336, 32, 32, 8, 128, 500000.0),
    "smollm2-135m": Shape(49152, 576, 1536, 30, 9, 3, 64, 100000.0, tied=True),
}


@dataclass(slots=True)
class DecodeRow:
    shape: str
    context: int
    batch: int
    method: str  # "dense" or e.g. "linear-128 2%"
    ms_per_step: float
    tokens_per_s: float
    x_dense: float  # tokens/s over the dense row's, same shape/context/batch
    floor_bytes: int  # bytes a step must move
    floor_ms: float
    x_floor: float  # measured / floor
    peak_gib: float  # torch.cuda.max_memory_allocated during this row
    kv_gib: float
    codes_gib: float
    dense_kernel: str
    parts_us: dict = field(default_factory=dict)  # per-layer component timings (GPU graph medians)

    def line(self) -> str:
        return (
            f"{self.shape:13s} {_ctx(self.context):>5s} {self.batch:3d} {self.method:22s} {self.ms_per_step:9.3f}"
            f" {self.tokens_per_s:9.1f} {self.x_dense:6.2f} {self.floor_ms:8.3f} {self.x_floor:6.2f} {100 / self.x_floor:4.0f}%"
            f" {self.peak_gib:7.1f} {self.kv_gib:7.2f} {self.codes_gib:6.2f} {self.dense_kernel}"
        )


HEADER = (
    f"{'shape':13s} {'ctx':>5s} {'B':>3s} {'method':22s} {'ms/step':>9s} {'tok/s':>9s} {'xdense':>6s}"
    f" {'floorms':>8s} {'xfloor':>6s} {'ach':>5s} {'peakGiB':>7s} {'kvGiB':>7s} {'codeGiB':>6s} dense-kernel"
)


def _ctx(t: int) -> str:
    return f"{t >> 10}K" if t % 1024 == 0 else str(t)


def build_model(shape: Shape, max_positions: int, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A random-weight LlamaForCausalLM of this shape, built directly on the device."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(max_positions), dtype=dtype)
    return model.eval().requires_grad_(False)


def weights_read_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, but only `batch` rows of an
    embedding table that is not also the output head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is model.get_output_embeddings().weight:
        return total
    return total - embed.numel() * embed.element_size() + batch * embed.shape[1] * embed.element_size()


def step_floor_bytes(engine: DecodeEngine, lengths: list[int]) -> int:
    """Bytes a decode step must move at these row lengths (the new token included)."""
    g, elem = engine.geometry, engine.dtype.itemsize
    nbytes = weights_read_bytes(engine.model, len(lengths))
    per_token_kv = 2 * g.num_kv_heads * g.head_dim * elem
    for i in range(g.num_layers):
        if i not in engine.sparse_layers:
            nbytes += sum(lengths) * per_token_kv
            continue
        k = [engine.budget.tokens_for(n) for n in lengths]
        nbytes += sum(lengths) * g.num_kv_heads * engine.hasher.words * 4  # key codes
        nbytes += sum(k) * per_token_kv + 2 * len(lengths) * g.num_kv_heads * max(k) * 8  # selected rows, indices
    if engine.hasher is not None:
        nbytes += engine.memory()["hasher"]
    return nbytes


def _fits(nbytes: int, device: torch.device, headroom: int = 3 << 30) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + headroom < free


def _time_steps(engine: DecodeEngine, warmup: int, steps: int) -> list[float]:
    """ms per step for `steps` greedy steps after `warmup` ones; captures are outside the timings."""
    ids = torch.full((engine.cache.batch,), 7, dtype=torch.long, device=engine.device)
    times = []
    for i in range(warmup + steps):
        engine.prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ids = engine.step(ids).argmax(-1)
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize(engine.device)
    return [s.elapsed_time(e) for s, e in times]


def _profile(engine: DecodeEngine, steps: int = 3, top: int = 14) -> list[str]:
    """GPU time per step by kernel (torch profiler over eager steps: the same kernels a graph replays,
    without its launch gaps), the largest first."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.full((engine.cache.batch,), 7, dtype=torch.long, device=engine.device)
    graphs, engine.graphs = engine.graphs, False
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                ids = engine.step(ids).argmax(-1)
            torch.cuda.synchronize(engine.device)
    finally:
        engine.graphs = graphs
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / steps
    lines = [f"kernels total {total / 1e3:.3f} ms/step (sum of GPU kernel times, no launch gaps)"]
    for e in events[:top]:
        lines.append(f"{e.device_time_total / steps:9.1f} us/step {e.count / steps:6.0f}/step  {e.key[:90]}")
    return lines


def _layer_parts(engine: DecodeEngine, layer: int, view: int, dense_kernels: list[DenseKernel]) -> dict:
    """Per-layer GPU time (graph medians, µs) of the step's attention pieces on the engine's own cache."""
    from spotlight_attn.bench import _median_graph_us
    from spotlight_attn.engine.dense import DenseAttention
    from spotlight_attn.kernels.score_select import plan_from_lengths, score_select
    from spotlight_attn.kernels.sparse_decode import sparse_decode

    g, cache = engine.geometry, engine.cache
    b = cache.batch
    lengths = cache.lengths.clone()
    q = torch.randn(b, g.num_q_heads, 1, g.head_dim, device=engine.device, dtype=engine.dtype)
    parts = {}
    keys, values = cache.keys[layer], cache.values[layer]
    for kernel in dense_kernels:
        dense = DenseAttention(kernel, b, cache.max_tokens, engine.device, engine.dtype)
        exact = int(lengths.max())
        parts[f"dense:{kernel.value}"] = _median_graph_us([lambda: dense(q, keys, values, lengths, exact if kernel is DenseKernel.SDPA else view, 0.1)])
    sparse = sorted(engine.sparse_layers)
    if sparse:
        i = sparse[len(sparse) // 2]
        plan = plan_from_lengths(lengths, engine.budget, engine.budget.tokens_for(view))
        q_codes = engine.hasher.query_codes(i, q)
        codes = cache.codes[i][:, :, :view]
        valid = torch.ones(b, view, dtype=torch.bool, device=engine.device)
        parts["score_select"] = _median_graph_us([lambda: score_select(q_codes, codes, valid, engine.budget, engine.hasher.bits, plan=plan)])
        idx = score_select(q_codes, codes, valid, engine.budget, engine.hasher.bits, plan=plan)
        kt, vt = cache.keys[i].transpose(1, 2), cache.values[i].transpose(1, 2)
        parts["sparse_decode"] = _median_graph_us([lambda: sparse_decode(q, kt, vt, idx, 0.1)])
        parts["hash_q+k"] = _median_graph_us([lambda: (engine.hasher.query_codes(i, q), engine.hasher.key_codes(i, kt[:, :, :1]))])
    return parts


@dataclass(slots=True)
class DecodeSettings:
    """What every configuration of one `run_decode_bench` call shares."""

    budgets: list[float | int]
    hashers: tuple[str, ...] = ("linear",)  # 'linear' (SimHash) and/or 'mlp' (MLPHasher shape, untrained)
    bits: int = 128
    steps: int = 32
    warmup: int = 4
    dense_kernel: str = "auto"  # a DenseKernel value, or auto: measure SDPA and flash-varlen, keep the faster
    dense_layers: tuple[int, ...] = (0, 1)
    compile: bool = False
    profile: bool = False


def run_decode_bench(
    shapes: list[str],
    contexts: list[int],
    batches: list[int],
    settings: DecodeSettings,
    *,
    bandwidth: float | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[DecodeRow]:
    """Decode throughput table (see the module docstring); logs each row and returns them all."""
    from spotlight_attn.bench import copy_bandwidth, require_cuda

    log = log or logger.info
    device = require_cuda(device)
    bandwidth = bandwidth or copy_bandwidth(device)
    s = settings
    log(
        f"# decode: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; random-weight models (decode speed does not depend on weight values); "
        f"cache filled with random K/V + their real hash codes instead of a prefill; median of {s.steps} steps "
        f"after {s.warmup}; dense layers of sparse rows: {list(s.dense_layers)}; compile={s.compile}"
    )
    rows: list[DecodeRow] = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        model = build_model(shape, max(contexts) + s.steps + s.warmup + 1024, device)
        kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
        sparse_layers = shape.layers - len([i for i in set(s.dense_layers) if i < shape.layers])
        code_token = sparse_layers * shape.kv_heads * s.bits // 8
        log(
            f"# {shape_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; per cached token "
            f"K/V {kv_token} B, codes {code_token} B ({s.bits}-bit, {sparse_layers} sparse layers) = "
            f"{code_token / kv_token:.1%} of K/V; per head-token {s.bits // 8} B vs {2 * shape.head_dim * 2} B "
            f"= {s.bits // 8 / (2 * shape.head_dim * 2):.1%}"
        )
        log(HEADER)
        for context in contexts:
            for batch in batches:
                max_tokens = context + s.warmup + s.steps + 8  # + the profile's eager steps
                kv_bytes = batch * max_tokens * kv_token
                if not _fits(kv_bytes + batch * max_tokens * code_token, device):
                    log(f"{shape_name:13s} {_ctx(context):>5s} {batch:3d} skipped: K/V cache {kv_bytes / 2**30:.1f} GiB "
                        f"+ weights do not fit in {torch.cuda.mem_get_info(device)[1] / 2**30:.0f} GiB")
                    continue
                rows += _one_config(model, shape_name, context, batch, max_tokens, s, bandwidth, device, log)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _measure(model, shape_name, label, config, hasher, kernel, lengths, max_tokens, s, bandwidth, device, log, parts_kernels=None):
    """One row: an engine over `lengths` random tokens per row, its timed steps and floor."""
    torch.cuda.reset_peak_memory_stats(device)
    bucket = 1 if kernel is DenseKernel.SDPA else 256  # exact SDPA reads keys[:, :length] unmasked
    engine = DecodeEngine(model, hasher, config, max_batch=len(lengths), max_tokens=max_tokens, dense_kernel=kernel,
                          bucket=bucket, compile=s.compile, max_graphs=2)
    engine.fill_random(lengths)
    layer = min(engine.sparse_layers) if engine.sparse_layers else 0
    parts = _layer_parts(engine, layer, engine.view_for(max(lengths) + 1), parts_kernels or [])
    times = _time_steps(engine, s.warmup, s.steps)
    if s.profile and kernel is not DenseKernel.SDPA:
        for text in _profile(engine):
            log(f"#   profile {label}: {text}")
    ms = statistics.median(times)
    nbytes = step_floor_bytes(engine, [n + s.warmup + s.steps // 2 for n in lengths])  # at the middle timed step
    floor_ms = nbytes / bandwidth * 1e3
    mem = engine.memory()
    row = DecodeRow(
        shape_name, lengths[0], len(lengths), label, ms, len(lengths) / ms * 1e3, float("nan"),
        nbytes, floor_ms, ms / floor_ms, torch.cuda.max_memory_allocated(device) / 2**30, mem["kv"] / 2**30,
        mem["codes"] / 2**30, kernel.value, parts,
    )
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _one_config(model, shape_name, context, batch, max_tokens, s: DecodeSettings, bandwidth, device, log) -> list[DecodeRow]:
    """The dense baseline (the faster dense kernel), then one row per budget and hasher."""
    lengths = [context] * batch
    common = (lengths, max_tokens, s, bandwidth, device, log)
    candidates = [DenseKernel.SDPA] + ([DenseKernel.FLASH_VARLEN] if flash_varlen_available(device, model.dtype) else [])
    if s.dense_kernel != "auto":
        candidates = [DenseKernel(s.dense_kernel)]
    dense, parts = None, {}
    for kernel in candidates:
        try:
            row = _measure(model, shape_name, "dense", SpotlightConfig(method="dense"), None, kernel, *common,
                           parts_kernels=candidates if not parts else None)
        except RuntimeError as err:  # a dense kernel this torch build cannot run: say so, keep the others
            log(f"# dense kernel {kernel.value} failed on {shape_name} {_ctx(context)} B={batch}: {str(err).splitlines()[0]}")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        log(row.line() + ("" if len(candidates) == 1 else "  (candidate)"))
        parts = parts or row.parts_us
        if dense is None or row.ms_per_step < dense.ms_per_step:
            dense = row
    if dense is None:
        log(f"{shape_name:13s} {_ctx(context):>5s} {batch:3d} skipped: no dense kernel ran")
        return []
    dense.x_dense, dense.parts_us = 1.0, parts
    kernel = DenseKernel(dense.dense_kernel)
    out = [dense]
    geometry = ModelGeometry.from_model(model)
    sparse = [i for i in range(geometry.num_layers) if i not in s.dense_layers]
    for budget in s.budgets:
        for hasher_kind in s.hashers:
            method = "linear" if hasher_kind == "linear" else "spotlight"
            config = SpotlightConfig(method=method, budget=budget, bits=s.bits, dense_layers=s.dense_layers)
            hasher = None
            if hasher_kind == "mlp":  # the shipped learned-hash shape, untrained (speed only)
                hasher = MLPHasher(geometry, HasherConfig(bits=s.bits, depth=2, width=128), layers=sparse).to(device)
            amount = f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)
            row = _measure(model, shape_name, f"{hasher_kind}-{s.bits} {amount}", config, hasher, kernel, *common)
            row.x_dense = row.tokens_per_s / dense.tokens_per_s
            log(row.line())
            out.append(row)
    for row in out:
        if row.parts_us:
            log("#   per-layer µs: " + ", ".join(f"{k} {v:.1f}" for k, v in row.parts_us.items()))
    return out


def rows_as_dicts(rows: list[DecodeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["SHAPES", "DecodeRow", "DecodeSettings", "build_model", "rows_as_dicts", "run_decode_bench"]
