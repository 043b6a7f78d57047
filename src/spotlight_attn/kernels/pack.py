"""pack: hash outputs -> int32 code words, and the popcount that scores them.

Bit i of a b-bit code lives in word i // 32 at bit position i % 32 (LSB first). Bits past b in the
last word are zero for queries and keys alike, so they never change an agreement count.
"""

from __future__ import annotations

import torch

_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def num_words(bits: int) -> int:
    return (bits + 31) // 32


def pack_signs_reference(hashed: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference. hashed [..., b] float -> codes [..., ceil(b/32)] int32, bit = hashed > 0."""
    *lead, bits = hashed.shape
    words = num_words(bits)
    signs = (hashed > 0).to(torch.int64)
    signs = torch.nn.functional.pad(signs, (0, words * 32 - bits))  # [..., W*32]
    signs = signs.view(*lead, words, 32)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=hashed.device), torch.arange(32, device=hashed.device)
    )
    packed = (signs * weights).sum(-1)  # [..., W] in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # same bit pattern as int32
    return packed.to(torch.int32)


def pack_signs(hashed: torch.Tensor) -> torch.Tensor:
    """hashed [..., b] float -> packed codes [..., ceil(b/32)] int32 (bit set where hashed > 0)."""
    return pack_signs_reference(hashed)


def unpack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., W] int32 -> [..., bits] bool. The inverse of pack_signs (for tests and debugging)."""
    shifts = torch.arange(32, device=codes.device, dtype=torch.int32)
    unpacked = torch.bitwise_and(torch.bitwise_right_shift(codes.unsqueeze(-1), shifts), 1)  # [..., W, 32]
    return unpacked.flatten(-2)[..., :bits].bool()


def popcount(words: torch.Tensor) -> torch.Tensor:
    """words [..., W] int32 -> [...] int32: set bits summed over the last dim."""
    as_bytes = words.contiguous().view(torch.uint8)  # [..., 4W]
    table = _BYTE_POPCOUNT.to(words.device)
    return table[as_bytes.long()].sum(-1, dtype=torch.int32)
