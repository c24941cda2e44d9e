"""Distillation losses: UniPTS's base-decayed objective and Hinton's temperature-scaled KL.

UniPTS (Xie et al., CVPR 2024, Sec. 3.1; official `DistillKL`) trains the sparse student on the dense
teacher's soft labels only, with a logarithm whose base decays over training:

    L = (T²/B) · Σ_b Σ_j p_t,j · [ln p_t,j − ln p_s,j / τ_e],   p_t = softmax(z_t/T),  p_s = softmax(z_s)
    τ_e = τ_0 · γ^e   (τ_0 = 8, γ = 0.99, e = epoch),  T = 4

ln(·)/τ_e is the logarithm in base e^{τ_e}; the student gets no temperature. The gradient with respect
to the student logits is T²/(B·τ_e)·(p_s − p_t): a soft-label cross-entropy whose weight grows as the
base decays (about 2.7× over 100 epochs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["base_decayed_kd_loss", "decayed_base", "kd_loss"]


def decayed_base(epoch: int | float, initial: float = 8.0, decay: float = 0.99) -> float:
    """τ_e = initial · decay^epoch (UniPTS: 8·0.99^e)."""
    return initial * decay**epoch


def base_decayed_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    epoch: int | float,
    temperature: float = 4.0,
    initial_base: float = 8.0,
    base_decay: float = 0.99,
) -> Tensor:
    """UniPTS objective (T²/B)·Σ p_t·[ln p_t − ln p_s/τ_e]; logits are [B, C] (teacher detached here)."""
    tau = decayed_base(epoch, initial_base, base_decay)
    log_ps = F.log_softmax(student_logits.float(), dim=-1) / tau
    pt = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_ps, pt, reduction="sum") * temperature**2 / student_logits.shape[0]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. (2015): T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pt = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_ps, pt, reduction="batchmean") * temperature**2
