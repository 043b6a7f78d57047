"""DecodeEngine: fast greedy decoding of a transformers Llama-family model over a static cache.

The library's `enable()` path keeps transformers' generate() working; this engine is for speed,
where attention and not Python must dominate a step:
- a StaticCache sized once (K/V and packed key codes of every layer, see cache.py);
- the decode step written over the model's own modules (its norms, projections, rotary embedding,
  MLP and head are called, none is replaced): embed -> per layer (norm, q/k/v, RoPE, cache write,
  attention, o_proj, MLP) -> norm -> head;
- attention per layer: dense layers through a dense kernel (dense.py), sparse layers through
  hash codes -> score_select -> sparse_decode, with one selection plan per step built on the device
  (kernels/score_select.plan_from_lengths) and shared by every layer, so no host read in the step;
- on CUDA the whole step is captured in a CUDA graph per "view" (the key range a step reads, the
  largest length rounded up to `bucket` tokens) and replayed; `compile=True` also runs the per-layer
  dense math through torch.compile (fused norms and RoPE), inside the same graph.
A `dense` config runs the very same path with every layer dense: that is the baseline.

Supports the methods that select by hash codes ('spotlight' with a learned MLPHasher, 'linear'
SimHash) and 'dense'. Prefill runs the model's own forward once, then copies K/V into the static
cache (compacting each row's real tokens to positions 0..n-1) and hashes the keys.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from spotlight_attn import compat
from spotlight_attn.config import Method, SpotlightConfig
from spotlight_attn.engine.cache import StaticCache
from spotlight_attn.engine.dense import DenseAttention, DenseKernel, default_kernel
from spotlight_attn.errors import SpotlightError, UnsupportedModelError
from spotlight_attn.kernels.pack import pack_signs_reference
from spotlight_attn.kernels.score_select import plan_from_lengths, score_select
from spotlight_attn.kernels.sparse_decode import sparse_decode
from spotlight_attn.models import ModelGeometry

logger = logging.getLogger(__name__)
ENGINE_METHODS = (Method.DENSE, Method.SPOTLIGHT, Method.LINEAR)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_inputs(layer, hidden, cos, sin):
    """hidden [B, 1, H], cos/sin [B, 1, D] -> post-RoPE q [B, Hq, 1, D], k [B, Hkv, 1, D], v [B, Hkv, 1, D]."""
    attn = layer.self_attn
    b, d = hidden.shape[0], attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, 1, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, 1, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, 1, -1, d).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def attention_output(layer, hidden, attn_out):
    """hidden [B, 1, H], attn_out [B, Hq, 1, D] -> the layer's output hidden [B, 1, H]."""
    b = hidden.shape[0]
    hidden = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def hashed_attention_inputs(layer, key_bank, query_bank, hidden, cos, sin):
    """attention_inputs + the codes of the new key [B, Hkv, 1, W] and of the query [B, Hq, 1, W].

    The same hashing as the hasher's key_codes / query_codes (query_bank None: shared placement, a KV
    head's G queries go through its key hash), in pure torch so that torch.compile fuses the packing.
    """
    q, k, v = attention_inputs(layer, hidden, cos, sin)
    key_codes = pack_signs_reference(key_bank(k))
    if query_bank is None:
        b, hq, s, d = q.shape
        hkv = k.shape[1]
        query_codes = pack_signs_reference(key_bank(q.reshape(b, hkv, (hq // hkv) * s, d))).reshape(b, hq, s, -1)
    else:
        query_codes = pack_signs_reference(query_bank(q))
    return q, k, v, query_codes, key_codes


def _check_model(model) -> tuple:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or head is None or any(not hasattr(decoder, n) for n in needed):
        raise UnsupportedModelError("the decode engine needs a Llama-family causal LM (embed_tokens, layers, norm, rotary_emb, lm_head)")
    for layer in decoder.layers:
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            raise UnsupportedModelError(f"layer {attn.layer_idx}: attention without q/k/v/o projections is not supported")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise UnsupportedModelError("attention with q/k norms is not supported by the decode engine")
    if getattr(model, "spotlight", None) is not None:
        raise SpotlightError("call spotlight_attn.disable(model) before building a DecodeEngine on it")
    return decoder, head


class DecodeEngine:
    """Greedy batched decoding with a static cache and CUDA graphs.

    engine = DecodeEngine(model, hasher, SpotlightConfig(method="linear", budget=0.02), max_batch=4, max_tokens=8192)
    logits = engine.prefill(input_ids, attention_mask)     # [B, V] at each row's last prompt token
    logits = engine.step(logits.argmax(-1))                 # [B, V] for the next token (a static buffer)
    tokens, _ = engine.generate(input_ids, attention_mask, max_new_tokens=32)
    """

    def __init__(
        self,
        model,
        hasher=None,
        config: SpotlightConfig | None = None,
        *,
        max_batch: int,
        max_tokens: int,
        graphs: bool | None = None,
        compile: bool = False,
        dense_kernel: DenseKernel | str | None = None,
        bucket: int = 256,
        max_graphs: int = 8,
        use_kernel: bool | None = None,
    ):
        """graphs: capture steps in CUDA graphs (default: on CUDA). compile: torch.compile the per-layer
        dense math. dense_kernel: see dense.py (default flash-varlen on CUDA, else sdpa-masked). bucket:
        tokens a graph's key range grows by. use_kernel: passed to the kernels (tests: Triton interpreter)."""
        from spotlight_attn.attention import make_selector

        self.config = config or SpotlightConfig(method="dense")
        if self.config.method not in ENGINE_METHODS:
            names = ", ".join(m.value for m in ENGINE_METHODS)
            raise SpotlightError(f"the decode engine runs methods {names}; not '{self.config.method.value}'")
        self.model = model
        self.decoder, self.head = _check_model(model)
        self.geometry = ModelGeometry.from_model(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sparse_layers: set[int] = set()
        self.hasher = None
        if self.config.method is not Method.DENSE:
            self.hasher = make_selector(self.config, hasher, self.geometry, self.device).hasher
            self.sparse_layers = set(self.hasher.layers) - set(self.config.dense_layers)
        self.budget = self.config.budget_spec
        self.use_kernel = use_kernel
        self.force_reference = self.config.force_reference
        if bucket < 1:
            raise SpotlightError(f"bucket must be >= 1 token, got {bucket}")
        self.bucket = bucket
        self.max_graphs = max_graphs
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise SpotlightError("CUDA graphs need the model on a CUDA device")
        g = self.geometry
        words = self.hasher.words if self.hasher is not None else 1
        # Rounded up to 64 tokens, so that every head's rows of codes start 16-byte aligned (the
        # kernels' vector loads need the compiler to see that from the strides).
        max_tokens = -(-max_tokens // 64) * 64
        self.cache = StaticCache.allocate(
            g.num_layers, max_batch, max_tokens, g.num_kv_heads, g.head_dim, words, self.sparse_layers, self.dtype, self.device
        )
        self.dense = DenseAttention(
            dense_kernel or default_kernel(self.device, self.dtype), max_batch, max_tokens, self.device, self.dtype
        )
        self._rows = torch.arange(max_batch, device=self.device)
        self._ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)  # the step's input
        self._logits = torch.empty(max_batch, model.config.vocab_size, dtype=self.dtype, device=self.device)
        self._bounds = torch.zeros(max_batch, 3, dtype=torch.int32, device=self.device)  # selection plan rows
        self._host_lengths = [0] * max_batch  # mirrors cache.lengths, so no step reads the device
        self._graphs: OrderedDict[int, torch.cuda.CUDAGraph] = OrderedDict()
        self._pool = None
        self._inputs, self._outputs, self._hashed_inputs = attention_inputs, attention_output, None
        if compile:
            self._inputs = torch.compile(attention_inputs, dynamic=False, fullgraph=True)
            self._outputs = torch.compile(attention_output, dynamic=False, fullgraph=True)
            if self.hasher is not None:
                self._hashed_inputs = torch.compile(hashed_attention_inputs, dynamic=False, fullgraph=True)

    # ---- filling the cache -------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [B, S] through the model's own forward; fill the cache. -> logits [B, V] at
        each row's last real token. Padding (attention_mask == 0) may sit anywhere; it is dropped."""
        b, s = input_ids.shape
        if b != self.cache.batch:
            raise SpotlightError(f"the engine was built for batch {self.cache.batch}, got {b} prompts")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        counts = mask.sum(-1).tolist()
        if max(counts) + 1 > self.cache.max_tokens or min(counts) < 1:
            raise SpotlightError(f"prompt lengths {counts} must be >= 1 and leave room in max_tokens={self.cache.max_tokens}")
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        out = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        kv = compat.output_cache(out)
        for i in range(self.geometry.num_layers):
            keys, values = kv.layers[i].keys, kv.layers[i].values  # [B, Hkv, S, D], post-RoPE
            for row in range(b):
                real = mask[row].nonzero().squeeze(-1)  # [n]
                n = real.numel()
                self.cache.keys[i][row, :n] = keys[row][:, real].transpose(0, 1)  # [n, Hkv, D]
                self.cache.values[i][row, :n] = values[row][:, real].transpose(0, 1)
                if i in self.sparse_layers:
                    self.cache.codes[i][row, :, :n] = self.hasher.key_codes(i, keys[row : row + 1][:, :, real])[0]
            kv.layers[i].keys = kv.layers[i].values = None  # free as we go
        last = torch.tensor([int(mask[r].nonzero().max()) for r in range(b)], device=input_ids.device)
        hidden = out.last_hidden_state[torch.arange(b, device=input_ids.device), last]  # [B, H]
        self._set_lengths(counts)
        return self.head(hidden).float()

    @torch.no_grad()
    def fill_random(self, lengths: list[int], seed: int = 0, chunk: int = 32768) -> None:
        """Benchmarks: fill row b with lengths[b] random keys/values (N(0, 1)) and their real hash codes,
        instead of a prefill. Decode speed does not depend on the values."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for i in range(self.geometry.num_layers):
            for row, n in enumerate(lengths):
                for buf in (self.cache.keys[i], self.cache.values[i]):
                    buf[row, :n].normal_(generator=generator)
                if i in self.sparse_layers:
                    for s in range(0, n, chunk):
                        keys = self.cache.keys[i][row : row + 1, s : min(n, s + chunk)].transpose(1, 2)  # [1, Hkv, c, D]
                        self.cache.codes[i][row, :, s : s + keys.shape[2]] = self.hasher.key_codes(i, keys)[0]
        self._set_lengths(lengths)

    def _set_lengths(self, lengths: list[int]) -> None:
        self._host_lengths = [int(n) for n in lengths]
        self.cache.lengths.copy_(torch.tensor(self._host_lengths, device=self.device))

    # ---- one decode step ---------------------------------------------------------------------------

    def view_for(self, length: int) -> int:
        """Key range a step reads when the longest row holds `length` tokens (the new one included)."""
        if self.dense.kernel is DenseKernel.SDPA:
            return length  # exact: SDPA reads keys[:, :view] unmasked
        return min(-(-length // self.bucket) * self.bucket, self.cache.max_tokens)

    def _step_body(self, view: int) -> None:
        """The step's device work: reads self._ids, writes the cache, lengths and self._logits."""
        cache, budget = self.cache, self.budget
        positions = cache.lengths  # [B]: where the new token goes, and its RoPE position
        new_lengths = positions + 1
        hidden = self.decoder.embed_tokens(self._ids)  # [B, 1, H]
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None])  # [B, 1, D]
        plan = valid = None
        if self.sparse_layers:
            plan = plan_from_lengths(new_lengths, budget, budget.tokens_for(view), self._bounds)
            valid = self.dense.positions[:view][None, :] < new_lengths[:, None]  # [B, view]; the reference reads it
        rows = self._rows
        for i, layer in enumerate(self.decoder.layers):
            sparse = i in self.sparse_layers
            if sparse and self._hashed_inputs is not None:
                q, k, v, query_codes, key_codes = self._hashed_inputs(layer, *self._banks(i), hidden, cos, sin)
            else:
                q, k, v = self._inputs(layer, hidden, cos, sin)  # [B, Hq, 1, D], [B, Hkv, 1, D] x 2
                if sparse:
                    query_codes, key_codes = self.hasher.query_codes(i, q), self.hasher.key_codes(i, k)  # [B, H, 1, W]
            keys, values = cache.keys[i], cache.values[i]  # [B, T_max, Hkv, D]
            keys[rows, positions] = k[:, :, 0]
            values[rows, positions] = v[:, :, 0]
            scaling = layer.self_attn.scaling
            if sparse:
                codes = cache.codes[i]  # [B, Hkv, T_max, W]
                codes[rows, :, positions] = key_codes[:, :, 0]
                indices = score_select(
                    query_codes, codes[:, :, :view], valid, budget, self.hasher.bits, plan=plan,
                    use_kernel=self.use_kernel, force_reference=self.force_reference,
                )  # [B, Hkv, k]
                out = sparse_decode(
                    q, keys.transpose(1, 2), values.transpose(1, 2), indices, scaling,
                    use_kernel=self.use_kernel, force_reference=self.force_reference,
                )
            else:
                out = self.dense(q, keys, values, new_lengths, view, scaling)  # [B, Hq, 1, D]
            hidden = self._outputs(layer, hidden, out)
        cache.lengths.copy_(new_lengths)
        self._logits.copy_(self.head(self.decoder.norm(hidden))[:, 0])

    def _banks(self, layer: int):
        """(key hash module, query hash module or None for shared placement) of a sparse layer."""
        banks = self.hasher.banks
        return banks[f"k{layer}"], banks[f"q{layer}"] if f"q{layer}" in banks else None

    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the CUDA graph the next step needs, if it is not held yet (no-op without graphs).
        step() calls it; benchmarks call it first so that timings exclude captures."""
        if not self.graphs:
            return
        view = self.view_for(max(self._host_lengths) + 1)
        if view in self._graphs:
            self._graphs.move_to_end(view)
            return
        self._check_room()
        saved = self.cache.lengths.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step_body(view)  # warm-up: compiles kernels, makes the counter rings; undone below
            self.cache.lengths.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body(view)
        graph.replay()  # the first replay uploads the graph (slow): do it here, not in a timed step
        self.cache.lengths.copy_(saved)
        self._graphs[view] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        logger.debug("captured a decode graph for view %d (%d held)", view, len(self._graphs))

    def _check_room(self) -> None:
        if max(self._host_lengths) + 1 > self.cache.max_tokens:
            raise SpotlightError(f"the cache is full: max_tokens={self.cache.max_tokens}")
        if max(self._host_lengths) == 0:
            raise SpotlightError("prefill (or fill_random) before decoding")

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append token_ids [B] and run one decode step. -> logits [B, V] for the following token (a
        buffer the next step overwrites; clone to keep)."""
        self._check_room()
        self._ids.copy_(token_ids.view(-1, 1))
        if self.graphs:
            self.prepare()
            self._graphs[self.view_for(max(self._host_lengths) + 1)].replay()
        else:
            self._step_body(self.view_for(max(self._host_lengths) + 1))
        self._host_lengths = [n + 1 for n in self._host_lengths]
        return self._logits

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding. -> (new tokens [B, max_new_tokens], their logits [B, max_new_tokens, V] float32)."""
        logits = self.prefill(input_ids, attention_mask)
        tokens, all_logits = [], [logits]
        for _ in range(max_new_tokens - 1):
            tokens.append(all_logits[-1].argmax(-1))
            all_logits.append(self.step(tokens[-1]).float().clone())
        tokens.append(all_logits[-1].argmax(-1))
        return torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1)

    # ---- accounting --------------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes: 'weights' (model parameters), 'kv', 'codes' (cache buffers), 'hasher'."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        hasher = 0
        if self.hasher is not None:
            hasher = sum(t.numel() * t.element_size() for t in list(self.hasher.parameters()) + list(self.hasher.buffers()))
        return {"weights": weights, **self.cache.nbytes(), "hasher": hasher}
