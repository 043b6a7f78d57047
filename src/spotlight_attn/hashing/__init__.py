"""Learned (MLPHasher) and random (LinearHasher) hashes, and their checkpoints."""

from spotlight_attn.hashing.checkpoint import load_hasher, read_header, save_hasher
from spotlight_attn.hashing.hasher import HeadBank, LinearHasher, MLPHasher, soft_sign

__all__ = ["HeadBank", "LinearHasher", "MLPHasher", "load_hasher", "read_header", "save_hasher", "soft_sign"]
