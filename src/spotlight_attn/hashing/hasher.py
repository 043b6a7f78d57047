"""Hash functions that turn post-RoPE queries and keys into short binary codes.

Head order follows transformers' `repeat_kv`: query head j belongs to KV head j // G.

- `MLPHasher`: learned, non-linear. Per (layer, head): `depth` residual blocks
  x <- x + W2 silu(W1 x + b1) + b2 on the head dim, then a projection P to `bits` outputs.
  Training uses soft codes s = g h / (1 + |g h|); inference uses sign(h) packed into int32 words.
  With the block weights near zero an untrained MLPHasher is SimHash through P.
- `LinearHasher`: SimHash, sign of seeded Gaussian projections, any bit width. Nothing to train.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from spotlight_attn.config import HasherConfig, Placement
from spotlight_attn.errors import HasherMismatchError
from spotlight_attn.kernels import hash as fused_hash
from spotlight_attn.kernels import ops
from spotlight_attn.kernels.pack import num_words, pack_signs, pack_signs_reference


class HeadBank(nn.Module):
    """One hash per head for `num_heads` heads: residual SiLU MLP stack, then projection to bits."""

    def __init__(self, num_heads: int, head_dim: int, config: HasherConfig, generator: torch.Generator):
        super().__init__()
        n, d, w, depth = num_heads, head_dim, config.width, config.depth

        def randn(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.w1 = randn(depth, n, d, w, std=config.init_scale)
        self.b1 = nn.Parameter(torch.zeros(depth, n, 1, w))
        self.w2 = randn(depth, n, w, d, std=config.init_scale)
        self.b2 = nn.Parameter(torch.zeros(depth, n, 1, d))
        self.proj = randn(n, d, config.bits, std=d**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, n, S, D] -> pre-sign hash [B, n, S, bits], in the bank's dtype."""
        x, unfold = _heads_first(x.to(self.proj.dtype))  # [n, B*S, D]
        for i in range(self.w1.shape[0]):
            hidden = nn.functional.silu(torch.baddbmm(self.b1[i], x, self.w1[i]))  # [n, B*S, width]
            x = x + torch.baddbmm(self.b2[i], hidden, self.w2[i])  # [n, B*S, D]
        return unfold(torch.bmm(x, self.proj))  # [B, n, S, bits]

    def kernel_weights(self) -> tuple:
        """(w1, b1, w2, b2, proj) as kernels/hash.py takes them."""
        return self.w1, self.b1, self.w2, self.b2, self.proj


def _heads_first(x: torch.Tensor):
    """x [B, n, S, D] -> ([n, B*S, D], unfold), unfold: [n, B*S, m] -> [B, n, S, m] (a view).

    Heads as the batch of one bmm per weight, every row of every batch in its M: broadcasting the
    per-head weights over B instead makes torch.compile copy them B times per matmul (measured in
    the compiled decode step's graph: one clone per weight per step)."""
    b, n, s, d = x.shape
    folded = x.transpose(0, 1).reshape(n, b * s, d)
    return folded, lambda y: y.reshape(n, b, s, y.shape[-1]).transpose(0, 1)


# The fused hash kernel (kernels/hash.py) for a decode step's few rows: False = off, None = on CUDA
# tensors (the default: on the H200 it hashes a step in about half the time of the torch path,
# docs/FAST_PATH.md), True = everywhere (the interpreter tests). SPOTLIGHT_FUSED_HASH=0 turns it off.
FUSED_KERNEL: bool | None = False if os.environ.get("SPOTLIGHT_FUSED_HASH", "1") == "0" else None


def hash_path(device: torch.device) -> str:
    """How a decode step hashes on `device`: "fused kernel" or "torch" (what bench rows record)."""
    use = FUSED_KERNEL if FUSED_KERNEL is not None else torch.device(device).type == "cuda"
    return "fused kernel" if use else "torch"


def _codes(bank: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [B, n, S, D] -> packed codes [B, n, S, W]. A few rows per head on CUDA (a decode step's) go
    through the fused kernel (kernels/hash.py: the whole hash in one launch); others through the
    bank in torch, then packed."""
    use = FUSED_KERNEL if FUSED_KERNEL is not None else x.is_cuda
    if use and x.shape[0] * x.shape[2] <= fused_hash.MAX_ROWS:
        folded, unfold = _heads_first(x)
        return unfold(ops.hash_codes_op(folded, *bank.kernel_weights(), use_kernel=1 if FUSED_KERNEL else -1))
    return _pack(bank(x))


def _pack(hashed: torch.Tensor) -> torch.Tensor:
    """Packed sign bits: the Triton kernel when run eagerly on CUDA; inside torch.compile the torch
    reference, which the compiler fuses with the hash itself (the same bits either way)."""
    if torch.compiler.is_compiling():
        return pack_signs_reference(hashed)
    return pack_signs(hashed)


def soft_sign(hashed: torch.Tensor, gain: float) -> torch.Tensor:
    """Smooth sign used in training: g h / (1 + |g h|), in (-1, 1)."""
    scaled = gain * hashed
    return scaled / (1 + scaled.abs())


class _HasherBase(nn.Module):
    """Shared plumbing: which layers are covered, GQA head folding, packing."""

    bits: int
    placement: Placement

    def __init__(self, geometry, layers: Sequence[int]):
        super().__init__()
        self.geometry = geometry
        self.layers = tuple(sorted(int(i) for i in layers))
        bad = [i for i in self.layers if not 0 <= i < geometry.num_layers]
        if bad:
            raise HasherMismatchError(f"hasher layers {bad} are outside the model's {geometry.num_layers} layers")

    @property
    def words(self) -> int:
        return num_words(self.bits)

    def _bank(self, kind: str, layer: int) -> nn.Module:
        if layer not in self.layers:
            raise HasherMismatchError(f"hasher has no hash for layer {layer} (it covers layers {list(self.layers)})")
        return self.banks[f"{kind}{layer}"]

    def hash_keys(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, Hkv, T, D] -> pre-sign hash [B, Hkv, T, bits]."""
        return self._bank("k", layer)(keys)

    def _query_input(self, layer: int, queries: torch.Tensor):
        """(bank, its input, unfold): queries [B, Hq, S, D] as the bank that hashes them takes them; with
        shared placement each KV head's bank takes its G query heads as rows [B, Hkv, G*S, D]."""
        if self.placement is Placement.ASYMMETRIC:
            return self._bank("q", layer), queries, lambda y: y
        b, hq, s, d = queries.shape
        hkv = self.geometry.num_kv_heads
        return self._bank("k", layer), queries.reshape(b, hkv, (hq // hkv) * s, d), lambda y: y.reshape(b, hq, s, -1)

    def hash_queries(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """queries [B, Hq, S, D] -> pre-sign hash [B, Hq, S, bits]."""
        bank, x, unfold = self._query_input(layer, queries)
        return unfold(bank(x))

    def key_codes(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, Hkv, T, D] -> packed codes [B, Hkv, T, W] int32."""
        with torch.no_grad():
            return _codes(self._bank("k", layer), keys)

    def query_codes(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """queries [B, Hq, S, D] -> packed codes [B, Hq, S, W] int32."""
        with torch.no_grad():
            bank, x, unfold = self._query_input(layer, queries)
            return unfold(_codes(bank, x))

    def step_codes(
        self, layer: int, queries: torch.Tensor, keys: torch.Tensor, *, grouped: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's codes: queries [B, Hq, S, D] and the step's new keys [B, Hkv, S_k, D] ->
        (query codes [B, Hq, S, W], key codes [B, Hkv, S_k, W]). With a shared hash, one pass of the
        bank over both (half the launches of two calls); the same codes as query_codes and key_codes.

        grouped: query codes as [B, Hkv, G * S, W] (KV head h's query heads h * G .. h * G + G - 1, each
        S rows), a view of the pass's output rather than a copy; score_select reads that form in place.
        """
        if self.placement is Placement.ASYMMETRIC:
            query_codes = self.query_codes(layer, queries)
            if grouped:
                b, hq, s, w = query_codes.shape
                query_codes = query_codes.reshape(b, keys.shape[1], (hq // keys.shape[1]) * s, w)
            return query_codes, self.key_codes(layer, keys)
        b, hq, s, d = queries.shape
        hkv = keys.shape[1]
        rows = (hq // hkv) * s
        with torch.no_grad():
            both = torch.cat([queries.reshape(b, hkv, rows, d), keys.to(queries.dtype)], dim=2)  # [B, Hkv, G*S + S_k, D]
            codes = _codes(self._bank("k", layer), both)
        query_codes = codes[:, :, :rows]
        return (query_codes if grouped else query_codes.reshape(b, hq, s, -1)), codes[:, :, rows:]

    def fused_step_codes(
        self, layer: int, queries: torch.Tensor, keys_by_token: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor | None:
        """A decode step's hash in one launch of the fused kernel, straight from and into the cache:
        queries [B, Hq, 1, D], the cache's keys [B, T, Hkv, D] with the step's new key at lengths[b] - 1,
        the code cache [B, Hkv, T, W] -> query codes [B, Hkv, G, W], the new keys' codes written into
        `codes`. The same codes as step_codes(grouped=True) followed by their write. None where that
        kernel does not serve (asymmetric placement, a query of more than one token, too many rows,
        the fused kernel off or not on this device): then hash with step_codes."""
        use = FUSED_KERNEL if FUSED_KERNEL is not None else queries.is_cuda
        if not use or self.placement is Placement.ASYMMETRIC:
            return None
        weights = self._bank("k", layer).kernel_weights()
        if not fused_hash.step_serves(queries, keys_by_token, weights[0], weights[-1]):
            return None
        with torch.no_grad():
            return ops.step_hash_codes_op(
                queries, keys_by_token, lengths, codes, *weights, use_kernel=1 if FUSED_KERNEL else -1
            )

    def shard(self, rank: int, world: int) -> "_HasherBase":
        """A copy holding the hashes of tensor-parallel rank `rank` of `world`: its contiguous share of
        the KV heads (and of the query heads, for query banks), as transformers' TP plans shard the
        projections. Codes and selection are per KV head, so a rank needs nothing of another's."""
        import copy

        local = self.geometry.shard(world)
        shard = copy.deepcopy(self)
        shard.geometry = local
        for name, bank in shard.banks.items():
            n = local.num_q_heads if name.startswith("q") else local.num_kv_heads
            for attr, dim in (("w1", 1), ("b1", 1), ("w2", 1), ("b2", 1), ("proj", 0)):
                tensor = getattr(bank, attr, None)
                if tensor is None:
                    continue
                part = tensor.detach().narrow(dim, rank * n, n).clone()
                if isinstance(tensor, nn.Parameter):
                    setattr(bank, attr, nn.Parameter(part, requires_grad=tensor.requires_grad))
                else:
                    setattr(bank, attr, part)  # a registered buffer stays one
        return shard

    def soft_keys(self, layer: int, keys: torch.Tensor, gain: float = 64.0) -> torch.Tensor:
        return soft_sign(self.hash_keys(layer, keys), gain)

    def soft_queries(self, layer: int, queries: torch.Tensor, gain: float = 64.0) -> torch.Tensor:
        return soft_sign(self.hash_queries(layer, queries), gain)


class MLPHasher(_HasherBase):
    """Learned non-linear hash for the listed layers of a model of the given geometry."""

    def __init__(self, geometry, config: HasherConfig | None = None, layers: Sequence[int] | None = None, seed: int = 0):
        config = config or HasherConfig()
        super().__init__(geometry, range(geometry.num_layers) if layers is None else layers)
        self.config = config
        self.bits = config.bits
        self.placement = config.placement
        generator = torch.Generator().manual_seed(seed)
        d = geometry.head_dim
        banks = {}
        for layer in self.layers:
            banks[f"k{layer}"] = HeadBank(geometry.num_kv_heads, d, config, generator)
            if config.placement is Placement.ASYMMETRIC:
                banks[f"q{layer}"] = HeadBank(geometry.num_q_heads, d, config, generator)
        self.banks = nn.ModuleDict(banks)


class _Projection(nn.Module):
    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.register_buffer("proj", proj)  # [Hkv, D, bits]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unfold = _heads_first(x.to(self.proj.dtype))  # [n, B*S, D]
        return unfold(torch.bmm(x, self.proj))  # [B, n, S, bits]

    def kernel_weights(self) -> tuple:
        return None, None, None, None, self.proj  # SimHash: the projection alone


class LinearHasher(_HasherBase):
    """SimHash baseline: sign(x @ R) with R ~ N(0, 1) seeded per layer, shared by queries and keys."""

    placement = Placement.SHARED

    def __init__(self, geometry, bits: int = 128, seed: int = 0, layers: Sequence[int] | None = None):
        super().__init__(geometry, range(geometry.num_layers) if layers is None else layers)
        if bits < 1:
            raise HasherMismatchError(f"bits must be >= 1, got {bits}")
        self.bits = bits
        self.seed = seed
        banks = {}
        for layer in self.layers:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
            proj = torch.randn(geometry.num_kv_heads, geometry.head_dim, bits, generator=generator)
            banks[f"k{layer}"] = _Projection(proj)
        self.banks = nn.ModuleDict(banks)
