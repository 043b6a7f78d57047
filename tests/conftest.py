"""Shared fixtures: tiny random models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),  # q/k RMS norms inside attention
}


def tiny_model(family: str = "llama", q_heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 3, seed: int = 0):
    """A random decoder of the given family and attention geometry, fp32, eval mode, on the CPU."""
    config_cls, model_cls = FAMILIES[family]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2", "qwen3") else {}
    config = config_cls(
        vocab_size=128,
        hidden_size=q_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, so lengths line up
    # Larger-than-default weights give peaky attention, so selection choices change the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return model


@pytest.fixture
def make_tiny_model():
    return tiny_model


SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3: the tiny model's pad, eos, bos
WORDS = "the cat sat on a mat and dog ran to red blue house tree sun moon what is colour of".split()


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer of exactly `vocab_size` ids (fillers pad the vocab), with a chat template."""
    names = SPECIALS + WORDS + [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    return tokenizer


def padded_prompts(batch=2, length=40, pad=(0, 9), seed=0):
    """Random ids [batch, length] and their mask, row i left-padded by pad[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pad[:batch]):
        ids[i, :p], mask[i, :p] = 0, 0
    return ids, mask


def hasher_for(model, method, bits=64):
    """An untrained learned hasher over layers 2.. for method 'spotlight'; None for the others."""
    from spotlight_attn import MLPHasher
    from spotlight_attn.config import HasherConfig
    from spotlight_attn.models import ModelGeometry

    if method != "spotlight":
        return None
    geo = ModelGeometry.from_model(model)
    return MLPHasher(geo, HasherConfig(bits=bits, width=16, init_scale=0.3), layers=range(2, geo.num_layers))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", q_heads=4, kv_heads=2, head_dim=16, layers=3)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real SmolLM2-135M model")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
