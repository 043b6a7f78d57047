"""The decode step's kernels at 128K x 6 (Llama-3-8B shape, 2%), a few launches each, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:"_hash|_score|_select|_refine|_emit|_sparse" --launch-skip 4 \\
        --launch-count 4 --set detailed --section SourceCounters python benchmarks/ncu_probe.py

It runs three rounds of: the learned-hash shape's fused hash (8 KV heads x 30 rows, depth 2, width
128, 128 bits) in the current kernel and in `HASH_VARIANT` (keyword arguments of _hash_codes_triton,
a Python dict literal, default the 16-row tl.dot kernel), score_select (one fused launch on
the H200, three where the fused kernel does not fit) and sparse_decode (1 launch) in the step's layouts.
--launch-skip 4 profiles the second round (of the fused kernel).
"""

import ast
import os

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.hash import _hash_codes_triton
from spotlight_attn.kernels.score_select import _score_select_triton, plan_from_lengths
from spotlight_attn.kernels.sparse_decode import sparse_decode

device, budget = torch.device("cuda"), Budget(0.02, 20, 4, 16)
b, context, hq, hkv, dim, bits = 6, 131072, 32, 8, 128, 128
t_max, n = context + 64, context + 32
variant = ast.literal_eval(os.environ.get("HASH_VARIANT", "{'block_m': 16}"))

g = torch.Generator(device=device).manual_seed(0)
rows = torch.randn(hkv, b * (hq // hkv + 1), dim, device=device, generator=g).bfloat16()
weights = (
    torch.randn(2, hkv, dim, dim, device=device, generator=g) * 0.05, torch.zeros(2, hkv, 1, dim, device=device),
    torch.randn(2, hkv, dim, dim, device=device, generator=g) * 0.05, torch.zeros(2, hkv, 1, dim, device=device),
    torch.randn(hkv, dim, bits, device=device, generator=g) * dim**-0.5,
)
q = torch.randint(-(2**31), 2**31 - 1, (b, hq, 1, bits // 32), dtype=torch.int32, device=device)
codes = torch.randint(-(2**31), 2**31 - 1, (b, hkv, t_max, bits // 32), dtype=torch.int32, device=device)
plan = plan_from_lengths(torch.full((b,), n, device=device), budget, budget.tokens_for(t_max))
query = torch.randn(b, hq, 1, dim, device=device, dtype=torch.bfloat16)
by_token = torch.randn(b, t_max, hkv, dim, device=device, dtype=torch.bfloat16)
keys, values = by_token.transpose(1, 2), torch.randn_like(by_token).transpose(1, 2)
for _ in range(3):
    _hash_codes_triton(rows, *weights)
    _hash_codes_triton(rows, *weights, **variant)
    picks = _score_select_triton(q, codes, plan, bits)
    sparse_decode(query, keys, values, picks, dim**-0.5)
torch.cuda.synchronize()
