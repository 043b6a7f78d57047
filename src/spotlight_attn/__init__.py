"""spotlight-attn: learned-hash KV cache retrieval for fast long-context decoding.

    model, tokenizer = spotlight_attn.load_model("smollm2-135m")
    spotlight_attn.enable(model, None, spotlight_attn.SpotlightConfig(method="oracle", budget=0.1))
    model.generate(...)            # unchanged transformers API
    spotlight_attn.disable(model)

The names below load on first use, so `import spotlight_attn` (and the `spotlight` CLI's --help)
does not pay for importing torch and transformers until something needs them.
"""

from importlib import import_module

__version__ = "0.1.0"
_WHERE = {
    "HasherConfig": "spotlight_attn.config",
    "SpotlightConfig": "spotlight_attn.config",
    "LinearHasher": "spotlight_attn.hashing",
    "MLPHasher": "spotlight_attn.hashing",
    "load_hasher": "spotlight_attn.hashing",
    "save_hasher": "spotlight_attn.hashing",
    "shipped_hasher": "spotlight_attn.hashing",
    "disable": "spotlight_attn.attention",
    "enable": "spotlight_attn.attention",
    "index_cache": "spotlight_attn.attention",
    "teacher_forcing": "spotlight_attn.attention",
    "load_model": "spotlight_attn.models",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'spotlight_attn' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
