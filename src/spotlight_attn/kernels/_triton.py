"""Triton plumbing shared by the kernel files: late import, dispatch, and zeroed counters.

Why Triton is imported on the first launch and not at package import:
- CPU installs may lack Triton; the references must still import and run.
- Triton reads TRITON_INTERPRET when it decorates a function (its own library functions
  included), so a test that sets it must run before the first `import triton` of the process.
  Importing `spotlight_attn` therefore never imports Triton.

A kernel file marks its Triton functions with `@kernel`, keeps module globals `triton`, `tl`,
`libdevice`, `_sum`, `_max` and `_cumsum` set to None, and calls `bind(globals())` at the top of each
launcher: that imports Triton once, binds those names and replaces every marked function by
`triton.jit(fn)`.

`_sum` / `_max` / `_cumsum` stand in for tl.sum / tl.max / tl.cumsum. Those are themselves Triton
functions, decorated when Triton is imported; if anything imported Triton before TRITON_INTERPRET was
set (transformers does, through torch), the interpreter cannot call them. tl.reduce / tl.associative_scan
with Triton's own combine functions compile to the same code and run under the interpreter either way.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

_REGISTRY = "_TRITON_FUNCTIONS"
FORCE_REFERENCE_ENV = "SPOTLIGHT_FORCE_REFERENCE"


def kernel(fn: Callable) -> Callable:
    """Mark `fn` as a Triton function of its module; `bind` jit-compiles it. Returns fn unchanged."""
    fn.__globals__.setdefault(_REGISTRY, []).append(fn.__name__)
    return fn


def bind(namespace: dict) -> None:
    """Import Triton (once per module) and turn the module's marked functions into Triton functions."""
    if namespace.get("tl") is not None:
        return
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    here = globals()
    if namespace is not here:
        bind(here)  # the shared reductions below, jitted once
        namespace.update(_sum=here["_sum"], _max=here["_max"], _cumsum=here["_cumsum"])
    namespace.update(triton=triton, tl=tl, libdevice=libdevice)
    for name in namespace.get(_REGISTRY, []):
        namespace[name] = triton.jit(namespace[name])


triton = tl = libdevice = None  # bound by bind(globals())


@kernel
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@kernel
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@kernel
def _cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_kernel(
    tensors: tuple[torch.Tensor, ...], use_kernel: bool | None = None, force_reference: bool = False
) -> bool:
    """Kernel or reference for these inputs?

    The reference when `force_reference` or SPOTLIGHT_FORCE_REFERENCE=1; else `use_kernel` when it is
    given (tests pass True to run the kernel on CPU tensors under TRITON_INTERPRET=1); else the kernel
    exactly when every tensor is on a CUDA device and Triton is installed.
    """
    if force_reference or os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        return False
    if use_kernel is not None:
        if use_kernel and not triton_installed():
            raise RuntimeError("use_kernel=True needs Triton: pip install 'spotlight-attn[triton]'")
        if use_kernel and not interpreting() and any(not t.is_cuda for t in tensors):
            raise RuntimeError("the Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
        return use_kernel
    return all(t.is_cuda for t in tensors) and triton_installed()


def num_programs_target(device: torch.device) -> int:
    """Programs a launch should offer: about four per multiprocessor (one when interpreting)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


_RESIDENT: dict[tuple, int] = {}


def resident_programs(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """How many programs of `kernel` compiled for these arguments the GPU holds at once (0 if unknown).

    A kernel whose programs wait for each other may only launch a grid this size or smaller. From the
    compiled kernel's registers, warps and shared memory against the multiprocessor's limits (CUDA's
    occupancy rules: registers granted per warp in units of 256, 1 KB of shared memory reserved per
    program); Triton's compiled-kernel attributes are the one version-specific detail."""
    try:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        key = (compiled.hash, device.index)
        if key not in _RESIDENT:
            compiled.run  # loads the binary, which fills in n_regs  # noqa: B018
            props = torch.cuda.get_device_properties(device)
            warps = compiled.metadata.num_warps
            regs = -(-max(compiled.n_regs, 1) // 8) * 8 * 32 * warps
            per_sm = min(
                getattr(props, "regs_per_multiprocessor", 65536) // regs,
                props.max_threads_per_multi_processor // (32 * warps),
                getattr(props, "shared_memory_per_multiprocessor", 233472) // (compiled.metadata.shared + 1024),
                32,
            )
            _RESIDENT[key] = per_sm * props.multi_processor_count
        return _RESIDENT[key]
    except Exception:  # an unknown Triton or driver: do not rely on residency
        return 0


# Completion counters for the "last program finishes the row" pattern. Every kernel that uses them
# leaves them at zero, so one zeroed ring per device serves all launches; each launch takes the next
# slice, so launches in flight on different streams do not share counters.
_RING = 1 << 16
_COUNTERS: dict[int, tuple[torch.Tensor, int]] = {}


def zeroed_counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros the kernel may count in; it must leave them at zero before exiting."""
    if device.type != "cuda" or n > _RING:  # interpreter runs: fresh zeros, so a failed run leaves nothing behind
        return torch.zeros(n, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COUNTERS:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the Spotlight kernels once before capturing them in a CUDA graph")
        _COUNTERS[index] = (torch.zeros(_RING, dtype=torch.int32, device=device), 0)
    ring, pos = _COUNTERS[index]
    pos = 0 if pos + n > _RING else pos
    _COUNTERS[index] = (ring, pos + n)
    return ring[pos : pos + n]


def reset_counters() -> None:
    """Drop the counter rings (after a failed launch may have left one non-zero)."""
    _COUNTERS.clear()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
