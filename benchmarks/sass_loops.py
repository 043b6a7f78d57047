"""Instructions per key in score_select's loops, from its SASS, compiled for sm_90 with no GPU.

    pip install --target /tmp/triton36 --no-deps triton==3.6.0   # the GPU machine's Triton
    PYTHONPATH=/tmp/triton36:src python benchmarks/sass_loops.py [--before] [--dump FILE.sass]

Triton's wheel carries ptxas and nvdisasm, so the fused kernel (`_select_kernel`) compiles here as it
does on the H200, for the launch `_score_select_triton` makes at 128K x 6 (Llama-3-8B: 48 rows of
131,136 keys, G = 4, 128 bits; 11 chunks of 12 blocks of 1024 keys, 4 warps, so 8 keys a thread a
block), with the argument alignments Triton's launcher specialises on. Each loop body (a backward
branch) is printed with its instruction count, per key and per source line; the three big loops
are pass 1's interior blocks, pass 2's counting and pass 3's emitting. `--before` compiles the
settings of before commit 137e5ca: tl.histogram in pass 1 (64 buckets of 8 scores), 8-bit fields
in pass 2, tl.store of the picks. Registers: 127 before, as Nsight Compute reported on the H200
(h200_gen25_ncu.txt); 125 now.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spotlight_attn.kernels import _triton
from spotlight_attn.kernels import score_select as select

T = 131136  # 128K + 64 steps of room, as the static cache holds
RUNTIME = dict(stride_qb=128, stride_qk=16, stride_qg=4, stride_kb=8 * T * 4, stride_kh=T * 4, stride_bb=3, stride_bh=0, num_kv_heads=8, T=T,
               score_stride=T, bits=128, sink=4, window=16, k=2624, n_chunks=11, chunk_blocks=12)
POINTERS = dict(q_ptr="*i32", k_ptr="*i32", bounds_ptr="*i32", score_ptr="*i16", hist_ptr="*i32", forced_ptr="*i32",
                base_ptr="*i32", state_ptr="*i32", stats_ptr="*fp32", guess_ptr="*fp32", fine_ptr="*i32", emit_ptr="*i32",
                out_ptr="*i64", counter_ptr="*i32")
NOW = dict(G=4, W=4, W_PAD=4, G_PAD=4, PAR=1, NP=2, SHIFT=4, NBC=32, MAXC=16, BT=1024, HW_POPC=True, FORCED=32767,
           PREFETCH=True, SPLIT=True, CP=5, FB=16, BT_REFINE=1024, BT_EMIT=1024, PACKED=4, SCORE=True, ASM_STORE=True,
           GUESS=False, RP=0)
BEFORE = dict(NOW, SHIFT=3, NBC=64, CP=0, FB=8, PACKED=8, ASM_STORE=False)
GUESS = dict(NOW, GUESS=True, RP=5)  # with the threshold prediction (the static cache's default)


def compile_sass(const: dict, num_warps: int = 4) -> tuple[str, int]:
    """The kernel's SASS for these constexprs, and its registers a thread (-1 if cuobjdump does not say)."""
    _triton.bind(vars(select))
    fn = select._select_kernel
    names = list(inspect.signature(fn.fn).parameters)
    signature, attrs, constants = {}, {}, {}
    for i, name in enumerate(names):
        if name in const:
            signature[name], constants[(i,)] = "constexpr", const[name]
        elif name in POINTERS:
            signature[name], attrs[(i,)] = POINTERS[name], [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if RUNTIME[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", "-g", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return sass, int(regs.group(1)) if regs else -1


def loops(sass: str) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
    """Loop bodies [start, end] (a branch back to a label) with their instructions (address, op, source line)."""
    instrs, label_at, pending, where = [], {}, None, "?"
    for line in sass.splitlines():
        src = re.search(r'File "([^"]+)", line (\d+)', line)
        if src:
            where = f"{os.path.basename(src.group(1))}:{src.group(2)}"
            continue
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            addr = int(ins.group(1), 16)
            if pending:
                label_at[pending], pending = addr, None
            instrs.append((addr, ins.group(2).strip(), where))
    found = []
    for addr, text, _ in instrs:
        target = re.search(r"BRA.*?(\.L_x_\d+)", text)
        if target and label_at.get(target.group(1), addr) < addr:
            start = label_at[target.group(1)]
            found.append((start, addr, [i for i in instrs if start <= i[0] <= addr]))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", action="store_true", help="the settings of before commit 137e5ca")
    parser.add_argument("--guess", nargs="?", const="bands", choices=("bands", "exact"),
                        help="with the threshold prediction (GUESS), in guess_bins' bands (default) or exact bins")
    parser.add_argument("--dump", metavar="FILE", help="also write the SASS here")
    args = parser.parse_args(argv)
    settings = BEFORE if args.before else dict(GUESS, GUESS=1 if args.guess == "bands" else 2) if args.guess else NOW
    sass, regs = compile_sass(settings)
    if args.dump:
        with open(args.dump, "w") as out:
            out.write(sass)
    keys_per_thread = NOW["BT"] // (32 * 4)
    which = "before 137e5ca" if args.before else f"with the prediction ({args.guess})" if args.guess else "now"
    print(f"triton {triton.__version__}, sm_90, {which}: {regs} registers")
    names = ["pass 1, leading masked blocks", "pass 1, interior blocks", "pass 1, trailing masked blocks", "pass 2",
             "pass 3"]
    big = [(start, end, body) for start, end, body in loops(sass) if len(body) >= 100]  # not barrier waits
    for i, (start, end, body) in enumerate(big):
        name = names[i] if len(big) == len(names) else f"loop {i}"
        lines = collections.Counter(where for _, _, where in body).most_common(5)
        print(f"{name:<31} {len(body):4d} instructions, {len(body) / keys_per_thread:5.1f} a key; most from "
              f"{', '.join(f'{w} ({n})' for w, n in lines)}")
    if len(big) == len(names):
        per_key = sum(len(big[i][2]) for i in (1, 3, 4)) / keys_per_thread
        print(f"a key of an interior block, through passes 1-3: {per_key:.1f} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
