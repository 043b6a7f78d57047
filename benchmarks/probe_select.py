"""Why is score_select slower inside the decode engine (B=3, 128K) than in the kernel benchmark?

Times score_select (graph medians) on the same shape with: random codes vs SimHash codes of random
keys, plan_select vs plan_from_lengths, and a few launch settings; then the per-kernel profile.
    PYTHONPATH=src python3 benchmarks/probe_select.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

from spotlight_attn.bench import _median_graph_us
from spotlight_attn.config import Budget
from spotlight_attn.kernels.pack import pack_signs
from spotlight_attn.kernels.score_select import _score_select_triton, plan_from_lengths, plan_select

dev = torch.device("cuda")
budget = Budget(0.02, 20, 4, 16)
for b, t in [(1, 131101), (3, 131101), (8, 32797), (1, 524288)]:
    hkv, hq, d = 8, 32, 128
    g = torch.Generator(device=dev).manual_seed(0)
    rand_codes = torch.randint(-(2**31), 2**31 - 1, (b, hkv, t, 4), dtype=torch.int32, device=dev, generator=g)
    rand_q = torch.randint(-(2**31), 2**31 - 1, (b, hq, 1, 4), dtype=torch.int32, device=dev, generator=g)
    proj = torch.randn(hkv, d, 128, device=dev, generator=g)
    keys = torch.randn(b, hkv, t, d, device=dev, generator=g, dtype=torch.bfloat16)
    sim_codes = torch.cat([pack_signs(keys[:, :, s : s + 32768].float() @ proj) for s in range(0, t, 32768)], dim=2)
    q = torch.randn(b, hkv, 4, d, device=dev, generator=g)
    sim_q = pack_signs(q @ proj).reshape(b, hq, 1, 4)
    del keys
    valid = torch.ones(b, t, dtype=torch.bool, device=dev)
    p_host = plan_select(valid, budget)
    p_dev = plan_from_lengths(torch.full((b,), t, device=dev), budget, budget.tokens_for(t))
    print(f"B={b} T={t} k={p_host.k}: codes {b * hkv * t * 16 / 1e6:.1f} MB, floor {b * hkv * t * 16 / 3.0e9 * 1e6:.1f} us")
    for name, qc, kc, plan, kw in [
        ("random codes, host plan", rand_q, rand_codes, p_host, {}),
        ("random codes, device plan", rand_q, rand_codes, p_dev, {}),
        ("simhash codes, device plan", sim_q, sim_codes, p_dev, {}),
        ("simhash, programs_per_sm=8", sim_q, sim_codes, p_dev, {"programs_per_sm": 8}),
        ("simhash, programs_per_sm=2", sim_q, sim_codes, p_dev, {"programs_per_sm": 2}),
        ("simhash, block 512 warps 4", sim_q, sim_codes, p_dev, {"block_tokens": 512, "score_warps": 4}),
    ]:
        us = _median_graph_us([lambda: _score_select_triton(qc, kc, plan, 128, **kw)])
        print(f"  {name:32s} {us:8.1f} us")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            _score_select_triton(sim_q, sim_codes, p_dev, 128)
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:4]:
        print(f"    {e.key[:40]:40s} {e.device_time_total / 10:8.1f} us")
    del rand_codes, sim_codes
    torch.cuda.empty_cache()
