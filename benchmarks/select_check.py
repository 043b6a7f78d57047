"""score_select on CUDA against the reference at the decode step's own sizes (seconds, not minutes).

    PYTHONPATH=src python benchmarks/select_check.py

tests/test_kernels.py covers the awkward shapes and every launch variant but compiles hundreds of
kernels (8 minutes on the H200); this compiles the default launch only, at 128K x 6 and 70K x 1
(Llama-3-8B: 8 KV heads of 4 query heads, 128 bits) and a SmolLM2-like 3-head group of 100 bits,
with one left-padded row, at 2% and 30%, and with head budgets (a fraction per KV head, per-head
bounds), each without a threshold prediction and with one over three steps (a fresh buffer, then
what each step left; then one far off, which takes the recount). Prints one line: whether every
selection equals the reference exactly; exits 1 if not.
"""

import sys

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.pack import pack_signs_reference
from spotlight_attn.kernels.score_select import _score_select_triton, new_guess, plan_select, score_select_reference

g = torch.Generator().manual_seed(0)
ok = True
for b, hkv, group, bits, t in [(6, 8, 4, 128, 131136), (1, 8, 4, 128, 70001), (2, 3, 3, 100, 50001)]:
    q = pack_signs_reference(torch.rand(b, hkv * group, 1, bits, generator=g) - 0.5)
    k = pack_signs_reference(torch.rand(b, hkv, t, bits, generator=g) - 0.5)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, : t // 3] = False
    spread = tuple(float(f) for f in torch.linspace(0.005, 0.08, hkv).tolist())
    for budget in (Budget(0.02, 20, 4, 16), Budget(0.3, 0, 0, 0), Budget(0.02, 20, 4, 16, heads=spread)):
        expected = score_select_reference(q, k, valid, budget, bits)
        plan = plan_select(valid.cuda(), budget, hkv)
        got = _score_select_triton(q.cuda(), k.cuda(), plan, bits).cpu()
        ok &= torch.equal(got, expected)
        for bins in ("bands", "exact"):
            guess = new_guess(b, hkv, "cuda")
            for step in range(4):
                if step == 3:
                    guess.fill_(90.0)
                got = _score_select_triton(q.cuda(), k.cuda(), plan, bits, guess=guess, guess_bins=bins).cpu()
                ok &= torch.equal(got, expected)
print("GPU score_select equals the reference:", ok)
sys.exit(0 if ok else 1)
