"""Bradley-Terry ranking loss for one layer's hash, on one recorded chunk.

For a sampled query position s (a decode step whose cache holds keys 0..s):
- truth: p[h, t] = sum over the G query heads g of KV head h of softmax_t(q_g . k_t * scaling), t <= s
  (what OracleSelector scores). The true set at the training budget is what select_topk keeps on
  p: the forced sink/window keys plus the top (k_row - forced) of the rest. Forced keys are read
  whatever the hash says, so they are left out of the pairs by default.
- draft: d[h, t] = sum over g of soft(q_g) . soft(k_t), the training twin of the summed-Hamming
  score that inference ranks by (hard codes give d = G*bits - 2*hamming).
- pairs (i in top, j in others): loss = BCE-with-logits(logit_scale * (d_i - d_j), target 1),
  i.e. -log P(i ranks above j) under Bradley-Terry.
Bounded by sampling: `num_queries` positions, `num_top` top keys and `num_other` other keys per
(query, KV head), of which `num_hard` come from just below the boundary (ranks k..2k of the
non-top keys), and `num_hard_top` of the top keys from just above it (the lower half of the true set).
The pair tensor is Hkv x num_queries x num_top x num_other.
Optional attention-mass weighting (`mass_weight` = lambda in [0, 1]): pair weight
(1 - lambda) + lambda * (p_i - p_j) / mean(p_i - p_j): swapping i and j loses p_i - p_j of mass,
so heavy keys (attention sinks) count for what they carry.
Optional listwise term (`listwise` = w in [0, 1]; loss = (1 - w) * pairs + w * list): per (KV head,
query), KL(p' || softmax(list_scale * z)), where p' is the group-summed attention over the
candidate keys renormalised to 1 and z the draft standardised over the same keys (so the term does
not depend on the draft's scale, which inference ignores). It scores every past key, not samples,
and weighs each by the attention it carries: the objective of DeepSeek-V3.2's top-k indexer.
`list_power` = a tempers that target: p' is p^a renormalised over the candidates (a < 1 moves weight
from the few heaviest keys to those near the budget's boundary; 1 is the attention itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spotlight_attn.config import Budget, PairSampling  # PairSampling re-exported here
from spotlight_attn.selection.topk import forced_mask


def group_probs(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """queries [Hq, Nq, D], keys [Hkv, L, D], positions [Nq] -> p [Hkv, Nq, L] float32 (0 past each position)."""
    hq, nq, d = queries.shape
    hkv, length, _ = keys.shape
    q = queries.float().reshape(hkv, hq // hkv * nq, d)  # [Hkv, G*Nq, D]
    logits = (q @ keys.float().transpose(1, 2) * scaling).view(hkv, hq // hkv, nq, length)  # [Hkv, G, Nq, L]
    past = torch.arange(length, device=keys.device)[None, :] <= positions[:, None]  # [Nq, L]
    logits = logits.masked_fill(~past, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(1)  # [Hkv, Nq, L]


def _sample(member: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """member [..., L] bool -> (indices [..., n] int64, ok [..., n] bool): up to n members, uniformly without replacement."""
    # Drawn on the generator's device: a CPU generator gives the same pairs on any device; a generator
    # on the tensors' GPU avoids drawing [Hkv, Nq, L] numbers on the host every step (the trainer's choice).
    u = torch.rand(member.shape, generator=generator, device=generator.device).to(member.device).masked_fill(~member, -1.0)
    picked = u.topk(min(n, u.shape[-1]), dim=-1)
    return picked.indices, picked.values >= 0


def budget_tokens(budget: Budget, n_valid: torch.Tensor) -> torch.Tensor:
    """Budget.tokens_for on a tensor: n_valid [...] int64 -> tokens read [...] int64, on n_valid's device
    (no host round trip per training step). The same float64 arithmetic as tokens_for."""
    if budget.is_fraction:
        wanted = torch.ceil(n_valid.to(torch.float64) * budget.amount - 1e-9).to(torch.int64)
    else:
        wanted = torch.full_like(n_valid, int(budget.amount))
    wanted = torch.maximum(wanted, n_valid.clamp(max=budget.sink + budget.window)).clamp(min=budget.min_tokens)
    return torch.minimum(wanted, n_valid)


@dataclass
class PairBatch:
    top: torch.Tensor  # [Hkv, Nq, num_top] int64 key positions
    top_ok: torch.Tensor  # [Hkv, Nq, num_top] bool
    other: torch.Tensor  # [Hkv, Nq, num_other] int64
    other_ok: torch.Tensor  # [Hkv, Nq, num_other] bool
    probs: torch.Tensor  # [Hkv, Nq, L] group-summed attention probability
    positions: torch.Tensor  # [Nq] int64 sampled query positions
    candidate: torch.Tensor  # [Nq, L] bool: the keys the pairs draw from (the past, less forced keys unless include_forced)


def sample_pairs(
    queries: torch.Tensor, keys: torch.Tensor, budget: Budget, sampling: PairSampling, scaling: float, generator: torch.Generator,
    positions: torch.Tensor | None = None,
) -> PairBatch:
    """queries [Hq, L, D], keys [Hkv, L, D] of one chunk -> sampled top / other keys per (KV head, query).

    positions [Nq] int64, optional: the query positions to use instead of a uniform draw from
    [min_position, L) (e.g. when queries were kept only at some positions).
    """
    length = keys.shape[1]
    if positions is None:
        low = min(sampling.min_position, length - 1)
        count = min(sampling.num_queries, length - low)
        positions = low + torch.randperm(length - low, generator=generator, device=generator.device)[:count].sort().values  # [Nq]
    positions = positions.to(keys.device)
    p = group_probs(queries[:, positions], keys, positions, scaling)  # [Hkv, Nq, L]

    valid = torch.arange(length, device=keys.device)[None, :] <= positions[:, None]  # [Nq, L]
    forced = forced_mask(valid, budget.sink, budget.window)  # [Nq, L]
    k_rows = budget_tokens(budget, positions + 1)  # [Nq]
    candidate = valid if sampling.include_forced else valid & ~forced
    n_top = k_rows if sampling.include_forced else k_rows - forced.sum(-1)  # [Nq]
    n_top = n_top.clamp(min=0)[None, :, None]  # [1, Nq, 1]

    ranked = p.masked_fill(~candidate, -1.0)  # [Hkv, Nq, L]
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(length, device=keys.device).expand_as(order))
    is_top = candidate & (rank < n_top)
    is_other = candidate & (rank >= n_top)
    is_hard = is_other & (rank < 2 * n_top.clamp(min=1))

    if sampling.num_hard_top:
        is_hard_top = is_top & (2 * rank >= n_top)
        hard_top, hard_top_ok = _sample(is_hard_top, sampling.num_hard_top, generator)
        rest_top = is_top.clone()
        rest_top.scatter_(-1, hard_top, rest_top.gather(-1, hard_top) & ~hard_top_ok)
        top, top_ok = _sample(rest_top, sampling.num_top - sampling.num_hard_top, generator)
        top, top_ok = torch.cat([hard_top, top], -1), torch.cat([hard_top_ok, top_ok], -1)
    else:
        top, top_ok = _sample(is_top, sampling.num_top, generator)
    hard, hard_ok = _sample(is_hard, sampling.num_hard, generator)
    # The uniform draw excludes the hard keys already drawn, so no pair appears twice.
    rest = is_other.clone()
    rest.scatter_(-1, hard, rest.gather(-1, hard) & ~hard_ok)
    uniform, uniform_ok = _sample(rest, sampling.num_other - sampling.num_hard, generator)
    return PairBatch(top, top_ok, torch.cat([hard, uniform], -1), torch.cat([hard_ok, uniform_ok], -1), p, positions, candidate)


def soft_codes(hasher, layer: int, queries: torch.Tensor, keys: torch.Tensor, sampling: PairSampling):
    """Training codes: (queries [Hq, Nq, D] -> [Hq, Nq, bits], keys [Hkv, L, D] -> [Hkv, L, bits])."""
    hq_ = hasher.hash_queries(layer, queries[None])[0]
    hk_ = hasher.hash_keys(layer, keys[None])[0]
    out = []
    for h in (hq_, hk_):
        s = h * sampling.gain
        s = s / (1 + s.abs())
        if sampling.straight_through:
            s = s + (torch.sign(h) - s).detach()
        out.append(s)
    return out


def ranking_loss(
    hasher, layer: int, queries: torch.Tensor, keys: torch.Tensor, pairs: PairBatch, sampling: PairSampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mis-order rate) of the hash of `layer` on sampled pairs; queries [Hq, L, D], keys [Hkv, L, D].

    Mis-order rate: fraction of valid pairs whose draft does not rank the top key above the other
    (ties count one half, as a coin flip).
    """
    hkv = keys.shape[0]
    sq, sk = soft_codes(hasher, layer, queries[:, pairs.positions].float(), keys.float(), sampling)  # [Hq, Nq, b], [Hkv, L, b]
    sq = sq.reshape(hkv, -1, *sq.shape[1:]).sum(1)  # [Hkv, Nq, b]: summed over the GQA group
    draft = sq @ sk.transpose(1, 2)  # [Hkv, Nq, L]
    loss, misorder = pair_loss(draft, pairs, sampling)
    if sampling.listwise > 0:
        loss = (1 - sampling.listwise) * loss + sampling.listwise * list_loss(draft, pairs, sampling)
    return loss, misorder


def list_loss(draft: torch.Tensor, pairs: PairBatch, sampling: PairSampling) -> torch.Tensor:
    """Mean over (KV head, query) of KL(p' || softmax(list_scale * z)) on the candidate keys (see the module doc)."""
    candidate = pairs.candidate  # [Nq, L] bool
    count = candidate.sum(-1).clamp(min=1)  # [Nq]
    mean = (draft * candidate).sum(-1, keepdim=True) / count[:, None]
    var = (((draft - mean) * candidate) ** 2).sum(-1, keepdim=True) / count[:, None]
    z = (draft - mean) / (var + 1e-6).sqrt()
    log_q = torch.log_softmax((sampling.list_scale * z).masked_fill(~candidate, -1e9), dim=-1)  # finite: no NaN in empty rows
    p = pairs.probs * candidate
    if sampling.list_power != 1.0:
        p = p.pow(sampling.list_power)  # 0 stays 0: keys outside the candidates keep no weight
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)  # [Hkv, Nq]
    rows = candidate.any(-1).float()  # queries with at least one candidate key (no host sync)
    return (kl * rows).sum() / (rows.sum() * kl.shape[0]).clamp(min=1)


def pair_loss(draft: torch.Tensor, pairs: PairBatch, sampling: PairSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """draft [Hkv, Nq, L] scores -> (weighted mean BCE over valid pairs, mis-order rate)."""
    diff = draft.gather(-1, pairs.top)[..., :, None] - draft.gather(-1, pairs.other)[..., None, :]  # [Hkv, Nq, nt, no]
    mask = (pairs.top_ok[..., :, None] & pairs.other_ok[..., None, :]).float()
    weight = mask
    if sampling.mass_weight > 0:
        gap = pairs.probs.gather(-1, pairs.top)[..., :, None] - pairs.probs.gather(-1, pairs.other)[..., None, :]
        gap = gap.clamp(min=0) * mask
        gap = gap / gap.sum().clamp(min=1e-12) * mask.sum()  # mean 1 over valid pairs
        weight = mask * ((1 - sampling.mass_weight) + sampling.mass_weight * gap)
    total = weight.sum().clamp(min=1e-12)
    loss = (F.softplus(-sampling.logit_scale * diff) * weight).sum() / total
    with torch.no_grad():
        wrong = (diff < 0).float() + 0.5 * (diff == 0).float()
        misorder = (wrong * mask).sum() / mask.sum().clamp(min=1)
    return loss, misorder
