"""The decoder's projections through the split-K decode GEMM: SpotlightConfig(fast_linear=True).

A decode step multiplies a few rows by every weight matrix, and cuBLAS streams the smaller ones
(k/v, q/o of the Llama-3-8B shape) at 26-59% of the H200's copy bandwidth (docs/BENCHMARKS.md).
With fast_linear, enable() puts a `DecodeLinear` in place of each plain `nn.Linear` inside the
decoder (the lm_head stays: cuBLAS streams it at full bandwidth), the way quantisation libraries
swap their linear layers. It holds the same weight and bias Parameters (nothing is copied, the
state dict keeps its keys) and sends inputs of at most 16 rows on CUDA through
`spotlight::skinny_linear`, everything else through F.linear. disable() puts the originals back.

Modules that are not exactly nn.Linear (a quantised or LoRA layer) or carry hooks are left alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spotlight_attn.kernels.linear import MAX_ROWS

_DTYPES = (torch.float16, torch.bfloat16)


class DecodeLinear(nn.Linear):
    """nn.Linear whose decode-sized inputs (<= 16 rows, CUDA, 16-bit floats, no autograd) take the split-K kernel."""

    use_kernel = -1  # -1: the kernel on CUDA inputs; 1: on any device (tests: the interpreter on CPU); 0: never

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        fits = 0 < rows <= MAX_ROWS and x.dtype in _DTYPES and x.dtype == self.weight.dtype and not needs_grad
        if fits and (x.is_cuda if self.use_kernel < 0 else self.use_kernel == 1):
            from spotlight_attn.kernels import ops  # noqa: F401  (registers the op)

            out = torch.ops.spotlight.skinny_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias, self.use_kernel)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "DecodeLinear":
        """A DecodeLinear holding `linear`'s own weight and bias Parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new


def _plain(module: nn.Module) -> bool:
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    return type(module) is nn.Linear and not any(hooks)


def install(decoder: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Swap every plain nn.Linear under `decoder` for a DecodeLinear -> (parent, name, original) per swap."""
    swapped = []
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if _plain(child):
                setattr(parent, name, DecodeLinear.sharing(child))
                swapped.append((parent, name, child))
    return swapped


def uninstall(swapped: list[tuple[nn.Module, str, nn.Linear]]) -> None:
    """Put the original modules back (the ones still holding a DecodeLinear we installed)."""
    for parent, name, original in swapped:
        if isinstance(getattr(parent, name, None), DecodeLinear):
            setattr(parent, name, original)
