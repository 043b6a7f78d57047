"""SpotlightConfig(fuse_projections=True), the default: q/k/v and gate/up each as one GEMM (fused_projections.py).

On tiny random models, on the CPU: the same tokens as without fusion (logits within fp32 rounding of
a GEMM split differently), eager and compiled by generate() with fullgraph=True; the Parameters
stay the same objects and become views of one fused weight (no second copy); disable() gives them
storage of their own back; a member's result never depends on the order the model calls them in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import spotlight_attn as sa
from spotlight_attn import compat, fused_projections
from spotlight_attn.config import SpotlightConfig
from spotlight_attn.errors import SpotlightError
from spotlight_attn.fused_projections import BUFFER, FusedLinear

from conftest import tiny_model


def prompts(lengths=(13, 9), seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, s - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, s - n :] = 1
    return ids, mask


def run(model, ids, mask, new=5, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).float(), compat.output_cache(out)


def close(a, b, tol=1e-5):
    return float((a - b).norm() / b.norm()) < tol


def storages(model) -> int:
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    seen.update({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()})
    return sum(seen.values())


@pytest.mark.parametrize("family,hq,hkv", [("llama", 4, 2), ("qwen2", 6, 2), ("qwen3", 4, 1)])  # qwen2: q/k/v biases
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_same_tokens_as_unfused(family, hq, hkv, cache):
    model = tiny_model(family, hq, hkv, 16, layers=3)
    ids, mask = prompts()
    base = dict(method="linear", budget=6, bits=64, min_tokens=2, sink=1, window=1, dense_layers=(0,), cache=cache)
    sa.enable(model, None, SpotlightConfig(**base, fuse_projections=False))
    want, want_logits, _ = run(model, ids, mask)
    sa.enable(model, None, SpotlightConfig(**base, fuse_projections=True))
    groups = model.spotlight.fused
    assert len(groups) == 2 * 3  # attention and MLP of each layer
    tokens, logits, _ = run(model, ids, mask)
    assert torch.equal(tokens, want) and close(logits, want_logits)
    assert all(getattr(parent, names[0]).group.input is None for parent, names, _ in groups)  # nothing held between steps
    sa.disable(model)


def test_parameters_view_one_weight_and_come_back(tmp_path):
    model = tiny_model("qwen2", 6, 2, 16, layers=2)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    nbytes = storages(model)
    sa.enable(model, None, SpotlightConfig(method="dense", fuse_projections=True, cache="dynamic"))
    attn = model.model.layers[0].self_attn
    fused = getattr(attn, f"{BUFFER}_q_k_v")
    assert isinstance(attn.q_proj, FusedLinear) and isinstance(model.model.layers[1].mlp.up_proj, FusedLinear)
    assert not isinstance(attn.o_proj, FusedLinear) and not isinstance(model.model.layers[0].mlp.down_proj, FusedLinear)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # views of it
    assert set(model.state_dict()) == set(state)  # the fused buffers are not persistent
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert storages(model) == nbytes  # no weight held twice
    model.save_pretrained(tmp_path)  # views of one buffer save as ordinary tensors
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    sa.disable(model)
    assert all(m is originals[n] for n, m in model.named_modules() if n in originals)
    assert not any(b.startswith(BUFFER) for b, _ in model.named_buffers())
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()  # storage of their own again
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_any_call_order_gives_each_member_its_own_product():
    model = tiny_model("llama", 4, 2, 16, layers=1)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    want = {name: getattr(attn, name)(t) for name in ("q_proj", "k_proj", "v_proj") for t in (x,)}
    want_y = attn.v_proj(y)
    fused = fused_projections.install(model.model)
    with torch.no_grad():
        assert close(attn.k_proj(x), want["k_proj"], 1e-6)  # k first: runs the group's GEMM
        assert close(attn.k_proj(x), want["k_proj"], 1e-6)  # k again with the same input: its own product
        assert close(attn.v_proj(y), want_y, 1e-6)  # another input before q and v took theirs
        assert close(attn.q_proj(x), want["q_proj"], 1e-6)
        assert close(attn.v_proj(x), want["v_proj"], 1e-6)
    fused_projections.uninstall(fused)


def test_training_takes_each_members_own_weight():
    model = tiny_model("llama", 4, 2, 16, layers=1).train()
    fused = fused_projections.install(model.model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 64)
    (attn.q_proj(x).sum() + attn.k_proj(x).sum()).backward()
    assert attn.q_proj.weight.grad is not None and attn.k_proj.weight.grad is not None
    fused_projections.uninstall(fused)


def test_hooked_or_mismatched_groups_stay_apart():
    model = tiny_model("llama", 4, 2, 16, layers=2)
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: None)
    gate = model.model.layers[0].mlp.gate_proj
    gate.forward = gate.forward  # an instance-level forward, as accelerate's offload hooks install
    assert "forward" in vars(gate)
    layer1 = model.model.layers[1].mlp
    layer1.up_proj = nn.Linear(layer1.up_proj.in_features, layer1.up_proj.out_features, bias=True)  # gate has none
    fused = fused_projections.install(model.model)
    kinds = {(type(p).__name__, names[0]) for p, names, _ in fused}
    assert len(fused) == 1 and kinds == {("LlamaAttention", "q_proj")}  # layer 1's attention alone
    assert fused[0][0] is model.model.layers[1].self_attn
    assert not isinstance(model.model.layers[0].self_attn.q_proj, FusedLinear)
    fused_projections.uninstall(fused)


def test_compiled_with_fullgraph_equals_eager():
    """generate()'s own compilation (forced on the CPU), fullgraph=True: the group's hand-off between
    members traces without a graph break."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    model = tiny_model("llama", 4, 2, 16, layers=2, seed=3)
    ids, mask = prompts(lengths=(12, 9))
    sa.enable(model, None, SpotlightConfig(method="linear", budget=4, bits=64, min_tokens=2, sink=1, window=1,
                                           dense_layers=(0,), cache="static", fuse_projections=True))
    want, want_logits, _ = run(model, ids, mask, new=4)
    compile_config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
    compile_config._compile_all_devices = True
    tokens, logits, _ = run(model, ids, mask, new=4, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(tokens, want) and close(logits, want_logits, 1e-4)
    sa.disable(model)
    torch._dynamo.reset()


def test_fuse_projections_must_be_a_bool():
    with pytest.raises(SpotlightError, match="fuse_projections"):
        SpotlightConfig(fuse_projections="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_fused_equals_unfused():
    """On CUDA generate() compiles and graph-captures the step (reduce-overhead): the fused buffers
    are static inputs of the captured graph, and the tokens match the unfused step's."""
    torch._dynamo.reset()
    model = tiny_model("llama", 8, 2, 64, layers=3, seed=4).cuda()
    ids, mask = (t.cuda() for t in prompts(lengths=(300, 257, 64), seed=5))
    base = dict(method="linear", budget=7, bits=128, sink=1, window=2, min_tokens=3, dense_layers=(0,))
    sa.enable(model, None, SpotlightConfig(**base, fuse_projections=False))
    want, want_logits, _ = run(model, ids, mask, new=8)
    torch._dynamo.reset()
    sa.enable(model, None, SpotlightConfig(**base))
    for _ in range(2):  # the second call replays the captured graphs
        tokens, logits, _ = run(model, ids, mask, new=8)
        assert hasattr(model, "_compiled_call")
        assert torch.equal(tokens, want) and close(logits, want_logits, 1e-3)
    sa.disable(model)
    torch._dynamo.reset()
