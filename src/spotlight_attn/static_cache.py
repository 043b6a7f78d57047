"""SpotlightStaticCache: K/V and packed key codes preallocated once, for compiled, graph-captured generate().

Chosen the way transformers users choose a static cache: `generate(..., cache_implementation="static")`
or `model.generation_config.cache_implementation = "static"` (enable() sets the latter on CUDA). The
decoder's pre-hook (attention.py) puts this cache where generate() made transformers' own (empty,
lazily allocated) StaticCache, with the same capacity; the next generate() call of the same shape
reuses it, so compiled graphs keep their buffers.

Per layer:
- k_by_token, v_by_token [B, T_max, Hkv, D], token-major, so flash-attention's varlen kernel reads
  them as [B * T_max, Hkv, D]; `keys` / `values` are their [B, Hkv, T_max, D] views (no copy), the
  layout transformers' attention functions take.
- codes [B, Hkv, T_max, W] int32 on hash layers: each key is hashed once, as it enters: by update()
  in a prefill, by the attention step in a decode step (with the query, in one pass: defers_codes).
- select_guess [B, Hkv] float32 on hash layers ([0, Hkv] with SPOTLIGHT_SELECT_GUESS=0): score_select's
  prediction of each row's threshold, carried from step to step (kernels/score_select.py); a hint that
  saves work and never changes a pick, so beam reorders leave it and a rebatch starts it afresh.
- lengths [B] int64: keys held per row. Row b's tokens sit at [0, lengths[b]) whatever its padding:
  a prefill writes only real tokens, packed. generate() numbers positions by the padding mask's
  cumsum, so a token's RoPE position is its packed index.
- seen: 0-d int64, columns processed (padding included), what get_seq_length reports (transformers'
  StaticLayer does the same).
  Both are views of one buffer, counts [B + 1] (lengths then seen), so a decode step, which adds 1
  to each, updates them in one launch.
- bounds [B, 3] int32: the current decode step's selection bounds (kernels/score_select.py's plan:
  start 0, end lengths[b], keys to read). static_attention writes layer 0's once per step and every
  hash layer reads it: after their writes, all layers hold the same lengths. With a head budget
  profile (budgets.py) layer 0 holds per-head bounds for every layer instead, head_bounds
  [L, B, Hkv, 3], made from its head_fractions [L, Hkv] in the same one pass per step.
A decode step (one new token per row) writes at lengths[b] and adds 1: fixed shapes and no host
read, so the whole step compiles and is captured in a CUDA graph. The buffers are marked static
addresses, as transformers marks its own, so CUDA graphs read them in place.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from spotlight_attn.config import Budget
from spotlight_attn.errors import SpotlightError
from spotlight_attn.kernels.score_select import GUESS_IN_CACHE, new_guess

ALIGN = 64  # T_max is rounded up to this, so every head's rows of codes start 16-byte aligned


class StaticSequence:
    """What the layers of one forward share: which of the new tokens are real (None: all of them)."""

    def __init__(self):
        self.new_valid: torch.Tensor | None = None  # [B, S] bool


def _static(*tensors: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class SpotlightStaticLayer(CacheLayerMixin):
    """One layer's preallocated K/V (+ codes); transformers' CacheLayer contract."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, seq: StaticSequence, layer_idx: int, max_tokens: int, key_hasher=None, words: int = 0):
        super().__init__()
        self.seq = seq
        self.layer_idx = layer_idx
        self.max_tokens = -(-max_tokens // ALIGN) * ALIGN
        self.key_hasher = key_hasher  # keys [B, Hkv, n, D] -> codes [B, Hkv, n, W], or None (dense layer)
        self.words = words
        self.codes: torch.Tensor | None = None
        self.select_guess: torch.Tensor | None = None  # [B, Hkv] score_select's per-row threshold residuals
        self.plan_fractions: torch.Tensor | None = None  # layer 0 with head budgets: [L, Hkv] float64 (CPU)
        self.head_bounds: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self._allocate(b, hkv, d, value_states.shape[-1], key_states.dtype, key_states.device)

    def _allocate(self, b, hkv, d, dv, dtype, device) -> None:
        """Zeroed buffers: a masked dense kernel multiplies unheld positions by zero weights, so they
        must hold finite numbers."""
        t = self.max_tokens
        self.device, self.dtype = device, dtype
        self.k_by_token = torch.zeros(b, t, hkv, d, dtype=dtype, device=device)
        self.v_by_token = torch.zeros(b, t, hkv, dv, dtype=dtype, device=device)
        self.keys, self.values = self.k_by_token.transpose(1, 2), self.v_by_token.transpose(1, 2)  # [B, Hkv, T, D]
        if self.key_hasher is not None:
            self.codes = torch.zeros(b, hkv, t, self.words, dtype=torch.int32, device=device)
            self.select_guess = new_guess(b if GUESS_IN_CACHE else 0, hkv, device)  # empty: no prediction
        self.counts = torch.zeros(b + 1, dtype=torch.int64, device=device)  # lengths, then seen
        self.bounds = torch.zeros(b, 3, dtype=torch.int32, device=device)
        self.rows = torch.arange(b, device=device)
        self.cu_k = torch.arange(b + 1, dtype=torch.int32, device=device) * t  # row starts in [B * T, Hkv, D]
        extra = [self.codes, self.select_guess] if self.codes is not None else []
        if self.plan_fractions is not None:
            if self.plan_fractions.shape[1] != hkv:
                raise SpotlightError(f"the head budgets have {self.plan_fractions.shape[1]} KV heads, the cache {hkv}")
            self.head_fractions = self.plan_fractions.to(device)
            self.head_bounds = torch.zeros(self.plan_fractions.shape[0], b, hkv, 3, dtype=torch.int32, device=device)
            extra += [self.head_fractions, self.head_bounds]
        _static(self.k_by_token, self.v_by_token, self.counts, self.bounds, self.rows, self.cu_k, *extra)
        self.is_initialized = True

    # Views made at each use, not stored (see the end of update).
    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64: keys held per row."""
        return self.counts[:-1]

    @property
    def seen(self) -> torch.Tensor:
        """0-d int64: columns processed, padding included."""
        return self.counts[-1]

    @property
    def batch_size(self) -> int:
        return self.k_by_token.shape[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens [B, Hkv, S, D] after each row's held keys -> the full (keys, values) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = key_states.shape[-2]
        if s > 1 and not torch.compiler.is_compiling() and int(self.seen) + s > self.max_tokens:
            raise SpotlightError(
                f"the static cache holds {self.max_tokens} tokens and has seen {int(self.seen)}: {s} more do not fit; "
                "raise max_new_tokens or generation_config.max_cache_len"
            )
        k_new, v_new = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, S, Hkv, D]
        valid = self.seq.new_valid
        hashed_here = self.key_hasher is not None and not self.defers_codes(s)
        codes_new = self.key_hasher(key_states).transpose(1, 2) if hashed_here else None  # [B, S, Hkv, W]
        if valid is None:  # every new token is real: fixed shapes, the decode step's path
            slots = self.lengths[:, None] + torch.arange(s, device=self.device)  # [B, S]
            rows = self.rows[:, None].expand(-1, s)
            added = s
        else:  # a padded prefill: pack each row's real tokens (eager)
            slots = (self.lengths[:, None] + valid.long().cumsum(-1) - 1)[valid]  # [n_real]
            rows = self.rows[:, None].expand(-1, s)[valid]
            k_new, v_new = k_new[valid], v_new[valid]
            codes_new = None if codes_new is None else codes_new[valid]
            added = valid.sum(-1)
        self.k_by_token[rows, slots] = k_new
        self.v_by_token[rows, slots] = v_new
        if codes_new is not None:
            self.codes.permute(0, 2, 1, 3)[rows, slots] = codes_new  # codes [B, Hkv, T, W] seen as [B, T, Hkv, W]
        if valid is None:
            self.counts.add_(s)  # lengths and seen in one launch
        else:
            self.lengths.add_(added)
            self.seen.add_(s)
        # Views made here, not the stored ones: inside a compiled step a stored view would enter the graph
        # as an input aliasing a mutated buffer, which makes torch.compile skip CUDA graphs.
        return self.k_by_token.transpose(1, 2), self.v_by_token.transpose(1, 2)

    def defers_codes(self, s: int) -> bool:
        """Whether a write of `s` new tokens leaves their codes to the attention step: a decode step
        (one real token per row) on a hash layer, where static_attention hashes the key together with
        the query (hasher.step_codes) and writes the codes with write_newest_codes."""
        return self.key_hasher is not None and s == 1 and self.seq.new_valid is None

    def newest_keys(self) -> torch.Tensor:
        """The last key written in each row -> [B, Hkv, 1, D]."""
        return self.k_by_token[self.rows, self.lengths - 1][:, :, None]

    def write_newest_codes(self, codes: torch.Tensor) -> None:
        """codes [B, Hkv, 1, W] of newest_keys(), into their slots."""
        self.codes[self.rows, :, self.lengths - 1] = codes[:, :, 0]

    def get_seq_length(self):
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_tokens, 0  # the padding carrier spans the whole buffer, a fixed shape

    def get_max_length(self) -> int:
        return self.max_tokens

    def get_max_cache_shape(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        if self.is_initialized:
            self.counts.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens of every row (a negative count, as transformers' static layers take)."""
        if tokens_to_remove > 0:
            raise SpotlightError("the static cache crops by a negative count: the number of tokens to remove")
        if self.is_initialized and tokens_to_remove:  # crop(0), which the deferred stop check calls every step: no launch
            self.counts.sub_(-tokens_to_remove).clamp_(min=0)

    def _buffers(self) -> list[torch.Tensor]:
        # lengths, not seen: beams reorder rows, and every row has seen the same columns
        return [self.k_by_token, self.v_by_token, self.lengths] + ([self.codes] if self.codes is not None else [])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow beam_idx, in place (the buffers keep their addresses)."""
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            for buffer in self._buffers():
                buffer.copy_(buffer.index_select(0, beam_idx))

    def _rebatch(self, fn) -> None:
        if not self.is_initialized:
            return
        old = {name: getattr(self, name) for name in ("k_by_token", "v_by_token", "lengths", "codes")}
        b, _, hkv, d = fn(old["k_by_token"]).shape
        seen = self.seen.clone()
        self._allocate(b, hkv, d, old["v_by_token"].shape[-1], self.dtype, self.device)
        for name, tensor in old.items():
            if tensor is not None:
                getattr(self, name).copy_(fn(tensor))
        self.seen.copy_(seen)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebatch(lambda t: t[indices.to(t.device)])


class SpotlightStaticCache(Cache):
    """One SpotlightStaticLayer per model layer, sharing one StaticSequence.

    `read` / `cached` (0-d tensors, updated in place by the attention step): keys read and valid keys
    held, summed over decode steps and layers (attention.read_fraction). `k` is the fixed width of a
    hash layer's index buffer: the budget's token count at full capacity (rows that read fewer pad -1),
    the largest over layers and heads with head budgets.
    """

    def __init__(self, layer_specs: list[tuple], max_tokens: int, budget: Budget | list[Budget], owner=None):
        """layer_specs[i] = (key hasher or None, code words) of layer i; `budget`: one for every layer, or one per layer."""
        self.seq = StaticSequence()
        self.owner = owner
        layers = [SpotlightStaticLayer(self.seq, i, max_tokens, hasher, words) for i, (hasher, words) in enumerate(layer_specs)]
        super().__init__(layers=layers)
        budgets = budget if isinstance(budget, list) else [budget] * len(layers)
        hashed = [b for b, layer in zip(budgets, layers) if layer.key_hasher is not None] or budgets[:1]
        self.k = max(b.tokens_for(self.max_tokens) for b in hashed)
        self.hash_layer_indices = [i for i, layer in enumerate(layers) if layer.key_hasher is not None]
        self.hash_layers = len(self.hash_layer_indices)
        heads = {len(b.heads) for b in hashed if b.heads is not None}
        if heads:  # every layer's per-head fractions, for layer 0's plan (dense layers' rows unused)
            if len(heads) > 1:
                raise SpotlightError(f"head budgets with different KV head counts per layer: {sorted(heads)}")
            width = heads.pop()
            rows = [b.heads if b.heads is not None else (float(b.amount),) * width for b in budgets]
            layers[0].plan_fractions = torch.tensor(rows, dtype=torch.float64)
        self.read = torch.zeros((), dtype=torch.int64)
        self.cached = torch.zeros((), dtype=torch.int64)

    @property
    def max_tokens(self) -> int:
        return self.layers[0].max_tokens

    @property
    def defers_stop(self) -> bool:
        """Whether generate() may check its stop flag one step late over this cache (compat.defer_stop_checks)."""
        return self.owner is not None and self.owner.config.defer_stop

    def counters_to(self, device: torch.device) -> None:
        """Put the read counters on the cache's device, and make the kernels' completion counters there
        now: made inside a compiled step's first (warm-up) run they would land in its CUDA-graph pool."""
        from spotlight_attn.kernels import _triton

        if self.read.device != device:
            self.read, self.cached = self.read.to(device), self.cached.to(device)
            _static(self.read, self.cached)
        if device.type == "cuda":
            _triton.zeroed_counters(device, 1)

    def fits(self, batch: int, max_tokens: int, device, dtype) -> bool:
        """Whether this cache can serve a generate() call of this batch and capacity (it is then reset and reused)."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return False
        return layer.batch_size == batch and layer.max_tokens >= max_tokens and layer.device == device and layer.dtype == dtype

    def reset(self) -> None:
        super().reset()
        self.read.zero_()
        self.cached.zero_()
