"""Tensor-parallel generate(): 2 gloo ranks on the CPU give the tokens of one process.

Each rank loads a tiny random model with transformers' tensor parallelism (`tp_plan="auto"`: the
q/k/v projections sharded by heads), enables every method, and decodes greedily through
generate(); each rank hashes, keeps codes for and selects over its own KV heads. The tokens must
equal a one-process run's, method by method (SimHash's projections and a learned hasher's banks
are the one-process ones, sliced per rank). A geometry whose heads do not divide by the world size
is refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_model

NEW = 6
RUNS = [  # (label, method, placement of a learned hasher, cache)
    ("dense", "dense", None, "dynamic"),
    ("oracle", "oracle", None, "dynamic"),
    ("linear", "linear", None, "dynamic"),
    ("linear-static", "linear", None, "static"),
    ("quest", "quest", None, "dynamic"),
    ("streaming", "streaming", None, "dynamic"),
    ("spotlight-shared", "spotlight", "shared", "dynamic"),
    ("spotlight-asymmetric", "spotlight", "asymmetric", "static"),
]


def _inputs():
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding on one row
    return ids, mask


def _decode_all(model, folder: Path) -> dict:
    import spotlight_attn as sa
    from spotlight_attn.config import SpotlightConfig
    from spotlight_attn.hashing import load_hasher

    ids, mask = _inputs()
    out = {}
    for label, method, placement, cache in RUNS:
        hasher = load_hasher(folder / f"{placement}.safetensors", model) if placement else None
        sa.enable(model, hasher, SpotlightConfig(method=method, budget=0.25, bits=64, min_tokens=2, sink=1, window=2,
                                                 dense_layers=(0,), cache=cache))
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        out[label] = tokens[:, ids.shape[1]:].tolist()
        sa.disable(model)
    return out


def _worker(rank: int, world: int, folder: str):
    from transformers import AutoModelForCausalLM

    from spotlight_attn.errors import UnsupportedModelError
    from spotlight_attn.models import ModelGeometry

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'init'}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder / "model", tp_plan="auto", dtype=torch.float32)
        result = _decode_all(model, folder)
        try:  # a geometry whose KV heads do not divide by the world size
            ModelGeometry("llama", 3, 6, 3, 16, 10000.0, 1024).shard(world)
        except UnsupportedModelError as error:
            result["refusal"] = str(error)
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_generate_equals_one_process(tmp_path):
    from spotlight_attn.config import HasherConfig
    from spotlight_attn.hashing import MLPHasher, save_hasher
    from spotlight_attn.identity import model_identity
    from spotlight_attn.models import ModelGeometry

    model = tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3, seed=4)
    model.save_pretrained(tmp_path / "model")
    geometry = ModelGeometry.from_model(model)
    for placement in ("shared", "asymmetric"):
        hasher = MLPHasher(geometry, HasherConfig(bits=64, width=16, init_scale=0.5, placement=placement), layers=[1, 2], seed=3)
        save_hasher(hasher, tmp_path / f"{placement}.safetensors", identity=model_identity(model))
    want = _decode_all(model, tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "num_kv_heads (3) does not divide by the tensor-parallel world size 2" in got.pop("refusal")
        assert got == want, f"rank {rank}"
    assert len({json.dumps(v) for v in want.values()}) > 2  # the methods really decode differently


def test_a_hasher_shards_into_its_heads():
    from spotlight_attn.config import HasherConfig
    from spotlight_attn.hashing import LinearHasher, MLPHasher
    from spotlight_attn.models import ModelGeometry

    geometry = ModelGeometry("llama", 3, 8, 4, 16, 10000.0, 1024)
    q = torch.randn(2, 8, 1, 16)
    k = torch.randn(2, 4, 5, 16)
    for hasher in (LinearHasher(geometry, bits=64, layers=[1]),
                   MLPHasher(geometry, HasherConfig(bits=64, width=16, init_scale=0.5, placement="asymmetric"), layers=[1])):
        whole_q, whole_k = hasher.query_codes(1, q), hasher.key_codes(1, k)
        for rank in range(2):
            part = hasher.shard(rank, 2)
            assert part.geometry.num_kv_heads == 2 and part.geometry.num_q_heads == 4
            assert torch.equal(part.key_codes(1, k[:, 2 * rank : 2 * rank + 2]), whole_k[:, 2 * rank : 2 * rank + 2])
            assert torch.equal(part.query_codes(1, q[:, 4 * rank : 4 * rank + 4]), whole_q[:, 4 * rank : 4 * rank + 4])
        assert hasher.geometry.num_kv_heads == 4  # the original is left whole
    with pytest.raises(Exception, match="does not divide by the tensor-parallel world size 3"):
        LinearHasher(geometry, bits=64, layers=[1]).shard(0, 3)
