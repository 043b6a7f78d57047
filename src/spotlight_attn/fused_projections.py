"""Sibling projections as one GEMM: SpotlightConfig(fuse_projections=True).

A decode step multiplies a few rows by every weight matrix, so each GEMM streams its weight. The
small ones stream badly: on the H200, cuBLAS reads the Llama-3-8B shape's k/v projections (8 MB) at
26% of the copy bandwidth and q/o (32 MB) at 59%, while q, k and v as one 4096 x 6144 GEMM reach
69-75% (benchmarks/gemm_probe.py, docs/BENCHMARKS.md). The model's attention still calls q_proj,
k_proj and v_proj one after another on the same input; with fuse_projections, enable() stores each
group's weights side by side in one tensor (the Parameters become views into it: no second copy,
the state dict keeps its keys) and puts a `FusedLinear` in place of each member. Whichever member
is called first with an input runs the group's one GEMM and keeps the other members' slices of the
result for their calls with that same input; they take them and the group lets go of them. Any
other call (another input, a member called twice, autograd on) runs that member's own F.linear, so
results never depend on the order the model calls them in.

Groups (GROUPS): q/k/v of attention, gate/up of the MLP, where the siblings exist under those
names, are plain nn.Linear with plain tensor weights (not quantised, adapter or tensor-parallel
layers), carry no hooks (module hooks, or an instance-level forward such as accelerate's offload), and agree in input size, dtype, device and bias. disable() gives every
Parameter its own storage back. Call enable() after the model is where it will run: `model.to()`
afterwards moves the fused weight and the Parameters separately (correct, but twice the memory for
those weights until disable()).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sibling nn.Linear names that read one input (Llama, Mistral, Qwen2, Qwen3 and their kin).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
BUFFER = "spotlight_fused_weight"  # the group's weights side by side, a non-persistent buffer of the parent


class _Group:
    """What a group's members share: their parent (which holds the fused weight and bias buffers), their
    output sizes, and the results not yet taken for the last input."""

    def __init__(self, owner: nn.Module, prefix: str, sizes: list[int]):
        self.owner = owner
        self.prefix = prefix
        self.sizes = sizes
        self.input: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = [None] * len(sizes)

    def run(self, x: torch.Tensor) -> None:
        weight = getattr(self.owner, f"{BUFFER}_{self.prefix}")
        bias = getattr(self.owner, f"{BUFFER}_{self.prefix}_bias", None)
        self.input = x
        self.pending = list(F.linear(x, weight, bias).split(self.sizes, dim=-1))  # [..., sum(sizes)] -> views

    def take(self, slot: int) -> torch.Tensor:
        out, self.pending[slot] = self.pending[slot], None
        if all(p is None for p in self.pending):
            self.input = None  # every member has its result: hold nothing between steps
        return out


class FusedLinear(nn.Linear):
    """A member of a fused group: the same weight and bias Parameters as the nn.Linear it replaces."""

    group: _Group
    slot: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the fused weight has no gradient path to the Parameters
        if group.input is not x or group.pending[self.slot] is None:
            group.run(x)
        return group.take(self.slot)

    @classmethod
    def member(cls, linear: nn.Linear, group: _Group, slot: int) -> "FusedLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.group, new.slot = group, slot
        return new


def _fusable(members: list) -> bool:
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in members):
        return False
    if any("forward" in vars(m) or hasattr(m, "_hf_hook") for m in members):  # accelerate's offload / device hooks
        return False
    if any(type(m.weight.data) is not torch.Tensor for m in members):  # sharded (DTensor) or quantised weights
        return False
    first = members[0].weight
    same = all(m.in_features == members[0].in_features and m.weight.dtype == first.dtype
               and m.weight.device == first.device and first.device.type != "meta" for m in members)
    return same and len({m.bias is None for m in members}) == 1


def install(decoder: nn.Module) -> list[tuple[nn.Module, list[str], list[nn.Linear]]]:
    """Fuse every group under `decoder` -> (parent, names, original modules) per fused group."""
    fused = []
    for parent in list(decoder.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None for m in members) or not _fusable(members):
                continue
            prefix = "_".join(name.split("_")[0] for name in names)  # qkv... -> "q_k_v", "gate_up"
            with torch.no_grad():
                weight = torch.cat([m.weight for m in members])  # [sum(out), in]
                bias = torch.cat([m.bias for m in members]) if members[0].bias is not None else None
            parent.register_buffer(f"{BUFFER}_{prefix}", weight, persistent=False)
            if bias is not None:
                parent.register_buffer(f"{BUFFER}_{prefix}_bias", bias, persistent=False)
            sizes = [m.out_features for m in members]
            group = _Group(parent, prefix, sizes)
            start = 0
            for slot, (name, member) in enumerate(zip(names, members)):
                rows = slice(start, start + member.out_features)
                member.weight.data = weight[rows]  # the Parameter now views the fused weight: one copy in memory
                if bias is not None:
                    member.bias.data = bias[rows]
                start += member.out_features
                setattr(parent, name, FusedLinear.member(member, group, slot))
            fused.append((parent, list(names), members))
    return fused


def uninstall(fused: list[tuple[nn.Module, list[str], list[nn.Linear]]]) -> None:
    """Put the original modules back, each Parameter with storage of its own again."""
    for parent, names, members in fused:
        for name, member in zip(names, members):
            with torch.no_grad():
                member.weight.data = member.weight.data.clone()
                if member.bias is not None:
                    member.bias.data = member.bias.data.clone()
            if isinstance(getattr(parent, name, None), FusedLinear):
                setattr(parent, name, member)
        for buffer in [b for b, _ in parent.named_buffers(recurse=False) if b.startswith(BUFFER)]:
            delattr(parent, buffer)
