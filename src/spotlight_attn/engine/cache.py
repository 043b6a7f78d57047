"""The engine's preallocated cache: K/V and packed key codes for every layer, sized once.

Layout (chosen for the kernels that read it):
- keys, values: [B, T_max, Hkv, D] per layer, token-major. Flash-attention's varlen kernel reads it as
  [B * T_max, Hkv, D] with per-row lengths, SDPA and sparse_decode read the [B, Hkv, T, D] view
  `keys.transpose(1, 2)` (no copy; only the last dim must be contiguous).
- codes: [B, Hkv, T_max, W] int32 per sparse layer (score_select streams each head's codes).
- lengths: [B] int64 on the device, tokens held per row. Row b's tokens sit at positions
  [0, lengths[b]) whatever the prompt padding was (prefill compacts them), so every row's valid keys
  form one run starting at 0: what the kernels' device-side plan assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StaticCache:
    keys: list[torch.Tensor]  # per layer [B, T_max, Hkv, D]
    values: list[torch.Tensor]  # per layer [B, T_max, Hkv, D]
    codes: list[torch.Tensor | None]  # per layer [B, Hkv, T_max, W] int32, None for dense layers
    lengths: torch.Tensor  # [B] int64: tokens held per row

    @classmethod
    def allocate(
        cls, num_layers: int, batch: int, max_tokens: int, kv_heads: int, head_dim: int, words: int,
        sparse_layers: set[int], dtype: torch.dtype, device: torch.device,
    ) -> StaticCache:
        """Zeroed buffers. Positions past a row's length are never selected, but a masked dense kernel
        still multiplies their values by a zero weight, so they must hold finite numbers (not NaN)."""
        kv_shape = (batch, max_tokens, kv_heads, head_dim)
        code_shape = (batch, kv_heads, max_tokens, words)
        return cls(
            keys=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)],
            codes=[
                torch.zeros(code_shape, dtype=torch.int32, device=device) if i in sparse_layers else None
                for i in range(num_layers)
            ],
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_tokens(self) -> int:
        return self.keys[0].shape[1]

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {'kv': K and V of every layer, 'codes': key codes of the sparse layers}."""
        kv = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        codes = sum(t.numel() * t.element_size() for t in self.codes if t is not None)
        return {"kv": kv, "codes": codes}
