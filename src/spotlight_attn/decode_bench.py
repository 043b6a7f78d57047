"""`spotlight bench decode`: decode tokens/s through `model.generate()`, against the strongest dense decoding.

Every timed token comes out of transformers' own generate(), compiled and graph-captured as generate()
does for a static cache (torch.compile, mode reduce-overhead). Rows per (shape, context, batch):
- `hf-static`: transformers' StaticCache with sdpa: stock static-cache generation;
- `dense`: this library's dense path over its static cache (flash varlen over each row's held keys);
- `<hasher>-<bits> <budget>`: spotlight, with SimHash (`linear`), the learned-hash shape (`mlp`,
  2 residual blocks of width head_dim; untrained, which changes values, not speed), or the trained
  hasher that ships for a real model (`learned`).
x_dense is tokens/s over the faster of the two dense rows.

Two ways to reach a long context:
- a shape (`llama3-8b`, `smollm2-135m`): random weights (decode speed does not depend on them) and
  the cache filled as a prefill leaves it, with random K/V and the keys' real hash codes (a 128K x 6
  prefill of an 8B shape costs minutes and memory of its own); generate() then gets context + 1 prompt
  tokens with a cache holding all but the last, so every forward it makes is a decode step;
- a real model (`--model`, e.g. the SmolLM2 GGUF): generate() prefills a real prompt itself.
Each row runs generate() twice: a warm-up call (compilation, graph capture), then the timed one (the
cache rewound to the context). Tokens/s = batch x (new tokens - 1) / (last token's time - first
token's), from a streamer's stamps: steady decoding only. The bytes floor of a step is the weights
read + the dense layers' K/V + per hash layer the codes, the selected K/V rows and the indices, over the
measured copy bandwidth; x_floor = measured time / floor.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from spotlight_attn import compat
from spotlight_attn.bench import _ctx
from spotlight_attn.config import HasherConfig, SpotlightConfig
from spotlight_attn.demo import _StepClock
from spotlight_attn.errors import SpotlightError

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
class Settings:
    """What every row of one run shares."""

    budgets: list = field(default_factory=lambda: [0.02])
    hashers: tuple[str, ...] = ("linear", "mlp")
    bits: int = 128
    steps: int = 32  # new tokens of the timed call
    warmup: int = 8  # new tokens of the warm-up call
    dense_layers: tuple[int, ...] = (0, 1)
    baselines: tuple[str, ...] = ("hf-static", "dense")
    fuse_projections: bool = True  # SpotlightConfig.fuse_projections for every row but hf-static (transformers' own)
    head_spread: float | None = None  # hash rows: one KV head a layer reads this times the budget, the rest less (spread_budgets)


@dataclass(slots=True)
class DecodeRow:
    device: str
    shape: str  # llama3-8b, smollm2-135m
    context: int  # tokens held per row when decoding starts
    batch: int
    method: str  # hf-static, dense, linear, spotlight
    hasher: str  # linear, mlp, learned, none
    budget: float | int | None
    tokens_per_s: float
    ms_per_step: float
    x_dense: float = float("nan")  # over the faster dense row of this configuration
    floor_ms: float = float("nan")
    x_floor: float = float("nan")  # measured step / bytes floor
    peak_gib: float = float("nan")
    weights: str = "random"  # random | real
    warmup_s: float = float("nan")  # the warm-up call: compilation and graph capture included
    command: str = ""
    note: str = ""  # e.g. which code an older row ran
    fuse_projections: bool = False  # q/k/v and gate/up each as one GEMM (fused_projections.py); rows before gen27 had not
    head_spread: float | None = None  # Settings.head_spread of a hash row

    @property
    def label(self) -> str:
        if self.hasher in ("none", ""):
            return self.method
        amount = f"{self.budget * 100:g}%" if isinstance(self.budget, float) else str(self.budget)
        return f"{self.hasher} {amount}" + (f" spread {self.head_spread:g}" if self.head_spread else "")

    def line(self) -> str:
        return (f"{self.shape:13s} {_ctx(self.context):>5s} {self.batch:3d} {self.label:22s} {self.ms_per_step:9.3f} "
                f"{self.tokens_per_s:9.1f} {self.x_dense:6.2f} {self.floor_ms:8.3f} {self.x_floor:6.2f} {self.peak_gib:7.1f}")


HEADER = f"{'shape':13s} {'ctx':>5s} {'B':>3s} {'method':22s} {'ms/step':>9s} {'tok/s':>9s} {'xdense':>6s} {'floorms':>8s} {'xfloor':>6s} {'peakGiB':>7s}"


def build_model(shape: Shape, max_positions: int, device, dtype=torch.bfloat16):
    """A random-weight LlamaForCausalLM of this shape, built directly on the device."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(max_positions), dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: decode exactly the tokens asked for
    return model.eval().requires_grad_(False)


def weights_read_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, but only `batch` rows of an input
    embedding table that is not also the output head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is model.get_output_embeddings().weight:
        return total
    return total - embed.numel() * embed.element_size() + batch * embed.shape[1] * embed.element_size()


def step_floor_bytes(model, lengths: list[int], config: SpotlightConfig | None, hasher) -> int:
    """Bytes a decode step must move at these row lengths."""
    from spotlight_attn.models import ModelGeometry

    g = ModelGeometry.from_model(model)
    elem = next(model.parameters()).element_size()
    per_token_kv = 2 * g.num_kv_heads * g.head_dim * elem
    nbytes = weights_read_bytes(model, len(lengths))
    sparse = set() if config is None or hasher is None else set(hasher.layers) - set(config.dense_layers)
    for i in range(g.num_layers):
        if i not in sparse:
            nbytes += sum(lengths) * per_token_kv
            continue
        k = [config.budget_spec.tokens_for(n) for n in lengths]
        nbytes += sum(lengths) * g.num_kv_heads * hasher.words * 4  # key codes
        nbytes += sum(k) * per_token_kv + 2 * len(lengths) * g.num_kv_heads * max(k) * 8  # selected rows, indices
    if hasher is not None:
        nbytes += sum(t.numel() * t.element_size() for t in list(hasher.parameters()) + list(hasher.buffers()))
    return nbytes


def spread_budgets(config: SpotlightConfig, geometry, spread: float) -> dict:
    """Head budgets for speed rows of a random-weight model (no profile to calibrate): in each sparse
    layer one KV head (a different one each layer) reads `spread` times the budget and the others share
    the rest, so the mean stays the budget and the index buffer is as wide as a profile capped at
    `spread` makes it (budgets.CAP)."""
    from spotlight_attn.config import Budget

    b, heads = float(config.budget_spec.amount), geometry.num_kv_heads
    if heads < 2 or not 1.0 <= spread <= heads or spread * b > 1.0:
        raise SpotlightError(f"--head-spread {spread} does not fit {heads} KV heads at budget {b}")
    rest = (heads * b - spread * b) / (heads - 1)
    base = config.budget_spec
    out = {}
    for n, layer in enumerate(i for i in range(geometry.num_layers) if i not in config.dense_layers):
        shares = [rest] * heads
        shares[n % heads] = spread * b
        out[layer] = Budget(base.amount, base.min_tokens, base.sink, base.window, heads=tuple(shares))
    return out


def _fill_spotlight(model, batch: int, context: int, max_tokens: int, seed: int):
    """The enabled model's static cache, filled with `context` random tokens per row (and their codes)."""
    installed = model.spotlight
    device, dtype = next(model.parameters()).device, installed.dtype
    cache = installed.new_static_cache(batch, max_tokens, device, dtype)
    g = installed.geometry
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        if not layer.is_initialized:
            layer._allocate(batch, g.num_kv_heads, g.head_dim, g.head_dim, dtype, device)
        layer.k_by_token[:, :context].normal_(generator=generator)
        layer.v_by_token[:, :context].normal_(generator=generator)
        if layer.codes is not None:
            for start in range(0, context, 32768):
                end = min(context, start + 32768)
                layer.codes[:, :, start:end] = layer.key_hasher(layer.keys[:, :, start:end])
    return cache, lambda: [(layer.lengths.fill_(context), layer.seen.fill_(context)) for layer in cache.layers]


def _fill_hf_static(model, batch: int, context: int, max_tokens: int, seed: int):
    """transformers' own StaticCache, filled with `context` random tokens per row."""
    from transformers import StaticCache

    from spotlight_attn.models import ModelGeometry

    g = ModelGeometry.from_model(model)
    param = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_tokens)
    cache.early_initialization(batch, g.num_kv_heads, g.head_dim, param.dtype, param.device)
    generator = torch.Generator(device=param.device).manual_seed(seed)
    for layer in cache.layers:
        layer.keys[:, :, :context].normal_(generator=generator)
        layer.values[:, :, :context].normal_(generator=generator)
    return cache, lambda: [layer.cumulative_length.fill_(context) for layer in cache.layers]


def _timed_generate(model, ids, mask, cache, new_tokens: int) -> float:
    """Run generate() for `new_tokens` tokens; -> seconds per step from the first new token to the last."""
    clock = _StepClock()
    # A cache of one's own goes with cache_implementation=None (transformers refuses both at once).
    kwargs = {} if cache is None else {compat.cache_argument(model): cache, "cache_implementation": None}
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   streamer=clock, pad_token_id=0, **kwargs)
    stamps = clock.stamps[1:]  # [0] is the prompt
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def _reset_compiled(model=None) -> None:
    """Drop the compiled forward (of `model`, if given) and its graphs before the next configuration."""
    if model is not None and hasattr(model, "_compiled_call"):
        del model._compiled_call
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _configs(model, settings: Settings):
    """(method, hasher name, budget, SpotlightConfig or None, hasher or None) for every row."""
    from spotlight_attn.hashing import MLPHasher
    from spotlight_attn.models import ModelGeometry

    g = ModelGeometry.from_model(model)
    sparse = [i for i in range(g.num_layers) if i not in settings.dense_layers]
    device = next(model.parameters()).device
    for name in settings.baselines:
        config = SpotlightConfig(method="dense", cache="static", fuse_projections=settings.fuse_projections)
        yield (name, "none", None, None if name == "hf-static" else config, None)
    for budget in settings.budgets:
        for kind in settings.hashers:
            method = "linear" if kind == "linear" else "spotlight"
            config = SpotlightConfig(method=method, budget=budget, bits=settings.bits, dense_layers=settings.dense_layers,
                                     cache="static", fuse_projections=settings.fuse_projections)
            hasher = None
            if kind == "mlp":
                hasher = MLPHasher(g, HasherConfig(bits=settings.bits, depth=2, width=g.head_dim), layers=sparse).to(device)
            elif kind == "learned":
                from spotlight_attn.hashing import load_hasher, shipped_hasher

                path = shipped_hasher(model)
                if path is None:
                    raise SpotlightError("hasher 'learned' needs a model a hasher ships for (--model smollm2-135m or its GGUF)")
                hasher = load_hasher(path, model, device=device)
                config = replace(config, dense_layers=tuple(i for i in range(g.num_layers) if i not in hasher.layers))
            yield (method, kind, budget, config, hasher)


def run_decode_bench(shapes, contexts, batches, settings: Settings, *, model_spec=None, bandwidth=None, device=None,
                     log: Callable[[str], None] | None = None, command: str = "", isolate: bool = True) -> list[DecodeRow]:
    """The table of the module docstring; logs each row as it is measured and returns them all.

    isolate: measure every row in a fresh process of its own (`spotlight bench decode ... --no-isolate`
    for that one row), as a user runs one model with one setting, so no row inherits another's
    compiled graphs, memory pools or host state. The same SimHash row at 128K x 6 on the H200 measured
    13.33 and 14.15 ms per step after other rows in one process and 12.39 ms in a process of its own
    (docs/BENCHMARKS.md, "Profile")."""
    if isolate:
        return _run_isolated(shapes, contexts, batches, settings, model_spec, log or logger.info, command)
    from spotlight_attn.attention import disable, enable
    from spotlight_attn.bench import copy_bandwidth, require_cuda

    log = log or logger.info
    device = require_cuda(device)
    bandwidth = bandwidth or copy_bandwidth(device)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    import transformers

    log(f"# decode through model.generate(): {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; timed call {settings.steps} "
        f"new tokens after a {settings.warmup}-token warm-up call; dense layers of spotlight rows {list(settings.dense_layers)}")
    rows: list[DecodeRow] = []
    for shape_name in shapes:
        real = model_spec is not None
        if real:
            from spotlight_attn.models import load_model

            model, tokenizer = load_model(model_spec, dtype=torch.bfloat16, device=device)
            model.generation_config.eos_token_id = None
            shape_name = _shape_of(model) or shape_name
        else:
            model = build_model(SHAPES[shape_name], max(contexts) + settings.steps + settings.warmup + 256, device)
        log(f"# {shape_name} ({'real weights from ' + str(model_spec) if real else 'random weights'}): "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
        log(HEADER)
        for context in contexts:
            for batch in batches:
                rows += _one_config(model, shape_name, context, batch, settings, bandwidth, device, log, real,
                                    tokenizer if real else None, command, enable, disable)
        del model
        _reset_compiled()
    return rows


def _row_specs(settings: Settings):
    """(baselines, hashers, budgets) of each row, one row per child process."""
    for name in settings.baselines:
        yield (name,), (), settings.budgets[:1]
    for budget in settings.budgets:
        for kind in settings.hashers:
            yield (), (kind,), [budget]


def _run_isolated(shapes, contexts, batches, settings: Settings, model_spec, log, command: str) -> list[DecodeRow]:
    rows: list[DecodeRow] = []
    log(f"# every row in a process of its own; {settings.steps} timed new tokens after a {settings.warmup}-token warm-up call")
    log(HEADER)
    for shape in shapes if model_spec is None else [None]:
        for context in contexts:
            for batch in batches:
                group = []
                for spec in _row_specs(settings):
                    group += _child_rows(spec, model_spec, shape, context, batch, settings, log, header=not rows + group)
                _finish(group)
                for row in group:
                    log(row.line())
                rows += group
    return [replace(row, command=command) for row in rows]


def _child_rows(spec, model_spec, shape, context: int, batch: int, settings: Settings, log, header: bool) -> list[DecodeRow]:
    """One row spec measured by `spotlight bench decode ... --no-isolate` in a process of its own."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    baselines, hashers, budgets = spec
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [sys.executable, "-m", "spotlight_attn.cli.main", "bench", "decode",
                *(["--model", str(model_spec)] if model_spec is not None else ["--shape", shape]),
                "--context", str(context), "--batch", str(batch), "--budget", ",".join(map(str, budgets)),
                "--hasher", ",".join(hashers), "--baselines", ",".join(baselines), "--bits", str(settings.bits),
                "--steps", str(settings.steps), "--warmup", str(settings.warmup),
                "--dense-layers", ",".join(map(str, settings.dense_layers)), "--json", str(out), "--no-isolate",
                *([] if settings.fuse_projections else ["--no-fuse-projections"]),
                *([] if not settings.head_spread or not hashers else ["--head-spread", str(settings.head_spread)])]
        child = subprocess.run(argv, capture_output=True, text=True)
        for line in child.stdout.splitlines():
            if line.startswith("#   ") or "out of memory" in line or (header and line.startswith("# decode")):
                log(line)
        if child.returncode != 0:
            tail = "\n".join((child.stdout + child.stderr).splitlines()[-15:])
            raise SpotlightError(f"the row {baselines or hashers} at {_ctx(context)} x {batch} failed:\n{tail}")
        return [DecodeRow(**row) for row in json.loads(out.read_text())]


def _shape_of(model) -> str | None:
    """The SHAPES name whose geometry a loaded model has (a real SmolLM2 is 'smollm2-135m'), or None."""
    c = model.config
    for name, shape in SHAPES.items():
        if (shape.layers, shape.hidden, shape.q_heads, shape.kv_heads, shape.vocab) == (
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size
        ):
            return name
    return None


def _prompt(model, tokenizer, context: int, batch: int, device):
    """Real prompts: the needle demo's text of `context` tokens, the same for every row."""
    from spotlight_attn.demo import build_needle_prompt, encode_chat

    messages, _ = build_needle_prompt(tokenizer, context)
    ids = encode_chat(tokenizer, messages)["input_ids"][:, -context:]
    return ids.expand(batch, -1).to(device), torch.ones(batch, ids.shape[1], dtype=torch.long, device=device)


def _one_config(model, shape_name, context, batch, s: Settings, bandwidth, device, log, real, tokenizer, command,
                enable, disable) -> list[DecodeRow]:
    out = []
    max_tokens = context + 1 + max(s.steps, s.warmup) + 64
    if real:
        ids, mask = _prompt(model, tokenizer, context, batch, device)
    else:
        ids = torch.randint(3, model.config.vocab_size, (batch, context + 1), device=device)
        mask = torch.ones_like(ids)
    lengths = [context + s.steps // 2] * batch  # the floor is counted at the timed call's middle step
    for method, hasher_name, budget, config, hasher in _configs(model, s):
        torch.cuda.reset_peak_memory_stats(device)
        disable(model)
        cache = rewind = None
        floor_hasher = None
        try:
            if config is None:  # transformers' own path: sdpa over its StaticCache
                model.set_attn_implementation("sdpa")
                if real:
                    model.generation_config.cache_implementation = "static"
                else:
                    cache, rewind = _fill_hf_static(model, batch, context, max_tokens, seed=0)
            else:
                enable(model, hasher, config)
                floor_hasher = getattr(model.spotlight.selector, "hasher", None)  # the one the rows decode with
                if s.head_spread and floor_hasher is not None:
                    model.spotlight.budgets = spread_budgets(config, model.spotlight.geometry, s.head_spread)
                if not real:
                    cache, rewind = _fill_spotlight(model, batch, context, max_tokens, seed=0)
            if rewind:
                rewind()
            started = time.perf_counter()
            _timed_generate(model, ids, mask, cache, s.warmup)  # compiles, captures
            warmup_s = time.perf_counter() - started
            if rewind:
                rewind()
            torch.cuda.synchronize(device)
            step = _timed_generate(model, ids, mask, cache, s.steps)
        except torch.cuda.OutOfMemoryError:
            log(f"{shape_name:13s} {_ctx(context):>5s} {batch:3d} {method}: out of memory, skipped")
            continue
        finally:
            if config is None and real:
                model.generation_config.cache_implementation = None
            disable(model)
            del cache, rewind  # rewind holds the cache too: both go before the next row allocates its own
            _reset_compiled(model)
        row = DecodeRow(torch.cuda.get_device_name(device), shape_name, context, batch, method, hasher_name, budget,
                        batch / step, step * 1e3, weights="real" if real else "random", command=command,
                        head_spread=s.head_spread if floor_hasher is not None else None)
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        row.floor_ms = step_floor_bytes(model, lengths, config, floor_hasher) / bandwidth * 1e3
        row.warmup_s = warmup_s
        row.fuse_projections = config is not None and config.fuse_projections
        if hasher_name in ("linear", "mlp", "learned"):
            from spotlight_attn.hashing.hasher import hash_path

            row.note = f"hash: {hash_path(device)}"
        log(f"#   {row.label}: {row.ms_per_step:.3f} ms/step, warm-up call {warmup_s:.1f} s")
        out.append(row)
    _finish(out)
    for row in out:
        log(row.line())
    disable(model)
    model.set_attn_implementation("sdpa")
    return out


def _finish(rows: list[DecodeRow]) -> None:
    """x_dense against the faster dense row, x_floor against each row's bytes floor."""
    dense = [r.tokens_per_s for r in rows if r.hasher == "none"]
    best = max(dense) if dense else float("nan")
    for row in rows:
        row.x_dense = row.tokens_per_s / best
        row.x_floor = row.ms_per_step / row.floor_ms


def rows_as_dicts(rows: list[DecodeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot(rows: list[DecodeRow], path, title: str) -> None:
    """Tokens/s per configuration, one bar per method, speed-up over the faster dense written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r.shape, r.context, r.batch) for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4.2))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        picked = [(c, r) for c, cfg in enumerate(configs) for r in rows if (r.shape, r.context, r.batch) == cfg and r.label == label]
        xs = [c + (j - (len(labels) - 1) / 2) * width for c, _ in picked]
        ax.bar(xs, [r.tokens_per_s for _, r in picked], width, color=f"C{j}", label=label)
        for x, (_, r) in zip(xs, picked):
            ax.annotate(f"{r.x_dense:.2f}x", (x, r.tokens_per_s), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{s}\n{_ctx(t)} B={b}" for s, t, b in configs], fontsize=8)
    ax.set_ylabel("decode tokens/s (generate())")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
