"""Does asking L2 for the output projection's weights during score_select shorten a layer's tail?

    PYTHONPATH=src python benchmarks/l2_prefetch_probe.py [--out DIR]

A sparse layer of the Llama-3-8B decode step runs score_select, then sparse_decode, then o_proj (a
4096 x 4096 bf16 GEMM, 32 MiB of weights read cold from DRAM at 59% of the copy bandwidth at batch 6,
docs/BENCHMARKS.md). score_select leaves most of the DRAM bandwidth idle (35% under Nsight Compute),
so its programs can ask L2 for the weights (`l2_prefetch`) and the GEMM then reads them from L2.

Each case is one CUDA graph of: a 256 MiB write (evicts L2, as the rest of a step does), score_select
(with or without the prefetch), sparse_decode, the o_proj GEMM; and the same without the GEMM, so
that the GEMM's share is the difference. At 128K x 6 and 512K x 1 in the step's layouts (random codes,
random K/V, 2% budget). Prints a table last; writes DIR/l2_prefetch_probe.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from spotlight_attn.bench import _median_graph_us
from spotlight_attn.config import Budget
from spotlight_attn.kernels.score_select import _score_select_triton, plan_from_lengths
from spotlight_attn.kernels.sparse_decode import sparse_decode


def case(device, batch: int, context: int, budget: Budget) -> list[dict]:
    hq, hkv, dim, bits, hidden = 32, 8, 128, 128, 4096
    t_max, n = context + 64, context + 32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randint(-(2**31), 2**31 - 1, (batch, hq, 1, bits // 32), dtype=torch.int32, device=device, generator=g)
    codes = torch.randint(-(2**31), 2**31 - 1, (batch, hkv, t_max, bits // 32), dtype=torch.int32, device=device,
                          generator=g)
    plan = plan_from_lengths(torch.full((batch,), n, device=device), budget, budget.tokens_for(t_max))
    query = torch.randn(batch, hq, 1, dim, device=device, dtype=torch.bfloat16, generator=g)
    by_token = torch.randn(batch, t_max, hkv, dim, device=device, dtype=torch.bfloat16, generator=g)
    keys, values = by_token.transpose(1, 2), torch.randn_like(by_token).transpose(1, 2)
    weight = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16, generator=g) * 0.01
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    holder = {}

    def layer(prefetch: bool, gemm: bool):
        def call():
            flush.fill_(1)
            picks = _score_select_triton(q, codes, plan, bits, l2_prefetch=weight if prefetch else None)
            out = sparse_decode(query, keys, values, picks, dim**-0.5)
            if gemm:
                holder["y"] = out.reshape(batch, hidden) @ weight.t()
        return call

    def gemm_only(warm: bool):
        x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)

        def call():
            if not warm:
                flush.fill_(1)
            holder["y"] = x @ weight.t()
        return call

    flush_us = _median_graph_us([lambda: flush.fill_(1)])
    rows = []
    label = f"{context // 1024}K x {batch}"
    for prefetch in (False, True):
        with_gemm = _median_graph_us([layer(prefetch, True)])
        without = _median_graph_us([layer(prefetch, False)])
        rows.append(dict(case=label, prefetch=prefetch, layer_us=round(with_gemm - flush_us, 2),
                         select_decode_us=round(without - flush_us, 2), gemm_share_us=round(with_gemm - without, 2)))
    cold = _median_graph_us([gemm_only(False)]) - flush_us
    warm = _median_graph_us([gemm_only(True)])
    rows.append(dict(case=label, prefetch=None, gemm_cold_us=round(cold, 2), gemm_l2_us=round(warm, 2)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    budget = Budget(0.02, 20, 4, 16)
    rows = case(device, 6, 131072, budget) + case(device, 1, 524288, budget)
    for row in rows:
        print(json.dumps(row))
    print("\ncase        prefetch  layer us  select+decode us  GEMM share us")
    for row in rows:
        if row["prefetch"] is not None:
            print(f"{row['case']:<11} {str(row['prefetch']):<9} {row['layer_us']:>8.2f}  {row['select_decode_us']:>16.2f}"
                  f"  {row['gemm_share_us']:>13.2f}")
        else:
            print(f"{row['case']:<11} GEMM alone: cold {row['gemm_cold_us']:.2f} us, weights in L2 {row['gemm_l2_us']:.2f} us")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "l2_prefetch_probe.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
