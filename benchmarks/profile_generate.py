"""Where a decode step's time goes, through model.generate() on CUDA (docs/BENCHMARKS.md, "Profile").

For each method (the library's dense path, SimHash, the learned-hash shape) on a random-weight shape
with the cache filled as `spotlight bench decode` fills it, after generate()'s own warm-up call:
- step: ms per token of a timed generate() (streamer stamps, as the bench);
- forward GPU: CUDA events around each call of generate()'s compiled forward (one graph replay), so
  the device time of the step itself; forward host: the host time of that call (guards, replay);
- rest: step - forward GPU, the time the device waits for generate()'s host work between forwards
  (about 0.07 ms since generate() over our static cache reads its stop flag one step late; 0.4-1.9
  ms before, when it read the flag after every step);
- kernels: torch.profiler over a few generate() steps, device time per step by kernel family and
  the kernels themselves, per step.

    python benchmarks/profile_generate.py --shape llama3-8b --context 128K --batch 6 --out $OUT/profile
Writes <out>/profile.json (one row per method) and <out>/<method>_kernels.txt; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spotlight_attn import decode_bench as db  # noqa: E402
from spotlight_attn.attention import disable, enable  # noqa: E402
from spotlight_attn.bench import _ctx  # noqa: E402
from spotlight_attn.cli.bench_cmd import parse_tokens  # noqa: E402

FAMILIES = [  # kernel name pattern -> family, first match wins
    ("score_select", r"_select_kernel|_score_kernel|_refine_kernel|_emit_kernel|score_select"),
    ("sparse_decode", r"_sparse_decode"),
    ("hash", r"_hash_kernel|_hash_rows_kernel"),
    ("dense attention", r"flash|fmha|attention"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|sm90_|sm80_|xmma|splitK|cublas"),
    ("inductor fused", r"^triton_"),
    ("copies, index_put, other", r"."),
]


def family_of(name: str) -> str:
    for family, pattern in FAMILIES:
        if re.search(pattern, name):
            return family
    return "other"


class ForwardTimer:
    """Wraps generate()'s compiled forward: host seconds per call and CUDA events around it."""

    def __init__(self, inner):
        self.inner, self.host, self.events = inner, [], []
        self.last = None  # (args, kwargs) of the last call

    def __call__(self, *args, **kwargs):
        self.last = (args, kwargs)
        with torch.profiler.record_function("compiled_forward"):
            return self._timed(*args, **kwargs)

    def _timed(self, *args, **kwargs):
        cuda = torch.cuda.is_available()
        start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
        t0 = time.perf_counter()
        cuda and start.record()
        out = self.inner(*args, **kwargs)
        cuda and end.record()
        self.host.append(time.perf_counter() - t0)
        self.events.append((start, end))
        return out

    def gpu_ms(self) -> list[float]:
        if not torch.cuda.is_available():  # a smoke run on the CPU: host time stands in
            return [h * 1e3 for h in self.host]
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in self.events]


def _file(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def profile_one(model, ids, mask, cache, rewind, steps: int, prof_steps: int, out_dir: Path, label: str,
                trace: bool = False) -> dict:
    row = {"method": label}
    rewind and rewind()
    t0 = time.perf_counter()
    db._timed_generate(model, ids, mask, cache, 8)  # warm-up: compile, capture
    row["warmup_s"] = time.perf_counter() - t0
    rewind and rewind()
    row["step_ms"] = db._timed_generate(model, ids, mask, cache, steps) * 1e3

    compiled = getattr(model, "_compiled_call", None) or (None if torch.cuda.is_available() else model.forward)
    row["compiled"] = compiled is not None
    if compiled is not None:
        timer = ForwardTimer(compiled)
        model._compiled_call = timer
        rewind and rewind()
        db._timed_generate(model, ids, mask, cache, steps)
        model._compiled_call = compiled
        gpu = timer.gpu_ms()[1:]  # the first call after the prefill-shaped one may differ
        row["forward_gpu_ms"] = median(gpu)
        row["forward_host_ms"] = median(timer.host[1:]) * 1e3
        row["rest_ms"] = row["step_ms"] - row["forward_gpu_ms"]
        if torch.cuda.is_available():
            row.update(back_to_back(compiled, timer.last, rewind, prof_steps, out_dir, label))
        if trace:  # a timeline of generate() steps: host calls, graph launches, kernels (chrome://tracing)
            from torch.profiler import ProfilerActivity, profile

            model._compiled_call = ForwardTimer(compiled)
            rewind and rewind()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                db._timed_generate(model, ids, mask, cache, 5)
            model._compiled_call = compiled
            path = out_dir / f"{_file(label)}_trace.json"
            prof.export_chrome_trace(str(path))
            import gzip
            import shutil

            with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
    return row


def back_to_back(compiled, last, rewind, prof_steps: int, out_dir: Path, label: str) -> dict:
    """generate()'s last compiled forward called again and again with its own inputs (each call adds
    one token), with no host read between calls: its device time when nothing waits on the host,
    its host time by function (cProfile), and its kernels (torch.profiler)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    args, kwargs = last
    row = {}
    with torch.no_grad():
        rewind and rewind()
        for _ in range(2):
            compiled(*args, **kwargs)
        torch.cuda.synchronize()
        n = 16
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(n):
            compiled(*args, **kwargs)
        end.record()
        host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        row["loop_gpu_ms"], row["loop_host_ms"] = start.elapsed_time(end) / n, host * 1e3
        rewind and rewind()
        stats = cProfile.Profile()
        stats.enable()
        for _ in range(5):
            compiled(*args, **kwargs)
        stats.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(stats, stream=text).sort_stats("tottime").print_stats(40)
        (out_dir / f"{_file(label)}_host.txt").write_text(f"# {label}: cProfile of 5 compiled forwards\n" + text.getvalue())
        rewind and rewind()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                compiled(*args, **kwargs)
            torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])  # name -> [count, device us]
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time
    per_step = prof_steps
    families = defaultdict(float)
    for name, (count, us) in kernels.items():
        families[family_of(name)] += us / per_step
    row["kernels_per_step"] = sum(c for c, _ in kernels.values()) / per_step
    row["kernel_us_per_step"] = sum(us for _, us in kernels.values()) / per_step
    row["families_us_per_step"] = dict(sorted(families.items(), key=lambda kv: -kv[1]))
    lines = [f"# {label}: kernels of {prof_steps} compiled forwards, per forward (device us, calls)"]
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{us / per_step:10.1f} us {count / per_step:7.1f}x  {family_of(name):24s} {name[:140]}")
    (out_dir / f"{_file(label)}_kernels.txt").write_text("\n".join(lines) + "\n")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(db.SHAPES))
    p.add_argument("--context", default="128K")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--hasher", default="linear,mlp")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prof-steps", type=int, default=6)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trace", action="store_true", help="also write a chrome trace of 5 generate() steps per method")
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of this script")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    (context,) = parse_tokens(a.context)
    settings = db.Settings(budgets=[a.budget], hashers=tuple(a.hasher.split(",")), steps=a.steps,
                         baselines=() if a.no_dense else ("dense",))
    device = torch.device(a.device)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = db.build_model(db.SHAPES[a.shape], context + a.steps + 512, device)
    max_tokens = context + 1 + a.steps + 64
    ids = torch.randint(3, model.config.vocab_size, (a.batch, context + 1), device=device)
    mask = torch.ones_like(ids)
    rows = []
    for method, hasher_name, budget, config, hasher in db._configs(model, settings):
        label = method if hasher_name == "none" else f"{hasher_name} {budget * 100:g}%"
        enable(model, hasher, config)
        cache, rewind = db._fill_spotlight(model, a.batch, context, max_tokens, seed=0)
        try:
            row = profile_one(model, ids, mask, cache, rewind, a.steps, a.prof_steps, a.out, label, a.trace)
        finally:
            disable(model)
            del cache, rewind
            db._reset_compiled(model)
        row.update(shape=a.shape, context=context, batch=a.batch, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        rows.append(row)
        print(json.dumps(row), flush=True)
        (a.out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{a.shape} {_ctx(context)} x {a.batch}: ms per decode step. step: through generate(); fwd: its compiled "
          "forward (GPU: events around the call, host: the call's own time); rest = step - fwd GPU; loop: the forward "
          "back to back; kernels: per forward")
    print(f"{'method':12s} {'step':>7s} {'fwdGPU':>7s} {'fwdHost':>7s} {'rest':>6s} {'loopGPU':>7s} {'loopHost':>8s} "
          f"{'kernels':>7s} {'kern ms':>7s}  families (us per forward)")
    nan = float("nan")
    for r in rows:
        fam = ", ".join(f"{k} {v:.0f}" for k, v in r.get("families_us_per_step", {}).items())
        print(f"{r['method']:12s} {r['step_ms']:7.2f} {r.get('forward_gpu_ms', nan):7.2f} {r.get('forward_host_ms', nan):7.2f} "
              f"{r.get('rest_ms', nan):6.2f} {r.get('loop_gpu_ms', nan):7.2f} {r.get('loop_host_ms', nan):8.2f} "
              f"{r.get('kernels_per_step', nan):7.0f} {r.get('kernel_us_per_step', nan) / 1e3:7.2f}  {fam}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
