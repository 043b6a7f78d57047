"""The selection rules every selector shares, as a pure-torch reference.

Given per-token scores for each (batch row, KV head), pick the positions a decode step reads:
- a row holding n valid tokens reads k_row = Budget.tokens_for(n) of them (config.py says how), per
  KV head where the budget has per-head fractions;
- the first `sink` and last `window` valid tokens are always picked (inside k_row);
- padding (key_valid == False) is never picked;
- the rest go by score, highest first; equal scores prefer the more recent token;
- every row of the output has the same k = max k_row; a row's unused slots hold -1;
- a row's picked positions come sorted ascending, -1 slots last.
"""

from __future__ import annotations

import torch

from spotlight_attn.config import Budget
from spotlight_attn.kernels.score_select import device_tokens_for


def rows_budget(key_valid: torch.Tensor, budget: Budget, num_heads: int = 1) -> torch.Tensor:
    """key_valid [B, T] bool -> tokens read per (row, KV head) [B, num_heads] int64 (Budget.tokens_for)."""
    return device_tokens_for(key_valid.sum(-1), budget, num_heads)


def forced_mask(key_valid: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """key_valid [B, T] bool -> [B, T] bool: the first `sink` and the last `window` valid tokens."""
    rank = key_valid.cumsum(-1) - 1  # [B, T] index among valid tokens
    n_valid = key_valid.sum(-1, keepdim=True)  # [B, 1]
    forced = (rank < sink) | (rank >= n_valid - window)
    return forced & key_valid


def select_mask(scores: torch.Tensor, key_valid: torch.Tensor, budget: Budget, k_rows: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, H, T] (int or float), key_valid [B, T] bool -> [B, H, T] bool: the positions the rules
    pick (k_rows [B, H] or [B]: rows_budget(key_valid, budget, H), when the caller has it).

    No sort: the k_row-th largest priority of each row is its threshold; every key above it is
    picked, and of the valid keys equal to it, the most recent ones until the row holds k_row."""
    b, h, t = scores.shape
    k_rows = rows_budget(key_valid, budget, h) if k_rows is None else k_rows
    k_rows = k_rows[:, None].expand(b, h) if k_rows.dim() == 1 else k_rows  # [B, H]
    k = int(k_rows.max()) if b * h else 0
    if k == 0:
        return torch.zeros(b, h, t, dtype=torch.bool, device=scores.device)

    priority = scores.to(torch.float64).nan_to_num(nan=float("-inf"))
    forced = forced_mask(key_valid, budget.sink, budget.window)[:, None, :]  # [B, 1, T]
    priority = priority.masked_fill(forced, float("inf"))
    priority = priority.masked_fill(~key_valid[:, None, :], float("-inf"))

    top = priority.topk(k, dim=-1).values  # [B, H, k], descending
    kth = top.gather(-1, (k_rows - 1).clamp(min=0)[:, :, None])  # [B, H, 1]
    above = priority > kth
    tie = (priority == kth) & key_valid[:, None, :]
    need = k_rows[:, :, None] - above.sum(-1, keepdim=True)  # ties still to take, >= 1
    ties_from_here = tie.flip(-1).cumsum(-1).flip(-1)  # ties at this position or later
    picked = above | (tie & (ties_from_here <= need))
    return picked & (k_rows > 0)[:, :, None]


def select_topk(scores: torch.Tensor, key_valid: torch.Tensor, budget: Budget) -> torch.Tensor:
    """scores [B, H, T] (int or float), key_valid [B, T] bool -> indices [B, H, k] int64 (-1 = unused)."""
    b, h, t = scores.shape
    k_rows = rows_budget(key_valid, budget, h)  # [B, H]
    k = int(k_rows.max()) if b * h else 0
    if k == 0:
        return torch.full((b, h, 0), -1, dtype=torch.int64, device=scores.device)
    picked = select_mask(scores, key_valid, budget, k_rows)
    position = torch.arange(t, device=scores.device).expand(b, h, t)
    indices = position.masked_fill(~picked, t).topk(k, dim=-1, largest=False).values  # ascending, unused last
    return indices.masked_fill(indices == t, -1)


def selected_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    """indices [B, H, k] int64 (-1 = unused) -> [B, H, length] bool: which positions are picked."""
    mask = torch.zeros(*indices.shape[:2], length + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.masked_fill(indices < 0, length), True)
    return mask[..., :length]
