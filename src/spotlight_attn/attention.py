"""enable() / disable(): sparse decoding inside an unmodified transformers model.

How it hooks in, without replacing any forward method:
- an attention function registered with transformers' `AttentionInterface`, selected by
  `model.set_attn_implementation`, and under the same name with `AttentionMaskInterface` a mask
  function that only hands the 2-D padding mask on (as [B, 1, 1, T]): the attention function applies
  causality itself, so no [B, 1, S, T] mask is ever built, however long the prompt;
- a forward pre-hook on the decoder that puts our cache where the model expects its cache (the
  forward's documented cache argument, compat.cache_argument): a `SpotlightCache` (dynamic, grows
  by concatenation) in place of a DynamicCache or none, a `SpotlightStaticCache` (preallocated,
  compiled and graph-captured by generate()) in place of transformers' StaticCache; it records the
  padding of the new tokens and passes the setting and the cache to the attention function as the
  `spotlight` and `spotlight_cache` kwargs, which transformers forwards to it.
Prefill (query length > 1) runs dense attention; keys are hashed as they enter the cache. Decode
(query length 1) selects per KV head, then attends over only the selected rows. On CUDA enable()
makes the static cache generate()'s default (SpotlightConfig.cache), so `model.generate()` runs the
compiled fast path (static_attention.py).

For evaluation, `teacher_forcing(model, start)` makes one forward pass over a whole text behave as
if every position from `start` on had been decoded one token at a time (each position attends to
what its decode step would select over its causal past), and `index_cache` turns one dense
prefill into the cache of any method, so several methods can share it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from spotlight_attn import compat, fused_projections
from spotlight_attn.budgets import load_profile
from spotlight_attn.cache import SpotlightCache
from spotlight_attn.config import Budget, Method, SpotlightConfig
from spotlight_attn.errors import HasherMismatchError, SpotlightError
from spotlight_attn.hashing.checkpoint import check_geometry
from spotlight_attn.hashing.hasher import LinearHasher, MLPHasher
from spotlight_attn.kernels.dense import causal_mask
from spotlight_attn.kernels.sparse_decode import sparse_decode
from spotlight_attn.models import ModelGeometry, tensor_parallel
from spotlight_attn.selection.topk import select_mask
from spotlight_attn.selection.selectors import (
    DenseSelector,
    HashSelector,
    OracleSelector,
    QuestSelector,
    Selector,
    StreamingSelector,
)
from spotlight_attn.static_attention import STATIC_METHODS, static_attention
from spotlight_attn.static_cache import SpotlightStaticCache

logger = logging.getLogger(__name__)
ATTENTION_NAME = "spotlight"


@dataclass
class Installed:
    """What enable() put on a model; lives at `model.spotlight` until disable()."""

    config: SpotlightConfig
    selector: Selector
    geometry: ModelGeometry
    previous_attention: str
    hook: torch.utils.hooks.RemovableHandle
    cache_argument: str  # the decoder forward's name for its cache (compat.cache_argument)
    recorder: Callable | None = None  # recorder(layer_idx, query, key, attention_mask), called on every attention call
    teacher_forced_from: int | None = None  # set by teacher_forcing(): positions >= this select in multi-token calls
    dtype: torch.dtype = torch.float32  # the model's, which the static cache's K/V take
    static_cache: SpotlightStaticCache | None = None  # the last one made, reused by the next generate() that fits
    previous_cache_implementation: str | None = None  # generation_config's before enable() set "static"
    set_static: bool = False  # enable() set generation_config.cache_implementation; disable() restores it
    fused: list | None = None  # the groups fused_projections.install fused (SpotlightConfig.fuse_projections)
    budgets: dict | None = None  # {layer: Budget with per-KV-head fractions}, from config.head_budgets (budgets.py)

    def budget_for(self, layer_idx: int) -> Budget:
        """The budget of layer `layer_idx`: its share of a head budget profile, else the config's."""
        if self.budgets is not None and layer_idx in self.budgets:
            return self.budgets[layer_idx]
        return self.config.budget_spec

    def new_cache(self) -> SpotlightCache:
        specs = [
            (None, None) if i in self.config.dense_layers else self.selector.key_index(i)
            for i in range(self.geometry.num_layers)
        ]
        return SpotlightCache(specs, owner=self)

    def new_static_cache(self, batch: int, max_tokens: int, device, dtype) -> SpotlightStaticCache:
        """A static cache for `batch` rows of `max_tokens`, or the last one, reset, when it fits."""
        held = self.static_cache
        if held is not None and held.fits(batch, max_tokens, device, dtype):
            held.reset()
            return held
        self.static_cache = None  # let the old buffers go before the new ones are allocated
        hasher = getattr(self.selector, "hasher", None)
        specs = [
            (None, 0) if i in self.config.dense_layers or hasher is None else (self.selector.key_index(i)[0], hasher.words)
            for i in range(self.geometry.num_layers)
        ]
        budgets = [self.budget_for(i) for i in range(self.geometry.num_layers)]
        self.static_cache = SpotlightStaticCache(specs, max_tokens, budgets, owner=self)
        self.static_cache.counters_to(device)
        return self.static_cache


def read_fraction(cache) -> float:
    """Mean fraction of the valid cached keys that sparse decode steps read (dense layers count as 1)."""
    if not isinstance(cache, (SpotlightCache, SpotlightStaticCache)) or not float(cache.cached):
        return 1.0  # the model's own cache (spotlight disabled), or no decode step yet: everything read
    return float(cache.read) / float(cache.cached)


def spotlight_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, spotlight=None, spotlight_cache=None, **kwargs
):
    """transformers attention interface: query [B, Hq, S, D], key/value [B, Hkv, T, D] -> ([B, S, Hq, D], None).

    `attention_mask` is our mask function's padding carrier ([B, 1, 1, T] bool, or None); causality is
    applied here, from the query positions (the last S of T)."""
    layer_idx = module.layer_idx
    installed, cache = spotlight, spotlight_cache
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(cache, SpotlightStaticCache):
        return static_attention(installed, cache, cache.layers[layer_idx], query, scaling), None
    if installed is not None and installed.recorder is not None:
        installed.recorder(layer_idx, query, key, attention_mask)
    dense = (
        cache is None
        or installed.config.method is Method.DENSE
        or layer_idx in installed.config.dense_layers
        or (query.shape[2] != 1 and installed.teacher_forced_from is None)
    )
    if not dense and query.shape[2] != 1:
        return _teacher_forced_attention(installed, cache, cache.layers[layer_idx], query, key, value, scaling), None
    if dense:
        if cache is not None:
            valid = cache.layers[layer_idx].key_valid
            if query.shape[2] == 1 or installed.teacher_forced_from is not None:
                held = _steps_valid(valid, query.shape[2], installed.teacher_forced_from) * key.shape[1]
                cache.read, cache.cached = cache.read + held, cache.cached + held
        else:
            valid = None if attention_mask is None else attention_mask[:, 0, 0, : key.shape[2]]
        return _dense_attention(query, key, value, valid, scaling), None

    layer = cache.layers[layer_idx]
    indices = installed.selector.select(query, layer, installed.budget_for(layer_idx), scaling)  # [B, Hkv, k]
    out = sparse_decode(query, key, value, indices, scaling, force_reference=installed.config.force_reference)  # [B, Hq, 1, D]
    cache.read = cache.read + (indices >= 0).sum()
    cache.cached = cache.cached + layer.key_valid.sum() * key.shape[1]
    return out.transpose(1, 2), None


def _dense_attention(query, key, value, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Causal attention of the last S of T positions: query [B, Hq, S, D], key/value [B, Hkv, T, D],
    valid [B, T] bool (None: every key is a token) -> [B, S, Hq, D]."""
    s, t = query.shape[2], key.shape[2]
    mask = None
    if s > 1:
        mask = causal_mask(s, t, query.device)[None, None]  # [1, 1, S, T]
    if valid is not None:
        padding = valid[:, None, None, :]  # [B, 1, 1, T]
        mask = padding if mask is None else mask & padding
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query sees nothing; let it see all (its output is unused)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None and s > 1,
                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def padding_carrier(batch_size: int, q_length: int = 1, kv_length: int = 1, *args, attention_mask=None, **kwargs):
    """The mask function registered beside the attention function: the 2-D padding mask [B, L] as
    [B, 1, 1, kv_length] bool (padded with False past L), or None when every position is a token.
    transformers passes a 4-D mask through untouched, so the attention function receives it and no
    [B, 1, S, T] mask is built for a long prompt."""
    if attention_mask is None:
        return None
    valid = attention_mask.bool()[:, :kv_length]
    if valid.shape[-1] < kv_length:
        valid = F.pad(valid, (0, kv_length - valid.shape[-1]))
    return valid[:, None, None, :]


def _steps_valid(key_valid: torch.Tensor, new: int, start: int | None) -> torch.Tensor:
    """Valid keys summed over the decode steps a call stands for: the last of `new` positions for a
    decode step, every position >= start under teacher forcing (each sees its causal past)."""
    t = key_valid.shape[1]
    if new == 1:
        return key_valid.sum()
    seen = key_valid.cumsum(-1)[:, max(t - new, start) :]  # [B, steps]: valid keys up to each position
    return seen.sum()


# A block of rows holds at most this many [B, Hq, rows, T] mask entries: on a GPU large blocks mean few
# launches; on a CPU, blocks past a few MB run slower (allocation and cache misses outweigh the loop).
TEACHER_FORCED_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}


def _teacher_forced_attention(installed, cache, layer, query, key, value, scaling: float) -> torch.Tensor:
    """Multi-token call under teacher_forcing(): query [B, Hq, S, D] at cache positions T-S .. T-1 -> [B, S, Hq, D].

    A row at a position >= installed.teacher_forced_from reads what the selector picks over its
    causal past (the same scores and top-k rules as a decode step there); earlier rows read their
    whole causal past, as a prefill does. Rows go in blocks of TEACHER_FORCED_ELEMENTS / (B Hq T).
    """
    b, hq, s, d = query.shape
    t = key.shape[2]
    limit = TEACHER_FORCED_ELEMENTS.get(query.device.type, TEACHER_FORCED_ELEMENTS["cuda"])
    block = max(1, limit // (b * hq * t))
    group = hq // key.shape[1]
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)  # [B, Hq, T, D]
    positions = torch.arange(t - s, t, device=query.device)
    key_pos = torch.arange(t, device=query.device)
    valid = layer.key_valid  # [B, T]
    budget = installed.budget_for(layer.layer_idx)
    out = torch.empty_like(query)
    for lo in range(0, s, block):
        pos = positions[lo : lo + block]  # [s']
        q = query[:, :, lo : lo + block]
        row_valid = valid[:, None, :] & (key_pos[None, None, :] <= pos[None, :, None])  # [B, s', T]
        allowed = row_valid[:, None].expand(-1, key.shape[1], -1, -1)  # [B, Hkv, s', T]
        if t - s + lo + pos.numel() - 1 >= installed.teacher_forced_from:  # some row of the block selects
            sparse = pos >= installed.teacher_forced_from  # [s']
            scores = installed.selector.scores_rows(q, layer, scaling, row_valid)  # [B, Hkv, s', T]
            flat = scores.transpose(1, 2).flatten(0, 1)  # [B*s', Hkv, T]
            chosen = select_mask(flat, row_valid.flatten(0, 1), budget).unflatten(0, (b, pos.numel())).transpose(1, 2)
            allowed = torch.where(sparse[None, None, :, None], chosen, allowed)  # [B, Hkv, s', T]
            cache.read = cache.read + chosen[:, :, sparse].sum()
            cache.cached = cache.cached + row_valid[:, sparse].sum() * key.shape[1]
        # A row that reads nothing (padding; a budget of 0) gives 0, as sparse_decode does; SDPA would give NaN.
        empty = (~allowed.any(-1, keepdim=True)).repeat_interleave(group, 1)  # [B, Hq, s', 1]
        mask = allowed.repeat_interleave(group, 1) | empty  # [B, Hq, s', T]
        attended = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        out[:, :, lo : lo + block] = attended.masked_fill(empty, 0.0)
    return out.transpose(1, 2)


def _register() -> None:
    """Register the attention function and its mask function under ATTENTION_NAME (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, spotlight_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_carrier)


def make_selector(config: SpotlightConfig, hasher, geometry: ModelGeometry, device, rank: int = 0, world: int = 1) -> Selector:
    """The selector for config.method, checking that `hasher` fits it and the model (`geometry`: the
    whole model's). Under tensor parallelism (`world` > 1) the hasher, given or built here, is checked
    whole and then cut to rank `rank`'s share of the heads (hasher.shard)."""
    method = config.method
    needs = {Method.SPOTLIGHT: MLPHasher, Method.LINEAR: LinearHasher}
    if hasher is not None:
        if method not in needs:
            raise HasherMismatchError(f"method '{method.value}' takes no hasher; pass None")
        if not isinstance(hasher, needs[method]):
            raise HasherMismatchError(f"method '{method.value}' needs a {needs[method].__name__}, got {type(hasher).__name__}")
        check_geometry(hasher.geometry.to_dict(), geometry, "the hasher")
    sparse_layers = [i for i in range(geometry.num_layers) if i not in config.dense_layers]
    if method is Method.SPOTLIGHT:
        if hasher is None:
            raise HasherMismatchError(
                "method 'spotlight' needs a learned hasher: load one with load_hasher(), "
                "train one with `spotlight train`, or pick a method that needs none (oracle, linear, quest, streaming)"
            )
        missing = [i for i in sparse_layers if i not in hasher.layers]
        if missing:
            raise HasherMismatchError(f"the hasher has no hash for layers {missing}; add them to dense_layers or retrain")
    if method is Method.LINEAR and hasher is None:  # under TP: the one-process projections, then this rank's share
        hasher = LinearHasher(geometry, bits=config.bits, seed=config.seed, layers=sparse_layers)
    if hasher is not None and world > 1:
        hasher = hasher.shard(rank, world)
    if hasher is not None:
        hasher = hasher.to(device).eval().requires_grad_(False)
        return HashSelector(hasher, method, force_reference=config.force_reference)
    if method is Method.QUEST:
        return QuestSelector(config.page_size)
    return {Method.DENSE: DenseSelector, Method.ORACLE: OracleSelector, Method.STREAMING: StreamingSelector}[method]()


def _decoder(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder if decoder is not None else model


def _padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [B, L] padding mask from a forward's attention_mask: 2-D as given, or our carrier [B, 1, 1, L]
    (alone, or per layer type in the dict some models' generate() builds: every type carries the same)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1:
        return mask[:, 0, 0, :]
    raise SpotlightError(
        f"spotlight takes a 2-D attention_mask (batch, past + new tokens), got shape {tuple(mask.shape)}"
    )


def _before_decoder_forward(installed: Installed, signature: inspect.Signature, module, args, kwargs):
    if args:  # called positionally: name everything, so the cache and mask can be found and replaced
        kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
    use_cache = kwargs.get("use_cache")
    use_cache = module.config.use_cache if use_cache is None else use_cache
    cache = compat.pop_cache(kwargs)
    kwargs["spotlight"] = installed
    if cache is None and not use_cache:
        return (), kwargs  # no cache: every call is a full dense forward (the cache argument stays unset)
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    batch, new = inputs.shape[0], inputs.shape[1]
    if getattr(cache, "owner", None) is not installed:
        cache = _our_cache(installed, cache, batch, inputs.device)
    if isinstance(cache, SpotlightStaticCache):
        # A decode step's one new token per row is real: reading the mask would only cost a host sync.
        valid = None if new == 1 else _padding(kwargs.get("attention_mask"))
        if valid is not None:
            valid = valid[:, int(cache.get_seq_length()) :][:, :new].bool()
            valid = None if bool(valid.all()) else valid
        cache.seq.new_valid = valid
    else:
        total = cache.get_seq_length() + new
        valid = _padding(kwargs.get("attention_mask"))
        if valid is not None and valid.shape[-1] > total:
            valid = valid[:, :total]  # a carrier sized for the static cache generate() first made: the rest is padding
        cache.set_attention_mask(valid, total, batch)
    kwargs[installed.cache_argument] = kwargs["spotlight_cache"] = cache
    return (), kwargs


def _our_cache(installed: Installed, cache, batch: int, device):
    """The cache of ours that stands in for `cache` (None, or an empty cache transformers made)."""
    from transformers.cache_utils import StaticCache

    if cache is not None and int(cache.get_seq_length()) > 0:
        raise SpotlightError(
            "this cache already holds tokens that spotlight did not index; start from an empty cache "
            "(generate() does) or from a cache made after enable()"
        )
    if isinstance(cache, StaticCache):
        if installed.config.method in STATIC_METHODS:
            return installed.new_static_cache(batch, int(cache.get_max_length()), device, installed.dtype)
        logger.info("method %s decodes over the dynamic cache; the static one serves %s",
                    installed.config.method.value, ", ".join(m.value for m in STATIC_METHODS))
    return installed.new_cache()


def enable(model, hasher=None, config: SpotlightConfig | None = None):
    """Make `model` decode sparsely. Returns the model. Calling it again replaces the earlier setting."""
    compat.check_transformers()
    _register()
    config = config or SpotlightConfig()
    geometry = ModelGeometry.from_model(model)
    bad = [i for i in config.dense_layers if i >= geometry.num_layers]
    if bad:
        raise SpotlightError(f"dense_layers {bad} are outside the model's {geometry.num_layers} layers")
    if getattr(model, "spotlight", None) is not None:
        disable(model)
    device = next(model.parameters()).device
    rank, world = tensor_parallel(model)
    local = geometry.shard(world)  # each rank hashes, stores codes for and selects over its own KV heads
    budgets = None
    if config.head_budgets is not None:
        if config.method not in (Method.SPOTLIGHT, Method.LINEAR, Method.ORACLE):
            raise SpotlightError(f"head_budgets serve the methods that rank keys (spotlight, linear, oracle), not {config.method.value!r}")
        profile = load_profile(config.head_budgets)
        profile.check(model, geometry, config, hasher, source=f"the head budget profile {config.head_budgets}")
        share = local.num_kv_heads
        budgets = profile.layer_budgets(config, geometry.num_layers, slice(rank * share, (rank + 1) * share))
    selector = make_selector(config, hasher, geometry, device, rank, world)
    geometry = local
    previous = model.config._attn_implementation
    decoder = _decoder(model)
    signature = inspect.signature(decoder.forward)
    installed = Installed(config, selector, geometry, previous, hook=None, cache_argument=compat.cache_argument(decoder),
                          dtype=next(model.parameters()).dtype, budgets=budgets)
    installed.hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: _before_decoder_forward(installed, signature, module, args, kwargs),
        with_kwargs=True,
    )
    model.set_attn_implementation(ATTENTION_NAME)
    generation = getattr(model, "generation_config", None)
    static = config.cache == "static" or (config.cache == "auto" and device.type == "cuda")
    if generation is not None and static and config.method in STATIC_METHODS:
        installed.previous_cache_implementation = generation.cache_implementation
        installed.set_static = True
        generation.cache_implementation = "static"
    if config.defer_stop:
        compat.defer_stop_checks()  # serves only our static cache, whichever way generate() chose it
    if config.fuse_projections:
        installed.fused = fused_projections.install(decoder)
    model.spotlight = installed
    logger.info("spotlight enabled: method=%s budget=%s dense_layers=%s head_budgets=%s", config.method.value, config.budget,
                config.dense_layers, config.head_budgets)
    return model


@contextlib.contextmanager
def teacher_forcing(model, start: int = 0):
    """Inside the block, a forward pass over a whole text (with use_cache=True) scores it as decoding would.

    Each position p >= start attends only to the keys the enabled method would select at a decode
    step holding positions 0..p (same scores, budget, sink, window and tie rules); positions < start
    attend to their whole causal past, as a prefill does. One pass replaces len - start decode steps,
    which makes perplexity under retrieval cheap to measure:

        with teacher_forcing(model, start=512):
            logits = model(input_ids, use_cache=True).logits
    """
    installed = _installed(model)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise SpotlightError(f"teacher_forcing start must be an int >= 0, got {start!r}")
    previous, installed.teacher_forced_from = installed.teacher_forced_from, start
    try:
        yield model
    finally:
        installed.teacher_forced_from = previous


def index_cache(model, cache) -> SpotlightCache:
    """A cache for `model`'s enabled method holding the K/V of `cache` (e.g. a dense prefill's DynamicCache).

    Keys are hashed and paged as if they had entered through the method's own prefill (which is
    dense too), so one dense prefill can serve several methods. The tensors are shared, not copied;
    decoding appends to new tensors and leaves `cache` as it was.
    """
    installed = _installed(model)
    indexed = installed.new_cache()
    if len(cache.layers) != len(indexed.layers):
        raise SpotlightError(f"the cache has {len(cache.layers)} layers, the model {len(indexed.layers)}")
    for ours, theirs in zip(indexed.layers, cache.layers):
        if theirs.keys is not None and theirs.keys.numel():
            ours.update(theirs.keys, theirs.values)
    return indexed


def _installed(model) -> Installed:
    installed = getattr(model, "spotlight", None)
    if installed is None:
        raise SpotlightError("spotlight is not enabled on this model: call spotlight_attn.enable(model, ...) first")
    return installed


def disable(model):
    """Undo enable(): the model's own attention and cache again. Returns the model."""
    installed = getattr(model, "spotlight", None)
    if installed is None:
        return model
    installed.hook.remove()
    fused_projections.uninstall(installed.fused or [])
    model.set_attn_implementation(installed.previous_attention)
    generation = getattr(model, "generation_config", None)
    if installed.set_static and generation is not None and generation.cache_implementation == "static":
        generation.cache_implementation = installed.previous_cache_implementation  # unless the user changed it since
    installed.static_cache = None  # its buffers go with it
    del model.spotlight
    return model
