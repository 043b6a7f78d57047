"""Dense decode attention over the static cache: one query token per row, every held key.

Three kernels, one contract: query [B, Hq, 1, D], keys/values [B, T_max, Hkv, D] (token-major),
lengths [B] (tokens held per row, the new one included), `view` >= every length -> [B, Hq, 1, D].
- FLASH_VARLEN: flash-attention's variable-length kernel (torch's aten op) reading the cache as
  [B * T_max, Hkv, D] with per-row `seqused_k` on the device: no mask, no host read, so one CUDA
  graph serves every length up to `view`.
- SDPA: torch SDPA over exactly keys[:, :view], no mask. Exact only when every row holds `view`
  tokens, so a CUDA graph serves one length (the engine then captures a graph per step).
- SDPA_MASKED: torch SDPA over keys[:, :view] with a padding mask: any lengths, any device (the CPU
  path; on the GPU a mask rules out the flash backend).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from spotlight_attn.errors import SpotlightError


class DenseKernel(str, Enum):
    FLASH_VARLEN = "flash-varlen"
    SDPA = "sdpa"
    SDPA_MASKED = "sdpa-masked"


def flash_varlen_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch's flash-attention varlen op runs here (CUDA, sm80+, fp16/bf16, the op present)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def default_kernel(device: torch.device, dtype: torch.dtype) -> DenseKernel:
    return DenseKernel.FLASH_VARLEN if flash_varlen_available(device, dtype) else DenseKernel.SDPA_MASKED


class DenseAttention:
    """Holds the small constant tensors a kernel needs (built once, so graph replays allocate nothing)."""

    def __init__(self, kernel: DenseKernel | str, batch: int, max_tokens: int, device: torch.device, dtype: torch.dtype):
        self.kernel = DenseKernel(kernel)
        if self.kernel is DenseKernel.FLASH_VARLEN and not flash_varlen_available(device, dtype):
            raise SpotlightError(
                f"dense kernel 'flash-varlen' needs fp16/bf16 on a CUDA GPU of compute capability >= 8.0, not {dtype} on {device}"
            )
        rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.cu_q = rows  # [B + 1]: one query token per row
        self.cu_k = rows * max_tokens  # [B + 1]: row b's keys start at b * T_max in the flat view
        self.positions = torch.arange(max_tokens, device=device)  # [T_max]

    def __call__(self, query, keys, values, lengths, view: int, scaling: float) -> torch.Tensor:
        b, hq, _, d = query.shape
        if self.kernel is DenseKernel.FLASH_VARLEN:
            t_max, hkv = keys.shape[1], keys.shape[2]
            q = query.reshape(b, hq, d)  # [B, Hq, D]: one token per row (S = 1, so this is a view)
            out = torch.ops.aten._flash_attention_forward(
                q, keys.view(b * t_max, hkv, d), values.view(b * t_max, hkv, d), self.cu_q, self.cu_k,
                1, view, 0.0, False, False, scale=scaling, seqused_k=lengths.to(torch.int32),
            )[0]  # [B, Hq, D]
            return out.view(b, hq, 1, d)
        k = keys[:, :view].transpose(1, 2)  # [B, Hkv, view, D]
        v = values[:, :view].transpose(1, 2)
        mask = None
        if self.kernel is DenseKernel.SDPA_MASKED:
            mask = (self.positions[:view][None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, view]
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
