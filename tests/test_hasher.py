"""Hashers (placement, soft vs hard codes) and their checkpoints (round trip, validation, atomic writes)."""

import json
import os

import pytest
import torch

from spotlight_attn.config import HasherConfig
from spotlight_attn.errors import CheckpointError, HasherMismatchError, SpotlightError
from spotlight_attn.hashing import LinearHasher, MLPHasher, load_hasher, read_header, save_hasher
from spotlight_attn.kernels.pack import pack_signs, unpack_bits
from spotlight_attn.models import ModelGeometry


def geometry(q=6, kv=2, d=16, layers=4, family="llama"):
    return ModelGeometry(family, layers, q, kv, d, 10000.0, 1024)


def test_shared_placement_uses_the_kv_heads_hash_for_its_queries():
    geo = geometry(q=6, kv=2)
    hasher = MLPHasher(geo, HasherConfig(bits=64, width=8, init_scale=0.5), layers=[1, 3])
    q = torch.randn(2, 6, 3, 16)
    codes = hasher.query_codes(3, q)
    assert codes.shape == (2, 6, 3, 2)
    for j in range(6):  # query head j belongs to KV head j // 3
        as_key = hasher.key_codes(3, q[:, [j]].expand(2, 2, 3, 16).contiguous())[:, j // 3]
        assert torch.equal(codes[:, j], as_key)


def test_asymmetric_placement_has_a_query_hash_per_query_head():
    hasher = MLPHasher(geometry(), HasherConfig(bits=32, width=8, placement="asymmetric"), layers=[0])
    assert hasher.banks["q0"].proj.shape == (6, 16, 32) and hasher.banks["k0"].proj.shape == (2, 16, 32)
    q = torch.randn(1, 6, 1, 16)
    assert torch.equal(hasher.query_codes(0, q), pack_signs(hasher.banks["q0"](q)))


def _bank_reference(bank, x):
    """The bank head by head: x [B, n, S, D] -> [B, n, S, bits]."""
    out = []
    for h in range(x.shape[1]):
        y = x[:, h].float()
        for i in range(bank.w1.shape[0]):
            y = y + torch.nn.functional.silu(y @ bank.w1[i, h] + bank.b1[i, h]) @ bank.w2[i, h] + bank.b2[i, h]
        out.append(y @ bank.proj[h])
    return torch.stack(out, 1)


@pytest.mark.parametrize("batch,s", [(1, 1), (3, 5)])
def test_the_bank_equals_its_per_head_reference(batch, s):
    hasher = MLPHasher(geometry(q=6, kv=2), HasherConfig(bits=64, width=8, depth=2, init_scale=0.5), layers=[1])
    bank = hasher.banks["k1"]
    with torch.no_grad():
        for p in (bank.b1, bank.b2):
            p.normal_()
        x = torch.randn(batch, 2, s, 16)
        assert torch.allclose(bank(x), _bank_reference(bank, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("placement,group", [("shared", 3), ("shared", 1), ("asymmetric", 3)])
def test_step_codes_equal_query_and_key_codes(placement, group):
    """A decode step hashes its queries and new keys in one pass: the codes of the two separate calls."""
    geo = geometry(q=2 * group, kv=2)
    for hasher in (MLPHasher(geo, HasherConfig(bits=96, width=8, init_scale=0.5, placement=placement), layers=[2]),
                   LinearHasher(geo, bits=96, layers=[2])):
        q, k = torch.randn(3, 2 * group, 1, 16), torch.randn(3, 2, 1, 16)
        q_codes, k_codes = hasher.step_codes(2, q, k)
        assert q_codes.shape == (3, 2 * group, 1, 3) and k_codes.shape == (3, 2, 1, 3)
        assert torch.equal(q_codes, hasher.query_codes(2, q)) and torch.equal(k_codes, hasher.key_codes(2, k))


def test_soft_codes_are_a_smooth_sign_of_the_hard_codes():
    hasher = MLPHasher(geometry(), HasherConfig(bits=64, width=8), layers=[0])
    k = torch.randn(1, 2, 9, 16)
    soft = hasher.soft_keys(0, k, gain=64.0)
    assert soft.abs().max() < 1
    assert torch.equal(unpack_bits(hasher.key_codes(0, k), 64), soft > 0)


def test_untrained_mlp_hasher_is_close_to_simhash():
    hasher = MLPHasher(geometry(), HasherConfig(bits=128, width=8, init_scale=1e-6), layers=[0])
    k = torch.randn(1, 2, 50, 16)
    linear = pack_signs(k @ hasher.banks["k0"].proj)
    assert torch.equal(hasher.key_codes(0, k), linear)


def test_linear_hasher_is_seeded_and_takes_any_width():
    a, b = LinearHasher(geometry(), bits=100, seed=3), LinearHasher(geometry(), bits=100, seed=3)
    c = LinearHasher(geometry(), bits=100, seed=4)
    k = torch.randn(1, 2, 7, 16)
    assert torch.equal(a.key_codes(2, k), b.key_codes(2, k))
    assert not torch.equal(a.key_codes(2, k), c.key_codes(2, k))
    assert a.key_codes(2, k).shape == (1, 2, 7, 4)


def test_config_refuses_bad_bits_and_placement():
    with pytest.raises(SpotlightError, match="bits"):
        HasherConfig(bits=100)
    with pytest.raises(SpotlightError, match="bits"):
        HasherConfig(bits=512)
    with pytest.raises(SpotlightError, match="placement"):
        HasherConfig(placement="sideways")


@pytest.mark.parametrize("placement", ["shared", "asymmetric"])
def test_save_load_round_trip_is_bit_exact(tmp_path, placement):
    geo = geometry()
    hasher = MLPHasher(geo, HasherConfig(bits=96, depth=3, width=12, placement=placement), layers=[2, 3], seed=7)
    path = save_hasher(hasher, tmp_path / "h.safetensors", training={"steps": 5})
    loaded = load_hasher(path, geo)
    for name, tensor in hasher.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    k, q = torch.randn(2, 2, 11, 16), torch.randn(2, 6, 1, 16)
    assert torch.equal(hasher.key_codes(3, k), loaded.key_codes(3, k))
    assert torch.equal(hasher.query_codes(2, q), loaded.query_codes(2, q))
    assert loaded.layers == (2, 3) and loaded.training_info == {"steps": 5}
    assert read_header(path)["hasher"]["placement"] == placement


def test_linear_hasher_round_trip(tmp_path):
    hasher = LinearHasher(geometry(), bits=40, seed=9, layers=[1])
    loaded = load_hasher(save_hasher(hasher, tmp_path / "lin.safetensors"), geometry())
    k = torch.randn(1, 2, 5, 16)
    assert isinstance(loaded, LinearHasher) and torch.equal(hasher.key_codes(1, k), loaded.key_codes(1, k))


@pytest.mark.parametrize(
    "other,field",
    [
        (geometry(q=4, kv=2), "num_q_heads"),
        (geometry(kv=3), "num_kv_heads"),
        (geometry(d=32), "head_dim"),
        (geometry(layers=5), "num_layers"),
        (geometry(family="qwen2"), "family"),
    ],
)
def test_loading_onto_the_wrong_model_names_the_field(tmp_path, other, field):
    path = save_hasher(MLPHasher(geometry(), HasherConfig(bits=32, width=4), layers=[0]), tmp_path / "h.safetensors")
    with pytest.raises(HasherMismatchError, match=field):
        load_hasher(path, other)


def test_truncated_missing_and_foreign_files_fail_cleanly(tmp_path):
    path = save_hasher(MLPHasher(geometry(), HasherConfig(bits=32, width=4), layers=[0]), tmp_path / "h.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 40, 4):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_hasher(truncated, geometry())
    with pytest.raises(CheckpointError, match="not found"):
        load_hasher(tmp_path / "nope.safetensors", geometry())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a spotlight-attn hasher"):
        load_hasher(tmp_path / "other.safetensors", geometry())


def test_corrupt_header_field_is_named(tmp_path):
    from safetensors.torch import save_file

    hasher = MLPHasher(geometry(), HasherConfig(bits=32, width=4), layers=[0])
    meta = {"format": "spotlight-attn/hasher", "format_version": "1", "kind": "mlp", "model": "{broken",
            "hasher": json.dumps(hasher.config.to_dict()), "layers": "[0]", "training": "{}"}
    save_file({k: v.contiguous() for k, v in hasher.state_dict().items()}, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="'model'"):
        load_hasher(tmp_path / "c.safetensors", geometry())


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    hasher = MLPHasher(geometry(), HasherConfig(bits=32, width=4), layers=[0])
    path = save_hasher(hasher, tmp_path / "h.safetensors")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("spotlight_attn.hashing.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        save_hasher(MLPHasher(geometry(), HasherConfig(bits=64, width=4), layers=[0]), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["h.safetensors"]  # no temp file left behind


def test_shipped_smollm2_hasher_loads_and_is_small():
    """The hasher inside the package: SmolLM2-135M geometry, 128 bits, layers 1-29 (so it also serves one dense layer), under 5 MB, header intact."""
    from pathlib import Path

    import spotlight_attn

    path = Path(spotlight_attn.__file__).parent / "assets" / "smollm2-135m.safetensors"
    assert path.stat().st_size < 5 * 2**20
    geometry = ModelGeometry("llama", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_positions=8192)
    hasher = load_hasher(path, geometry)
    assert hasher.bits == 128 and hasher.layers == tuple(range(1, 30))
    assert read_header(path)["training"]["finished_layers"] == list(range(1, 30))
    assert read_header(path)["identity"]["tensors"][0] == "layers.0.self_attn.q_proj.weight"  # found by what a model is
    codes = hasher.key_codes(5, torch.randn(1, 3, 7, 64))
    assert codes.shape == (1, 3, 7, 4) and codes.dtype == torch.int32
