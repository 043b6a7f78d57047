"""GPU benchmarks of the kernels against the torch paths they replace.

`run_bench("retrieval" | "attention", ...)` is what `spotlight bench retrieval|attention` runs.

- retrieval: score_select (Triton, plan built once per step and reused) vs sign-matmul scores +
  torch.topk (what the original code does: +-1 fp16 code matrices, a matmul, a sort-based top-k).
- attention: sparse_decode (Triton) at the budget vs gather + SDPA at the budget vs dense SDPA over
  the whole cache.

Each row: median time of CUDA-graph replays (GPU time, no launch gaps) and of eager calls
(triton.testing.do_bench, L2 flushed before each call); the bytes the method must move (each input
it reads once, each output written once); GB/s = those bytes over the graph time; and the graph time
over the floor = bytes / bandwidth, the bandwidth being a device-to-device copy measured in the same
run. Inputs that would sit in L2 are rotated over several copies (for sparse attention, several
index sets), so timings are of HBM traffic, not of L2 hits.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.score_select import plan_select, score_select
from spotlight_attn.kernels.sparse_decode import sparse_decode

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Attention geometry of one layer: query heads, KV heads, head dim, code bits."""

    q_heads: int
    kv_heads: int
    head_dim: int
    bits: int = 128


GEOMETRIES = {
    "llama3-8b": Geometry(32, 8, 128),
    "smollm2": Geometry(9, 3, 64),
}
CONTEXTS = (4096, 16384, 65536, 262144, 524288, 1048576)
BATCHES = (1, 8)


@dataclass(slots=True)
class Row:
    kind: str
    geometry: str
    batch: int
    context: int
    method: str
    graph_us: float
    eager_us: float
    bytes: int
    gbps: float
    x_floor: float
    speedup: float = float("nan")  # this row's time over our kernel's, same configuration

    def line(self) -> str:
        return (
            f"{self.kind:9s} {self.geometry:9s} B={self.batch:<2d} T={_ctx(self.context):>5s} {self.method:22s}"
            f" {self.graph_us:9.1f} {self.eager_us:9.1f} {self.bytes / 1e6:9.2f} {self.gbps:7.0f}"
            f" {self.x_floor:6.2f} {self.speedup:7.2f}"
        )


HEADER = (
    f"{'kind':9s} {'geometry':9s} {'batch':4s} {'ctx':>7s} {'method':22s} {'graph_us':>9s} {'eager_us':>9s}"
    f" {'MB':>9s} {'GB/s':>7s} {'xfloor':>6s} {'speedup':>7s}"
)


def _ctx(t: int) -> str:
    """131072 -> '128K', 1048576 -> '1M'; a count that is not a whole number of K stays as it is (8000)."""
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}M"
    return f"{t >> 10}K" if t % 1024 == 0 else str(t)


def require_cuda(device: torch.device | str | None = None) -> torch.device:
    """The CUDA device to benchmark on; SpotlightError naming what is missing otherwise."""
    from spotlight_attn.errors import SpotlightError
    from spotlight_attn.kernels._triton import triton_installed

    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SpotlightError(
            f"the benchmarks need a CUDA GPU; this machine has none (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False)" if not torch.cuda.is_available() else f"the benchmarks need a CUDA device, not {device}"
        )
    if not triton_installed():
        raise SpotlightError("the benchmarks need Triton: pip install 'spotlight-attn[triton]'")
    return device


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median of do_bench)."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def _median_graph_us(calls: list[Callable[[], object]], target_ms: float = 2.0, replays: int = 20) -> float:
    """GPU time per call: `calls` (cycling over input copies) captured R times into one CUDA graph, R
    sized so a replay lasts about target_ms (keeps clocks up and event overhead negligible); the
    median over replays, divided by the calls per replay."""

    def capture(repeats: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                for call in calls:
                    call()
        return graph

    def timed(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)  # ms

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside the graph: compiles, allocates, fills caches of counters
            call()
    torch.cuda.current_stream().wait_stream(stream)
    once = capture(1)
    once.replay()
    per_replay = statistics.median(timed(once) for _ in range(5))
    del once
    repeats = max(1, min(200, round(target_ms / max(per_replay, 1e-3))))
    graph = capture(repeats)
    for _ in range(max(2, round(20 / (per_replay * repeats)))):  # about 20 ms of warm-up
        graph.replay()
    times = [timed(graph) for _ in range(replays)]
    del graph
    return statistics.median(times) * 1e3 / (repeats * len(calls))


def _median_eager_us(calls: list[Callable[[], object]]) -> float:
    import triton.testing

    turn = [0]

    def next_call():
        turn[0] = (turn[0] + 1) % len(calls)
        return calls[turn[0]]()

    return triton.testing.do_bench(next_call, warmup=10, rep=40, return_mode="median") * 1e3


def _copies(set_bytes: int, device: torch.device) -> int:
    """Input copies to rotate through so that together they overflow L2 twice over (at most 32)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(32, math.ceil(2 * l2 / max(set_bytes, 1))))


def _fits(nbytes: int, device: torch.device, share: float = 0.8) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


def _measure(kind, geo_name, b, t, method, calls, nbytes, bandwidth, graph=True) -> Row:
    graph_us = _median_graph_us(calls) if graph else float("nan")
    eager_us = _median_eager_us(calls)
    us = graph_us if graph else eager_us
    gbps, x_floor = nbytes / (us * 1e3), us * 1e-6 * bandwidth / nbytes
    return Row(kind, geo_name, b, t, method, graph_us, eager_us, nbytes, gbps, x_floor)


def _retrieval_rows(geo_name, geo, b, t, budget, bandwidth, device, log) -> list[Row]:
    hkv, group, words = geo.kv_heads, geo.q_heads // geo.kv_heads, geo.bits // 32
    k = budget.tokens_for(t)
    code_bytes = b * hkv * t * words * 4 + b * geo.q_heads * words * 4
    out_bytes = b * hkv * k * 8
    rows = []
    valid = torch.ones(b, t, dtype=torch.bool, device=device)
    plan = plan_select(valid, budget)
    n = _copies(code_bytes, device)
    if _fits(n * code_bytes * 1.3, device):
        sets = [
            (
                torch.randint(-(2**31), 2**31 - 1, (b, geo.q_heads, 1, words), dtype=torch.int32, device=device),
                torch.randint(-(2**31), 2**31 - 1, (b, hkv, t, words), dtype=torch.int32, device=device),
            )
            for _ in range(n)
        ]
        calls = [lambda q=q, c=c: score_select(q, c, valid, budget, geo.bits, plan=plan) for q, c in sets]
        rows.append(_measure("retrieval", geo_name, b, t, "score_select", calls, code_bytes + out_bytes, bandwidth))
        calls = [lambda q=q, c=c: score_select(q, c, valid, budget, geo.bits) for q, c in sets]
        nbytes = code_bytes + out_bytes
        rows.append(_measure("retrieval", geo_name, b, t, "score_select+plan", calls, nbytes, bandwidth, graph=False))
        del sets, calls
    # The original path: codes as +-1 fp16 matrices, scores by matmul, summed over the group, torch.topk.
    sign_bytes = b * hkv * t * geo.bits * 2 + b * geo.q_heads * geo.bits * 2
    n = _copies(sign_bytes, device)
    scores_bytes = b * hkv * group * t * 2 * 2
    if _fits(n * sign_bytes + scores_bytes, device):
        sets = [
            (
                (torch.randint(0, 2, (b, hkv, group, geo.bits), device=device) * 2 - 1).half(),
                (torch.randint(0, 2, (b, hkv, t, geo.bits), device=device, dtype=torch.int8) * 2 - 1).half(),
            )
            for _ in range(n)
        ]

        def sign_topk(q, keys):
            scores = (q @ keys.transpose(-1, -2)).sum(2)  # [B, Hkv, T]
            return torch.topk(scores, k, dim=-1).indices

        calls = [lambda q=q, c=c: sign_topk(q, c) for q, c in sets]
        rows.append(_measure("retrieval", geo_name, b, t, "sign-matmul+topk", calls, sign_bytes + out_bytes, bandwidth))
        del sets, calls
    else:
        log(f"retrieval {geo_name} B={b} T={_ctx(t)} sign-matmul+topk: skipped, does not fit")
    return rows


def _attention_rows(geo_name, geo, b, t, budget, dtype, bandwidth, device, log) -> list[Row]:
    import torch.nn.functional as F

    hkv, d = geo.kv_heads, geo.head_dim
    k = budget.tokens_for(t)
    elem = torch.finfo(dtype).bits // 8
    cache_bytes = 2 * b * hkv * t * d * elem
    q_bytes = 2 * b * geo.q_heads * d * elem  # query in, output out
    picked_bytes = 2 * b * hkv * k * d * elem + b * hkv * k * 8 + q_bytes
    dense_bytes = cache_bytes + q_bytes
    rows = []
    n = _copies(cache_bytes, device)
    if not _fits(n * cache_bytes * 1.1 + 4 * b * hkv * t * 4, device):
        log(f"attention {geo_name} B={b} T={_ctx(t)}: skipped, does not fit")
        return rows
    scaling = d**-0.5
    caches = [
        tuple(torch.randn(b, hkv, t, d, device=device, dtype=dtype) for _ in range(2)) for _ in range(n)
    ]  # (keys, values) copies, rotated when the whole cache would sit in L2
    picks_sets = max(n, _copies(picked_bytes, device))  # and the selected rows, which are fewer
    sets = []
    for i in range(picks_sets):
        query = torch.randn(b, geo.q_heads, 1, d, device=device, dtype=dtype)
        picks = torch.rand(b, hkv, t, device=device).topk(k, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, k]
        sets.append((query, *caches[i % n], picks))

    calls = [lambda s=s: sparse_decode(*s, scaling) for s in sets]
    rows.append(_measure("attention", geo_name, b, t, "sparse_decode", calls, picked_bytes, bandwidth))

    def gather_sdpa(query, keys, values, picks):
        rows_ = picks[..., None].expand(-1, -1, -1, d)
        return F.scaled_dot_product_attention(
            query, keys.gather(2, rows_), values.gather(2, rows_), scale=scaling, enable_gqa=True
        )

    calls = [lambda s=s: gather_sdpa(*s) for s in sets]
    rows.append(_measure("attention", geo_name, b, t, "gather+SDPA", calls, picked_bytes, bandwidth))
    calls = [  # dense reads every row: rotate over the cache copies only
        lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], scale=scaling, enable_gqa=True) for s in sets[:n]
    ]
    try:
        rows.append(_measure("attention", geo_name, b, t, "dense SDPA", calls, dense_bytes, bandwidth))
    except torch.OutOfMemoryError:
        log(f"attention {geo_name} B={b} T={_ctx(t)} dense SDPA: out of memory")
    del sets, calls, caches
    return rows


def run_bench(
    kind: str,
    *,
    geometries: dict[str, Geometry] | None = None,
    contexts: tuple[int, ...] = CONTEXTS,
    batches: tuple[int, ...] = BATCHES,
    budget: Budget | None = None,
    dtype: torch.dtype = torch.float16,
    bandwidth: float | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Benchmark `kind` ("retrieval" or "attention") on a CUDA device; logs and returns the rows.

    The first row of each configuration is our kernel; every row's `speedup` is its time over ours.
    """
    if kind not in ("retrieval", "attention"):
        raise ValueError(f"unknown benchmark {kind!r}: choose 'retrieval' or 'attention'")
    log = log or logger.info
    device = torch.device(device or "cuda")
    require_cuda(device)
    geometries = geometries or GEOMETRIES
    budget = budget or Budget(0.02, 20, 4, 16)
    bandwidth = bandwidth or copy_bandwidth(device)
    log(f"# {kind}: {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, budget {budget}")
    log(HEADER)
    rows: list[Row] = []
    for geo_name, geo in geometries.items():
        for b in batches:
            for t in contexts:
                if kind == "retrieval":
                    new = _retrieval_rows(geo_name, geo, b, t, budget, bandwidth, device, log)
                else:
                    new = _attention_rows(geo_name, geo, b, t, budget, dtype, bandwidth, device, log)
                for row in new:  # graph times where both rows have one, else eager times
                    both = not (math.isnan(row.graph_us) or math.isnan(new[0].graph_us))
                    row.speedup = row.graph_us / new[0].graph_us if both else row.eager_us / new[0].eager_us
                    log(row.line())
                rows.extend(new)
                torch.cuda.empty_cache()
    return rows


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
