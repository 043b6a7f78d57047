"""The shared selection rules (selection/topk.py) against a brute-force restatement of them."""

import math

import pytest
import torch

from spotlight_attn.config import Budget
from spotlight_attn.errors import SpotlightError
from spotlight_attn.selection.topk import select_mask, select_topk, selected_mask


def brute_force(scores, key_valid, budget):
    """Rules restated row by row: forced first, then (score, position) descending; sorted output."""
    b, h, t = scores.shape
    rows = []
    for bi in range(b):
        valid = [i for i in range(t) if key_valid[bi, i]]
        n = len(valid)
        forced = set(valid[: budget.sink]) | set(valid[max(n - budget.window, 0) :] if budget.window else [])
        k_row = budget.tokens_for(n)
        per_head = []
        for hi in range(h):
            order = sorted(valid, key=lambda i: (i in forced, float(scores[bi, hi, i]), i), reverse=True)
            per_head.append(sorted(order[:k_row]))
        rows.append(per_head)
    k = max((len(p) for r in rows for p in r), default=0)
    out = torch.full((b, h, k), -1, dtype=torch.int64)
    for bi, r in enumerate(rows):
        for hi, p in enumerate(r):
            out[bi, hi, : len(p)] = torch.tensor(p, dtype=torch.int64)
    return out


BUDGETS = [
    Budget(0.0, 0, 0, 0),  # nothing at all
    Budget(0.0, 0, 2, 3),  # nothing beyond sink + window
    Budget(0.1, 3, 1, 2),
    Budget(0.5, 0, 0, 0),
    Budget(7, 0, 2, 2),
    Budget(1.0, 0, 4, 16),  # everything
    Budget(10_000, 0, 0, 0),  # a count above the cache
]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("length", [1, 5, 97])
def test_matches_brute_force_with_ties_and_padding(budget, length):
    g = torch.Generator().manual_seed(length)
    b, h = 3, 2
    scores = torch.randint(0, 4, (b, h, length), generator=g)  # many ties
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[1, : length // 3] = False  # left padding
    key_valid[2, : length - 1] = False  # a single valid token
    assert torch.equal(select_topk(scores, key_valid, budget), brute_force(scores, key_valid, budget))


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_mask_matches_brute_force_on_float_ties_nan_and_infinities(budget):
    g = torch.Generator().manual_seed(7)
    b, h, t = 4, 3, 61
    scores = torch.randint(-2, 3, (b, h, t), generator=g).float() / 2  # float ties
    scores[0, 0, ::5] = float("nan")  # NaN ranks last among valid keys
    scores[1, :, 3:9] = float("-inf")
    scores[2, 1, :] = float("nan")  # a whole head of NaN: recency alone decides
    key_valid = torch.ones(b, t, dtype=torch.bool)
    key_valid[3, : t - 7] = False
    expected = brute_force(scores.nan_to_num(nan=float("-inf")), key_valid, budget)
    assert torch.equal(select_topk(scores, key_valid, budget), expected)
    assert torch.equal(select_mask(scores, key_valid, budget), selected_mask(expected, t))


def test_float_scores_and_budget_sizes():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, 50, generator=g)
    key_valid = torch.ones(2, 50, dtype=torch.bool)
    key_valid[0, :10] = False
    budget = Budget(0.2, 0, 0, 0)
    picked = select_topk(scores, key_valid, budget)
    assert picked.shape == (2, 3, 10)
    assert (picked[0] >= 0).sum(-1).tolist() == [math.ceil(0.2 * 40)] * 3  # row 0 holds 40 valid tokens
    assert (picked[1] >= 0).sum(-1).tolist() == [10] * 3
    assert not torch.isin(picked[0], torch.arange(10)).any()  # padding never picked
    assert torch.equal(picked, brute_force(scores, key_valid, budget))


def test_full_budget_reads_every_valid_token():
    key_valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    picked = select_topk(torch.zeros(2, 1, 5), key_valid, Budget(1.0, 0, 0, 0))
    assert picked.tolist() == [[[2, 3, 4, -1, -1]], [[0, 1, 2, 3, 4]]]


def test_ties_prefer_recent_tokens():
    picked = select_topk(torch.zeros(1, 1, 10), torch.ones(1, 10, dtype=torch.bool), Budget(3, 0, 0, 0))
    assert picked.tolist() == [[[7, 8, 9]]]


@pytest.mark.parametrize("amount", [-0.1, 1.5, float("nan"), -3, "0.1", True])
def test_budget_out_of_range_is_refused(amount):
    with pytest.raises(SpotlightError, match="budget"):
        Budget(amount)


@pytest.mark.parametrize(
    "budget,n_valid,expected",
    [
        (Budget(0.02, 20, 4, 16), 10_000, 200),  # 2% of the cache
        (Budget(0.02, 20, 4, 16), 100, 20),  # raised to min_tokens
        (Budget(0.02, 20, 4, 16), 10, 10),  # capped at the valid tokens
        (Budget(0.0, 0, 2, 3), 100, 5),  # only the forced sink + window
        (Budget(1, 0, 2, 3), 100, 5),  # forced tokens exceed a count budget: read anyway
        (Budget(0.0, 0, 0, 0), 100, 0),
        (Budget(0.1, 0, 0, 0), 101, 11),  # fractions round up
        (Budget(1.0, 0, 0, 0), 37, 37),
    ],
)
def test_tokens_for(budget, n_valid, expected):
    assert budget.tokens_for(n_valid) == expected
