"""How far a row's selection threshold moves from one decode step to the next (issue 13, score_select).

score_select finds each row's k-th best score by counting: a coarse histogram of every key's score,
then exact counts inside the bucket that holds the k-th, then the picks. If the threshold could be
predicted before the scores are counted, the first histogram could hold exact bins around the
prediction and the second pass would go. This script measures two predictions on the real model,
in the kernel's shifted score unit x (kernels/score_select.py's docstring):
  prev      the row's threshold at the previous step;
  residual  m + r_prev * s, where m = sum(w) / 2 and s = sqrt(sum(w^2)) / 2 are the mean and spread
            x would have over keys of random bits (w: the query group's per-bit weights |d| >> PAR,
            known before any key is read), and r_prev = (threshold - m) / s at the previous step;
  smooth    m + r * s with r a running mean of the residuals, r <- r + a (r_step - r) after the first
            (--smooth a, default GUESS_SMOOTH): what the kernel keeps.

    PYTHONPATH=src python benchmarks/threshold_drift.py --pack kjv-4112.safetensors --budgets 0.1,0.02

It decodes --new tokens after each --prompt-token chunk of the pack with the shipped hasher and prints,
per budget and prediction, how often the miss |threshold - prediction| stays within each half-width,
and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

import torch

from spotlight_attn import SpotlightConfig, enable, load_model, shipped_hasher, load_hasher
from spotlight_attn.kernels.score_select import GUESS_EXACT, GUESS_SMOOTH, GUESS_START, shifted_scores
from spotlight_attn.selection import selectors

HALF_WIDTHS = (0, 1, 2, 4, 6, 8, 9, 12, 15)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", required=True)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--budgets", default="0.1,0.02")
    parser.add_argument("--smooth", type=float, default=GUESS_SMOOTH, help="weight of the newest residual in 'smooth'")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    from safetensors import safe_open

    with safe_open(args.pack, "pt") as f:
        tokens = f.get_tensor(next(iter(f.keys())))[: args.chunks, : args.prompt].to(torch.int64)
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    hasher = load_hasher(shipped_hasher(model), model, device=model.device)
    rows = []
    plain = selectors.score_select
    plain_select = selectors.HashSelector.select
    for budget_text in args.budgets.split(","):
        budget_amount = float(budget_text)
        enable(model, hasher, SpotlightConfig(method="spotlight", budget=budget_amount))
        trace: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
        current = {"layer": None}

        def recording(query_codes, key_codes, key_valid, budget, bits, **kw):
            x, m, s = shifted_scores(query_codes, key_codes, bits)
            x = x.float()
            n = int(key_valid[0].sum())
            pos = torch.arange(key_codes.shape[2])
            forced = (pos < budget.sink) | (pos >= n - budget.window)
            need = budget.tokens_for(n) - int(forced[:n].sum())
            x = x.masked_fill(forced | ~key_valid[:, None, :], -1e9)
            th = x.topk(need, dim=-1).values[..., -1]  # [B, Hkv]
            for h in range(th.shape[1]):
                trace.setdefault((current["layer"], h), []).append((float(th[0, h]), float(m[0, h]), float(s[0, h])))
            return plain(query_codes, key_codes, key_valid, budget, bits, **kw)

        def select(self, query, layer, budget, scaling):
            current["layer"] = layer.layer_idx
            return plain_select(self, query, layer, budget, scaling)

        selectors.score_select = recording
        selectors.HashSelector.select = select
        start = time.time()
        for c in range(tokens.shape[0]):
            trace.clear()
            ids = tokens[c : c + 1]
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new + 1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
            for (layer, h), seq in trace.items():
                r = GUESS_START
                smooth = math.nan  # as the kernel's buffer: NaN until the row measures a residual
                for (t0, m0, s0), (t1, m1, s1) in zip(seq, seq[1:]):
                    if s0 > 0:  # the kernel keeps r where s is 0 (no spread: every key scores the same)
                        r = (t0 - m0) / s0
                        smooth = r if math.isnan(smooth) else smooth + args.smooth * (r - smooth)
                    kept = GUESS_START if math.isnan(smooth) else smooth
                    rows.append(dict(budget=budget_amount, chunk=c, layer=layer, head=h, threshold=t1, m=m1, s=s1,
                                     prev=t0, residual=math.floor(m1 + r * s1 + 0.5),
                                     smooth=math.floor(m1 + kept * s1 + 0.5)))
            print(f"budget {budget_amount}: chunk {c + 1}/{tokens.shape[0]} ({time.time() - start:.0f} s)", file=sys.stderr)
        selectors.score_select = plain
        selectors.HashSelector.select = plain_select
    band_reach = GUESS_EXACT + 30  # bands of 2, 4, 8, 16 past the exact bins
    print(f"| budget | prediction | n | {' | '.join(f'<= {h}' for h in HALF_WIDTHS)} | exact bin (pass 2 skipped) "
          f"| band (pass 2) | past the bands (recount) |")
    print("|---|---|---:|" + "---:|" * (len(HALF_WIDTHS) + 3))
    for budget_amount in sorted({r["budget"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["budget"] == budget_amount]
        for pred in ("prev", "residual", "smooth"):
            miss = [abs(r["threshold"] - r[pred]) for r in sel]
            cells = " | ".join(f"{sum(d <= h for d in miss) / len(miss):.3f}" for h in HALF_WIDTHS)
            exact = sum(d <= GUESS_EXACT for d in miss) / len(miss)
            band = sum(GUESS_EXACT < d <= band_reach for d in miss) / len(miss)
            past = sum(d > band_reach for d in miss) / len(miss)
            print(f"| {budget_amount} | {pred} | {len(miss)} | {cells} | {exact:.3f} | {band:.3f} | {past:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
