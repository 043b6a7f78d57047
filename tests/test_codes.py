"""Packed codes and Hamming scores against brute force (integer results must match exactly)."""

import pytest
import torch

from spotlight_attn.kernels.pack import num_words, pack_signs, popcount, unpack_bits
from spotlight_attn.kernels.score_select import hamming_scores


@pytest.mark.parametrize("bits", [1, 31, 32, 33, 64, 100, 128, 256])
def test_pack_layout_and_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    hashed = torch.randn(3, 5, bits, generator=g)
    codes = pack_signs(hashed)
    assert codes.dtype == torch.int32 and codes.shape == (3, 5, num_words(bits))
    assert torch.equal(unpack_bits(codes, bits), hashed > 0)
    # bit i sits in word i // 32 at position i % 32; bits past `bits` are zero
    i = bits - 1
    word = (codes[..., i // 32].to(torch.int64) >> (i % 32)) & 1
    assert torch.equal(word.bool(), hashed[..., i] > 0)
    padded = unpack_bits(codes, num_words(bits) * 32)[..., bits:]
    assert not padded.any()


def test_popcount_matches_python():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (50, 4), generator=g, dtype=torch.int64).to(torch.int32)
    expected = [sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in row) for row in words]
    assert popcount(words).tolist() == expected


@pytest.mark.parametrize("group,words,length", [(1, 1, 1), (3, 2, 97), (4, 4, 33), (8, 1, 5)])
def test_hamming_scores_brute_force(group, words, length):
    g = torch.Generator().manual_seed(group * 100 + length)
    b, hkv, bits = 2, 2, words * 32
    q_bits = torch.rand(b, hkv * group, 1, bits, generator=g) > 0.5
    k_bits = torch.rand(b, hkv, length, bits, generator=g) > 0.5
    q_codes, k_codes = pack_signs(q_bits.float() - 0.5), pack_signs(k_bits.float() - 0.5)
    scores = hamming_scores(q_codes, k_codes, bits)
    expected = torch.zeros(b, hkv, length, dtype=torch.int32)
    for bi in range(b):
        for h in range(hkv):
            for j in range(group):
                agree = (q_bits[bi, h * group + j, 0][None, :] == k_bits[bi, h]).sum(-1)
                expected[bi, h] += agree.to(torch.int32)
    assert torch.equal(scores, expected)
    assert scores.min() >= 0 and scores.max() <= group * bits
