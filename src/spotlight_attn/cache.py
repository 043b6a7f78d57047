"""A transformers `Cache` that keeps, beside each layer's K/V, what its selector needs.

- Hash selectors: packed key codes [B, Hkv, T, W] int32; each key is hashed once, when it enters.
- Quest: per-page min and max of the keys [B, Hkv, pages, D]; a page is `page_size` consecutive
  valid tokens of a row (empty pages hold +inf / -inf).
- All layers share one `SequenceState`: which cached positions are real tokens (key_valid [B, T]),
  set from the 2-D attention mask before each forward (left padding is never selected).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

KeyHasher = Callable[[torch.Tensor], torch.Tensor]  # keys [B, Hkv, n, D] -> codes [B, Hkv, n, W]


class SequenceState:
    """Per-sequence facts every layer shares: which positions hold real tokens."""

    def __init__(self):
        self.key_valid: torch.Tensor | None = None  # [B, T_total] bool, None = all valid

    def valid(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """[B, length] bool for the first `length` cached positions."""
        if self.key_valid is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        return self.key_valid[:, :length].to(device)


class SpotlightLayer(DynamicLayer):
    """DynamicLayer + key codes and/or Quest page bounds, kept in step with K/V."""

    def __init__(self, seq: SequenceState, layer_idx: int, key_hasher: KeyHasher | None = None, page_size: int | None = None):
        super().__init__()
        self.seq = seq
        self.layer_idx = layer_idx
        self.key_hasher = key_hasher
        self.page_size = page_size
        self.codes: torch.Tensor | None = None  # [B, Hkv, T, W] int32
        self.page_min: torch.Tensor | None = None  # [B, Hkv, pages, D]
        self.page_max: torch.Tensor | None = None

    @property
    def key_valid(self) -> torch.Tensor:
        """[B, T] bool over this layer's cached positions."""
        return self.seq.valid(self.keys.shape[0], self.keys.shape[-2], self.keys.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.get_seq_length()
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.key_hasher is not None:
            new_codes = self.key_hasher(key_states)  # [B, Hkv, n, W]
            self.codes = new_codes if self.codes is None or start == 0 else torch.cat([self.codes, new_codes], dim=-2)
        if self.page_size is not None:
            self._update_pages(start)
        return keys, values

    def page_of_token(self) -> torch.Tensor:
        """[B, T] int64: the Quest page of each cached position. Pages hold `page_size` consecutive VALID
        tokens of a row, so a left-padded row is paged exactly as it would be alone. Padding maps to page 0."""
        valid = self.key_valid
        rank = valid.cumsum(-1) - 1  # [B, T] index among valid tokens
        return torch.where(valid, rank // self.page_size, 0)

    def _update_pages(self, start: int) -> None:
        """Fold the keys at positions >= start into their pages' running min / max (an append-only update)."""
        b, h, t, d = self.keys.shape
        valid = self.key_valid  # [B, T]
        pages = -(-int(valid.sum(-1).max()) // self.page_size)
        held = 0 if self.page_min is None else self.page_min.shape[2]
        grow = max(pages - held, 0) + 1  # +1: a spare last page collects the padding, then is sliced off
        lo = self.keys.new_full((b, h, grow, d), float("inf"))
        hi = self.keys.new_full((b, h, grow, d), float("-inf"))
        self.page_min = lo if self.page_min is None else torch.cat([self.page_min, lo], dim=2)
        self.page_max = hi if self.page_max is None else torch.cat([self.page_max, hi], dim=2)
        spare = self.page_min.shape[2] - 1
        page = torch.where(valid[:, start:], self.page_of_token()[:, start:], spare)  # [B, n]
        index = page[:, None, :, None].expand(b, h, t - start, d)
        new_keys = self.keys[:, :, start:]
        self.page_min = self.page_min.scatter_reduce(2, index, new_keys, "amin")[:, :, :spare]  # [B, Hkv, pages, D]
        self.page_max = self.page_max.scatter_reduce(2, index, new_keys, "amax")[:, :, :spare]

    # The rest keeps codes and pages in step with transformers' own cache edits.
    def _rebuild_pages(self) -> None:
        if self.page_size is not None and self.get_seq_length() > 0:
            self.page_min = self.page_max = None
            self._update_pages(0)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.codes is not None:
            self.codes = self.codes[..., : self.get_seq_length(), :]
        self._rebuild_pages()

    def _map_batch(self, fn) -> None:
        if self.codes is not None:
            self.codes = fn(self.codes)
        if self.page_min is not None:
            self.page_min, self.page_max = fn(self.page_min), fn(self.page_max)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.codes = self.page_min = self.page_max = None


class SpotlightCache(Cache):
    """One SpotlightLayer per model layer, all sharing one SequenceState."""

    def __init__(self, layer_specs: list[tuple[KeyHasher | None, int | None]], owner=None):
        """layer_specs[i] = (key hasher or None, Quest page size or None) for layer i.
        `owner` is the enable() setting that made this cache; a cache only serves its owner."""
        self.seq = SequenceState()
        self.owner = owner
        # Keys read and valid keys held, summed over decode steps and layers (see attention.read_fraction).
        self.read: torch.Tensor | int = 0
        self.cached: torch.Tensor | int = 0
        layers = [SpotlightLayer(self.seq, i, hasher, page) for i, (hasher, page) in enumerate(layer_specs)]
        super().__init__(layers=layers)

    def set_attention_mask(self, attention_mask: torch.Tensor | None, total_length: int, batch: int) -> None:
        """Record which of the `total_length` positions (past + new) are real tokens, from a [B, T] 0/1 mask."""
        if attention_mask is None:
            self.seq.key_valid = None
            return
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, total_length):
            raise ValueError(
                f"spotlight expects a 2-D attention_mask of shape (batch, past + new tokens) = "
                f"({batch}, {total_length}), got {tuple(attention_mask.shape)}"
            )
        self.seq.key_valid = attention_mask.bool()
