"""The quantized twin of iLLaMA's attention for I&S-ViT post-training quantization (arXiv 2311.10126).

``QuantSoftMaskAttention`` replaces ``effitrain.models.illama.SoftMaskAttention`` from outside (the model file
is unchanged): it reuses the module's ``qkv``/``proj`` Linears (wrapped as ``QLinear``) and runs the attention
explicitly so that both matmuls get quantized inputs: q and k **after** RoPE, the post-softmax probabilities
(SULQ/log2/uniform) and v. The soft mask is applied as the model does:

* strict mode: ``P = r softmax(S) + (1 - r) softmax(S + causal bias)`` (exactly causal at r = 0);
* official mode: ``P = softmax(S) * (r 1 + (1 - r) tril 1)``;

and the probabilities that multiply v are what the post-softmax quantizer sees. Pass
``illama_twins()`` to ``quantize_vit(..., twins=...)``.
"""

from __future__ import annotations

import torch
from effitrain.methods.vit_ptq import AttentionQuantizers, QLinear
from effitrain.models.illama import SoftMaskAttention, apply_rope
from torch import nn


class QuantSoftMaskAttention(nn.Module):
    """``forward(x, rope, rate, soft_mask)`` as ``SoftMaskAttention``, with fake-quantized Linears and matmuls."""

    def __init__(self, attn: SoftMaskAttention, w_bits: int, a_bits: int, post_softmax: str,
                 weight_channel_wise: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = QLinear(attn.qkv, w_bits, a_bits, weight_channel_wise, input_channel_wise=True)
        self.proj = QLinear(attn.proj, w_bits, a_bits, weight_channel_wise)
        self.quant = AttentionQuantizers(a_bits, post_softmax)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, rate: float, soft_mask: torch.Tensor | None
                ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], rope).unbind(0)
        scores = self.quant.scores(q, k, self.scale)
        if rate >= 1.0:
            probs = scores.softmax(dim=-1)
        elif soft_mask is None:
            causal = torch.full((N, N), float("-inf"), device=x.device, dtype=scores.dtype).triu(1)
            probs = (scores + causal).softmax(dim=-1)
            if rate > 0.0:
                probs = torch.lerp(probs, scores.softmax(dim=-1), rate)
        else:
            probs = scores.softmax(dim=-1) * soft_mask
        out = self.quant.matmul_v(probs, qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def illama_twins() -> dict[type, type]:
    return {SoftMaskAttention: QuantSoftMaskAttention}
