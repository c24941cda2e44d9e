"""Weight-only uniform asymmetric group quantization with learnable step sizes and zero points, and the
fake-quantized and packed Linear layers of EfficientQAT (Chen et al., "EfficientQAT: Efficient
Quantization-Aware Training for Large Language Models", arXiv 2407.11062; official code OpenGVLab/EfficientQAT).

Quantizer (Sec. 3.2, Eq. 1-2; App. B), per group of ``g`` input channels of a Linear weight ``w``:

    init    s = clamp((max - min) / (2^N - 1), 1e-4, 1e4),  z = round(-clamp(min / s, -1e4, 1e4))
    forward s' = clamp_ste(s),  z' = clamp_ste(round_ste(z), 0, 2^N - 1)
            q  = clamp(round_ste(w / s') + z', 0, 2^N - 1)          (a hard clamp: no gradient when clipped)
            w^ = (q - z') * s'

Storage of ``QuantLinear`` (per Linear, GPTQ "v2" tensor names; zero points without GPTQ v1's ``z - 1``
offset): ``qweight`` int32 [ceil(in / (32 // N)), out] and ``qzeros`` int32 [in / g, ceil(out / (32 // N))]
packed as in ``effitrain.methods.packing``, ``scales`` fp16 [in / g, out], ``g_idx`` int32 [in] = i // g, an
optional ``bias``. Average bits per weight: N + (N+16)/g. Model surgery (which Linears, RTN) is in
``effitrain.methods.quant_surgery``; Hugging Face save/load in ``effitrain.methods.gptq_format``.

Dequantization (what ``QuantLinear`` runs on any device): ``W[in, out] = (q - z[g_idx]) * s[g_idx]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from effitrain.methods.packing import SUPPORTED_BITS, check_bits, codes_per_word, pack_codes, unpack_codes
from torch import nn

__all__ = ["SUPPORTED_BITS", "SCALE_MIN", "SCALE_MAX", "average_bits", "round_ste", "clamp_ste",
           "resolve_group_size", "init_scale_zero", "fake_quantize", "integer_codes", "FakeQuantLinear",
           "QuantLinear"]

SCALE_MIN, SCALE_MAX = 1e-4, 1e4


def average_bits(bits: int, group_size: int) -> float:
    """Bits per weight of the packed format: N-bit codes, an N-bit zero point and an fp16 step per group."""
    return bits + (bits + 16) / group_size


# ----------------------------------------------------------------------------------------------------------
# Straight-through estimators and the fake quantizer (Eq. 1-2)
# ----------------------------------------------------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp(x) in the forward pass, identity gradient in the backward pass."""
    return (x.clamp(low, high) - x).detach() + x


def _group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in/g, g]: groups of g consecutive input channels of each output row."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; choose a divisor "
            f"(or group_size=-1 for one group per row)."
        )
    return weight.reshape(out_features, in_features // group_size, group_size)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """-1 (or 0) means one group spanning the whole input dimension."""
    return in_features if group_size <= 0 else group_size


@torch.no_grad()
def init_scale_zero(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (round-to-nearest) init of the step size s and zero point z, both [out, in/g] float32.

    Never clips: every weight of the group lies in [(0 - z) s, (2^N - 1 - z) s] up to s/2.
    """
    check_bits(bits)
    groups = _group_view(weight.detach().float(), group_size)
    w_min, w_max = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((w_max - w_min) / (2**bits - 1)).clamp(SCALE_MIN, SCALE_MAX)
    zero = (-(w_min / scale).clamp(-1e4, 1e4)).round()
    return scale, zero


def fake_quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """w^ = (clamp(round_ste(w/s') + z', 0, 2^N-1) - z') * s', with s' and z' as in the module docstring.

    Gradients (App. B): inside the range dw^/ds = round(w/s) - w/s, dw^/dz = 0, dw^/dw = 1; where the code is
    clipped to a bound q_b: dw^/ds = q_b - z, dw^/dz = -s (i.e. -1 in units of the step), dw^/dw = 0.
    """
    q_max = 2**bits - 1
    s = clamp_ste(scale, SCALE_MIN, SCALE_MAX).unsqueeze(-1)
    z = clamp_ste(round_ste(zero), 0, q_max).unsqueeze(-1)
    groups = _group_view(weight, group_size)
    q = (round_ste(groups / s) + z).clamp(0, q_max)
    return ((q - z) * s).reshape(weight.shape)


@torch.no_grad()
def integer_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The storable (codes [out, in] int, zeros [out, in/g] int, scales [out, in/g] fp16) of a weight.

    The step size is rounded to fp16 first (that is what is stored) and the codes are computed with it, so
    that dequantizing the stored tensors gives exactly the fake-quantized weight with the stored step.
    The zero point is clamped to [0, 2^N - 1]: a learned one outside the range would otherwise wrap around
    in the unsigned packing and corrupt its neighbours (a pitfall of the official ``pack()``).
    """
    q_max = 2**bits - 1
    s16 = scale.detach().clamp(SCALE_MIN, SCALE_MAX).half()
    s = s16.float().unsqueeze(-1)
    z = zero.detach().round().clamp(0, q_max)
    groups = _group_view(weight.detach().float(), group_size)
    q = (torch.round(groups / s) + z.unsqueeze(-1)).clamp(0, q_max)
    return q.reshape(weight.shape).to(torch.int32), z.to(torch.int32), s16



# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Module):
    """A Linear whose weight is fake-quantized with learnable step size and zero point (Block-AP's layer).

    ``weight`` (the original Linear's parameter), ``scale`` and ``zero_point`` ([out, in/g]) are trainable;
    the bias, if any, is a frozen buffer as in the official code.

    Args:
        linear: the full-precision layer to wrap; its weight tensor is reused, not copied.
        bits: code width N in {2, 3, 4, 8}.
        group_size: input channels per group (-1: the whole row).
        mask: an optional fixed keep-mask [out, in] (a pruned model's nonzeros): the layer quantizes W ⊙ mask,
            so every pruned weight gets its group's zero point as code and dequantizes to exactly 0, and
            receives no gradient (sparse + low-bit, ``effitrain.methods.composition``).
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        check_bits(bits)
        self.bits = bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = resolve_group_size(group_size, linear.in_features)
        self.weight = linear.weight
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("mask", None if mask is None else mask.to(linear.weight.device, linear.weight.dtype))
        scale, zero = init_scale_zero(self.masked_weight(), bits, self.group_size)
        self.scale = nn.Parameter(scale.to(linear.weight.device))
        self.zero_point = nn.Parameter(zero.to(linear.weight.device))

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.masked_weight(), self.scale, self.zero_point, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self) -> QuantLinear:
        """The packed layer with this layer's current codes, zero points and (fp16) step sizes."""
        codes, zeros, scales = integer_codes(
            self.masked_weight(), self.scale, self.zero_point, self.bits, self.group_size
        )
        return QuantLinear.from_codes(codes, zeros, scales, self.bits, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


class QuantLinear(nn.Module):
    """A Linear stored as packed N-bit codes (GPTQ v2 tensor names), run by dequantizing on any device.

    Buffers: ``qweight``, ``qzeros``, ``g_idx``, ``bias``; ``scales`` is an ``nn.Parameter`` that is frozen by
    default (``requires_grad=False``) so that E2E-QP can train it by switching ``requires_grad`` on while the
    integer codes stay buffers. ``scales`` keeps its own dtype (fp16 as stored, fp32 when trained) and is cast
    to the input's dtype at each forward.
    """

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        group_size = resolve_group_size(group_size, in_features)
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        per_word, n_groups = codes_per_word(bits), in_features // group_size
        self.register_buffer(
            "qweight",
            torch.zeros(math.ceil(in_features / per_word), out_features, dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(n_groups, math.ceil(out_features / per_word), dtype=torch.int32, device=device),
        )
        self.scales = nn.Parameter(
            torch.ones(n_groups, out_features, dtype=torch.float16, device=device), requires_grad=False
        )
        self.register_buffer(
            "g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // group_size
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None
        )

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Pack codes [out, in], zeros [out, in/g] and scales [out, in/g] (the weight's own orientation)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, device=codes.device)
        layer.qweight.copy_(pack_codes(codes.t(), bits))
        layer.qzeros.copy_(pack_codes(zeros, bits).t())
        layer.scales.data.copy_(scales.t())
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        """Round-to-nearest: the min/max-initialized quantizer of ``linear``, packed."""
        scale, zero = init_scale_zero(linear.weight, bits, resolve_group_size(group_size, linear.in_features))
        codes, zeros, scales = integer_codes(
            linear.weight, scale, zero, bits, resolve_group_size(group_size, linear.in_features)
        )
        return cls.from_codes(codes, zeros, scales, bits, group_size, linear.bias)

    def codes(self) -> torch.Tensor:
        """Integer codes [in, out]."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Integer zero points [in/g, out]."""
        return unpack_codes(self.qzeros.t(), self.bits, self.out_features).t()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in]: (q - z[g_idx]) * s[g_idx], transposed to nn.Linear's orientation."""
        dtype = dtype or self.scales.dtype
        g_idx = self.g_idx.long()
        q_minus_z = self.codes() - self.zeros()[g_idx]
        return (q_minus_z.to(dtype) * self.scales.to(dtype)[g_idx]).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gradient reaches `scales` through the dequantization: dW/ds = q - z (E2E-QP).
        w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")

