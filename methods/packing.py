"""The int32 bit layout of packed N-bit codes (EfficientQAT / GPTQ "v2"), on its own: no quantizer, no model.

Each int32 word holds ``32 // N`` codes, least significant bits first: 16 at 2-bit, 8 at 4-bit, 4 at 8-bit,
and **10 at 3-bit** (2 bits unused). The 3-bit layout is EfficientQAT's own, *not* GPTQ's 3-bit layout (which
spreads codes over word boundaries), so 3-bit folders load only through ``effitrain.methods.gptq_format``.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}.")


def codes_per_word(bits: int) -> int:
    """How many N-bit codes one int32 word holds (3-bit: 10, leaving 2 bits unused)."""
    check_bits(bits)
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^N - 1] along dim 0 into int32 words, least significant bits first.

    codes [n, m] -> int32 [ceil(n / (32 // N)), m]; code j of word k sits at bits [N*j, N*j + N).
    """
    per_word = codes_per_word(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing.")
    n = codes.shape[0]
    n_words = math.ceil(n / per_word)
    padded = torch.zeros((n_words * per_word, *codes.shape[1:]), dtype=torch.int64, device=codes.device)
    padded[:n] = codes.to(torch.int64)
    padded = padded.reshape(n_words, per_word, *codes.shape[1:])
    shifts = torch.arange(per_word, device=codes.device) * bits
    shifts = shifts.view(1, per_word, *([1] * (codes.dim() - 1)))
    words = (padded << shifts).sum(dim=1)  # disjoint bit fields: the sum is a bitwise or, < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [ceil(n / (32 // N)), m] -> int64 codes [n, m]."""
    per_word = codes_per_word(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=packed.device) * bits
    shifts = shifts.view(1, per_word, *([1] * (packed.dim() - 1)))
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, *packed.shape[1:])[:n]

