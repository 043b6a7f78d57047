"""spotlight-attn: learned-hash KV cache retrieval for fast long-context decoding.

    model, tokenizer = spotlight_attn.load_model("smollm2-135m")
    spotlight_attn.enable(model, None, spotlight_attn.SpotlightConfig(method="oracle", budget=0.1))
    model.generate(...)            # unchanged transformers API
    spotlight_attn.disable(model)
"""

from spotlight_attn.attention import disable, enable, index_cache, teacher_forcing
from spotlight_attn.config import HasherConfig, SpotlightConfig
from spotlight_attn.hashing import LinearHasher, MLPHasher, load_hasher, save_hasher
from spotlight_attn.models import load_model

__version__ = "0.1.0"
__all__ = [
    "HasherConfig",
    "LinearHasher",
    "MLPHasher",
    "SpotlightConfig",
    "disable",
    "enable",
    "index_cache",
    "load_hasher",
    "load_model",
    "save_hasher",
    "teacher_forcing",
]
