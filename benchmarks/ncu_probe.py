"""One score_select and one sparse_decode call (Llama-3-8B geometry, batch 1, 512K tokens) for Nsight Compute.

    ncu --clock-control none --kernel-name regex:"_score|_refine|_emit|_sparse" --launch-skip 8 \\
        --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/ncu_probe.py

Two warm-up rounds first (4 kernel launches each), so --launch-skip 8 profiles the third.
"""

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.score_select import plan_select, score_select
from spotlight_attn.kernels.sparse_decode import sparse_decode

t, budget, device = 524288, Budget(0.02, 20, 4, 16), torch.device("cuda")
q = torch.randint(-(2**31), 2**31 - 1, (1, 32, 1, 4), dtype=torch.int32, device=device)
codes = torch.randint(-(2**31), 2**31 - 1, (1, 8, t, 4), dtype=torch.int32, device=device)
valid = torch.ones(1, t, dtype=torch.bool, device=device)
plan = plan_select(valid, budget)
query = torch.randn(1, 32, 1, 128, device=device, dtype=torch.float16)
keys = torch.randn(1, 8, t, 128, device=device, dtype=torch.float16)
values = torch.randn_like(keys)
for _ in range(3):
    picks = score_select(q, codes, valid, budget, 128, plan=plan)
    sparse_decode(query, keys, values, picks, 128**-0.5)
torch.cuda.synchronize()
