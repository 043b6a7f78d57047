"""Learned (MLPHasher) and random (LinearHasher) hashes, their checkpoints, and the shipped ones."""

from spotlight_attn.hashing.checkpoint import load_hasher, read_header, save_hasher, stamp_identity
from spotlight_attn.hashing.hasher import HeadBank, LinearHasher, MLPHasher, soft_sign
from spotlight_attn.hashing.shipped import shipped_hasher

__all__ = [
    "HeadBank",
    "LinearHasher",
    "MLPHasher",
    "load_hasher",
    "read_header",
    "save_hasher",
    "shipped_hasher",
    "soft_sign",
    "stamp_identity",
]
