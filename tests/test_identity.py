"""A hasher knows which model it was trained for (geometry + a fingerprint of the weights), and the
shipped hasher is found by what a model is, not by what it is called."""

from __future__ import annotations

import pytest
import torch

import spotlight_attn as sa
from spotlight_attn.cli.main import main
from spotlight_attn.config import HasherConfig
from spotlight_attn.errors import CheckpointError, HasherMismatchError
from spotlight_attn.hashing import load_hasher, read_header, save_hasher, shipped_hasher, stamp_identity
from spotlight_attn.identity import TOLERANCE, identity_difference, model_identity
from spotlight_attn.models import ModelGeometry

from conftest import tiny_model


def _hasher(model):
    geometry = ModelGeometry.from_model(model)
    return sa.MLPHasher(geometry, HasherConfig(bits=32, width=8), layers=range(1, geometry.num_layers))


def test_identity_samples_the_qk_projections_and_survives_a_dtype_change():
    model = tiny_model("llama", 4, 2, 16, layers=5, seed=0)
    identity = model_identity(model)
    assert identity["tensors"] == [f"layers.{i}.self_attn.{p}.weight" for i in (0, 2, 4) for p in ("q_proj", "k_proj")]
    assert len(identity["sample"]) == 6 * 64 and len(identity["digest"]) == 12
    for dtype in (torch.bfloat16, torch.float16):
        assert identity_difference(identity, model_identity(tiny_model("llama", 4, 2, 16, layers=5).to(dtype))) <= TOLERANCE
    other = model_identity(tiny_model("llama", 4, 2, 16, layers=5, seed=1))
    assert identity_difference(identity, other) > 0.5  # other weights of the same shape


def test_a_hasher_is_refused_on_other_weights_of_the_same_geometry(tmp_path):
    mine, other = tiny_model(seed=0), tiny_model(seed=1)
    path = save_hasher(_hasher(mine), tmp_path / "h.safetensors", identity=model_identity(mine))
    assert read_header(path)["identity"]["digest"] == model_identity(mine)["digest"]
    loaded = load_hasher(path, mine)
    assert loaded.identity == read_header(path)["identity"]
    load_hasher(path, mine.to(torch.bfloat16))  # the same weights in another dtype are the same model
    with pytest.raises(HasherMismatchError, match=r"trained for another model of this geometry.*identity"):
        load_hasher(path, other)
    load_hasher(path, other, check_identity=False)  # the documented way to use it anyway
    load_hasher(path, ModelGeometry.from_model(other))  # a bare geometry has no weights to compare


def test_an_identity_survives_a_load_save_round_trip_and_old_files_check_geometry_only(tmp_path):
    mine, other = tiny_model(seed=0), tiny_model(seed=1)
    first = save_hasher(_hasher(mine), tmp_path / "a.safetensors", identity=model_identity(mine))
    again = save_hasher(load_hasher(first, mine), tmp_path / "b.safetensors")
    assert read_header(again)["identity"] == read_header(first)["identity"]
    old = save_hasher(_hasher(mine), tmp_path / "old.safetensors")  # no identity recorded
    assert read_header(old)["identity"] is None
    load_hasher(old, other)
    stamp_identity(old, mine)  # record it afterwards: tensors unchanged, identity checked from now on
    with pytest.raises(HasherMismatchError, match="another model"):
        load_hasher(old, other)
    with pytest.raises(HasherMismatchError, match="num_kv_heads"):
        stamp_identity(old, tiny_model("llama", 4, 4, 16))


def test_the_trainer_records_the_models_identity_and_resume_refuses_another_model(tmp_path):
    from spotlight_attn.train import TrainConfig, train_hasher

    chunks = torch.randint(3, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(bits=32, width=8, steps=2, dense_layers=(0,), min_tokens=4, sink=1, window=2)
    model = tiny_model(layers=3)
    out = train_hasher(model, chunks, tmp_path / "h.safetensors", device="cpu",
                       progress=False, config=config)
    assert read_header(out)["identity"] == model_identity(model)
    with pytest.raises(CheckpointError, match="another model of this geometry"):
        train_hasher(tiny_model(layers=3, seed=5), chunks, out, device="cpu",
                     progress=False, config=config)


def test_no_hasher_ships_for_a_tiny_model(capsys, tiny_dir):
    assert shipped_hasher(tiny_model("llama", 4, 2, 16, layers=3)) is None
    code = main(["generate", "--model", str(tiny_dir), "--method", "spotlight", "--prompt", "the cat", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"none ships for the model '{tiny_dir}'" in err and "smollm2-135m.safetensors for SmolLM2-135M-Instruct" in err


@pytest.mark.slow
def test_the_shipped_hasher_is_found_for_the_gguf_file_the_alias_and_a_converted_folder(tmp_path, capsys):
    pytest.importorskip("gguf")
    from spotlight_attn.models import resolve_model, smollm2_gguf_path

    expected = shipped_hasher(sa.load_model("smollm2-135m")[0])
    assert expected is not None and expected.name == "smollm2-135m.safetensors"
    gguf = smollm2_gguf_path()
    assert shipped_hasher(sa.load_model(gguf)[0]) == expected
    assert shipped_hasher(sa.load_model(resolve_model("smollm2-135m"))[0]) == expected  # the cached conversion
    model, tokenizer = sa.load_model("smollm2-135m")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # a user's own conversion, in another dtype
    tokenizer.save_pretrained(tmp_path / "bf16")
    assert shipped_hasher(sa.load_model(tmp_path / "bf16")[0]) == expected

    code = main(["generate", "--model", str(gguf), "--method", "spotlight", "--budget", "0.1", "--prompt",
                 "What is the capital of France?", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Paris" in out and "method spotlight" in err
