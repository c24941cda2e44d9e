"""Distillation objectives: token-level KL for LLMs (forward, reverse, adaptive) and UniPTS's base-decayed KL.

**FKL / RKL / AKL** (Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
Language Models", arXiv 2404.02657; official ``AKL.py``). Per token, with p = softmax(teacher logits) and
q = softmax(student logits), both in fp32 and with no temperature:

    FKL = Σ_v p_v (log p_v − log q_v)          RKL = Σ_v q_v (log q_v − log p_v)
    AKL = g_head/(g_head + g_tail) · FKL + g_tail/(g_head + g_tail) · RKL

Sort p descending and gather q in the same order; e_k = |p_(k) − q_(k)|, C_k = p_(1) + … + p_(k). Rank k is
**tail iff C_k > μ**, except rank 1, which is always head (so C_k = μ is head and the token that crosses μ
is tail). g_head and g_tail are the sums of e_k over head and tail: L1 gaps on detached probabilities, with
no gradient. 0/0 (q = p) is guarded by weights of ½ each (both KLs are then 0). The gradient with respect to
the student logit z_j is w_h·(q_j − p_j) + w_t·q_j·(log q_j − log p_j − RKL).

Positions whose label is −100 are dropped before any [N, V] tensor is made; the loss is the token mean over
the rest (Σ_t AKL_t / #tokens), not a per-sequence mean. Logits and labels must already be aligned: for
Hugging Face labels pass ``logits[:, :-1]`` with ``labels[:, 1:]``. With ``chunk_size`` set (the default),
the loss and its closed-form gradient are computed ``chunk_size`` tokens at a time in the forward pass, so
only the [N, V] gradient and one chunk's temporaries are held (the plain autograd form holds about ten fp32
[N, V] tensors); ``chunk_size=None`` is the plain autograd form. The teacher is a constant: no gradient
flows to its logits.

**UniPTS** (Xie et al., CVPR 2024, Sec. 3.1; official ``DistillKL``) trains the sparse student on the dense
teacher's soft labels only, with a logarithm whose base decays over training:

    L = (T²/B) · Σ_b Σ_j p_t,j · [ln p_t,j − ln p_s,j / τ_e],   p_t = softmax(z_t/T),  p_s = softmax(z_s)
    τ_e = τ_0 · γ^e   (τ_0 = 8, γ = 0.99, e = epoch),  T = 4

ln(·)/τ_e is the logarithm in base e^{τ_e}; the student gets no temperature. The gradient with respect
to the student logits is T²/(B·τ_e)·(p_s − p_t): a soft-label cross-entropy whose weight grows as the
base decays (about 2.7× over 100 epochs).

**Pluggable objectives.** ``ForwardKL``, ``ReverseKL``, ``AdaptiveKL``, ``BaseDecayedKL`` and ``HintonKL`` share
one call, ``loss(student_logits, teacher_logits, labels=None, epoch=0)``, so a recipe that distils takes any of
them from its config (``distill_loss: {class_path: effitrain.methods.distillation.AdaptiveKL}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AdaptiveKL", "BaseDecayedKL", "DistillationLoss", "ForwardKL", "HintonKL", "ReverseKL",
           "adaptive_kl", "akl_weights", "base_decayed_kd_loss", "decayed_base", "forward_kl", "head_mask",
           "kd_loss", "reverse_kl"]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- UniPTS
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


# ------------------------------------------------------------------------------------- FKL / RKL / AKL
def head_mask(teacher_probs: Tensor, mu: float = 0.5) -> Tensor:
    """Boolean [..., V], True on the head of p (``AKL.py`` get_ratio): rank 1, and every rank k with C_k ≤ μ.

    The token whose cumulative probability crosses μ is in the tail; C_k = μ exactly is head.
    """
    sorted_p, order = teacher_probs.sort(dim=-1, descending=True)
    tail_sorted = sorted_p.cumsum(dim=-1) > mu
    tail_sorted[..., 0] = False
    return torch.zeros_like(tail_sorted).scatter_(-1, order, ~tail_sorted)


@torch.no_grad()
def akl_weights(student_logits: Tensor, teacher_logits: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """(w_head, w_tail) per token, in [0, 1], summing to 1, without gradient (AKL paper Sec. 3; ``AKL.py``).

    As ``AKL.py``: ±inf logits count as 0 here, probabilities in fp32, and w = ½ each where both gaps are 0.
    """
    p = F.softmax(_upcast(_finite(teacher_logits)), dim=-1)
    q = F.softmax(_upcast(_finite(student_logits)), dim=-1)
    gaps = (p - q).abs_()
    head = head_mask(p, mu)
    g_head = (gaps * head).sum(-1)
    total = gaps.sum(-1)
    w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    # Rounding can put g_head a hair above total: keep the weights a convex pair.
    w_head = w_head.clamp_(0.0, 1.0)
    return w_head, 1.0 - w_head


def _upcast(x: Tensor) -> Tensor:
    """fp32 at least (bf16/fp16 logits are upcast before softmax, log_softmax and sort; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _finite(logits: Tensor) -> Tensor:
    return logits.masked_fill(torch.isinf(logits), 0.0) if torch.isinf(logits).any() else logits


def _token_terms(s: Tensor, t: Tensor, kind: str, mu: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-token loss [M] and (if asked) its closed-form gradient [M, V] for student/teacher logits [M, V]."""
    s, t = _upcast(s), _upcast(t)
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    inf = torch.isinf(s) | torch.isinf(t)
    diff = (log_q - log_p).masked_fill(inf, 0.0)  # products at ±inf logits are 0 (minillm, ``AKL.py``)
    q = log_q.exp()
    loss = grad = None
    if kind in ("fkl", "akl"):
        p = log_p.exp()
        fkl = -(p * diff).sum(-1)
        loss, grad = fkl, (q - p if need_grad else None)
        del p
    if kind in ("rkl", "akl"):
        rkl_terms = q * diff
        rkl = rkl_terms.sum(-1)
        rkl_grad = rkl_terms.sub_(q * rkl.unsqueeze(-1)) if need_grad else None  # q_j(log q_j − log p_j − RKL)
        if kind == "rkl":
            loss, grad = rkl, rkl_grad
        else:
            w_head, w_tail = akl_weights(s, t, mu)
            loss = w_head * loss + w_tail * rkl
            if need_grad:
                grad = grad.mul_(w_head.unsqueeze(-1)).add_(rkl_grad.mul_(w_tail.unsqueeze(-1)))
    return loss, grad


class _ChunkedKL(torch.autograd.Function):
    """Sum over rows of the per-token KL with the gradient computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, kind: str, mu: float, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if need_grad else None  # [N, V] in the student's dtype
        total = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            loss, g = _token_terms(student[idx], teacher[idx], kind, mu, need_grad)
            total += loss.sum()
            if need_grad:
                grad[idx] = g.to(grad.dtype)
        ctx.save_for_backward(grad if need_grad else None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype) if grad is not None else None), None, None, None, None, None


def _kl_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, kind: str, mu: float,
             chunk_size: int | None) -> Tensor:
    _check(student_logits, teacher_logits, labels, chunk_size)
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    rows = (torch.arange(student.shape[0], device=student.device) if labels is None
            else (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1))
    count = rows.numel()
    if count == 0:  # nothing to learn from: a zero that keeps the graph
        return student.sum() * 0.0
    if chunk_size is None:
        loss, _ = _token_terms(student[rows], teacher[rows], kind, mu, need_grad=False)
        return loss.sum() / count
    return _ChunkedKL.apply(student, teacher, rows, kind, mu, int(chunk_size)) / count


def _check(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, chunk_size: int | None) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "token-level KD needs the same tokens and the same vocabulary (the same tokenizer). If one model pads "
            "its vocabulary, slice both to the tokenizer's size first.")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError(f"Logits must be floating point, got {student_logits.dtype} / {teacher_logits.dtype}.")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"Labels {tuple(labels.shape)} must match the logits' leading dimensions "
                         f"{tuple(student_logits.shape[:-1])}; for HF labels pass logits[:, :-1] with labels[:, 1:].")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None (no chunking), got {chunk_size}.")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
               chunk_size: int | None = 1024) -> Tensor:
    """Token mean of KL(p ‖ q) over positions whose label is not −100 (all positions if ``labels`` is None)."""
    return _kl_loss(student_logits, teacher_logits, labels, "fkl", 0.5, chunk_size)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
               chunk_size: int | None = 1024) -> Tensor:
    """Token mean of KL(q ‖ p) over positions whose label is not −100 (all positions if ``labels`` is None)."""
    return _kl_loss(student_logits, teacher_logits, labels, "rkl", 0.5, chunk_size)


def adaptive_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, mu: float = 0.5,
                chunk_size: int | None = 1024) -> Tensor:
    """Token mean of AKL = w_head·FKL + w_tail·RKL (weights from the head/tail gaps at μ; see the module doc)."""
    if not 0.0 < mu < 1.0:
        raise ValueError(f"mu (the head's probability mass) must lie in (0, 1), got {mu}; the paper uses 0.5.")
    return _kl_loss(student_logits, teacher_logits, labels, "akl", mu, chunk_size)


# ------------------------------------------------------------------------------ pluggable objectives
class DistillationLoss:
    """A distillation objective: ``loss(student_logits, teacher_logits, labels=None, epoch=0) -> scalar``.

    Logits are [..., V] (a classifier's [B, C] or an LM's [B, T, V]); ``labels`` marks ignored positions with
    −100 (token-level losses only); ``epoch`` drives objectives that change over training.
    """

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                 epoch: int | float = 0) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ForwardKL(DistillationLoss):
    """KL(p ‖ q), token mean (mode-covering). Args: chunk_size: tokens per chunk (None: plain autograd)."""

    def __init__(self, chunk_size: int | None = 1024):
        self.chunk_size = chunk_size

    def __call__(self, student_logits, teacher_logits, labels=None, epoch=0):
        return forward_kl(student_logits, teacher_logits, labels, self.chunk_size)


class ReverseKL(DistillationLoss):
    """KL(q ‖ p), token mean (mode-seeking). Args: chunk_size: tokens per chunk (None: plain autograd)."""

    def __init__(self, chunk_size: int | None = 1024):
        self.chunk_size = chunk_size

    def __call__(self, student_logits, teacher_logits, labels=None, epoch=0):
        return reverse_kl(student_logits, teacher_logits, labels, self.chunk_size)


class AdaptiveKL(DistillationLoss):
    """AKL (arXiv 2404.02657): FKL and RKL weighted by the head and tail gaps.

    Args:
        mu: the head's cumulative teacher probability (paper and ``AKL.py``: 0.5).
        chunk_size: tokens per chunk (None: plain autograd).

    Raises:
        ValueError: ``mu`` outside (0, 1).
    """

    def __init__(self, mu: float = 0.5, chunk_size: int | None = 1024):
        if not 0.0 < mu < 1.0:
            raise ValueError(f"mu (the head's probability mass) must lie in (0, 1), got {mu}; the paper uses 0.5.")
        self.mu, self.chunk_size = mu, chunk_size

    def __call__(self, student_logits, teacher_logits, labels=None, epoch=0):
        return adaptive_kl(student_logits, teacher_logits, labels, self.mu, self.chunk_size)


class BaseDecayedKL(DistillationLoss):
    """UniPTS's objective (T²/B)·Σ p_t·[ln p_t − ln p_s/τ_e], τ_e = initial_base·base_decay^epoch.

    Args:
        temperature: T of the teacher's softmax (UniPTS: 4). initial_base, base_decay: τ_0, γ (8, 0.99).

    Raises:
        ValueError: a non-positive temperature or base, or a decay outside (0, 1].
    """

    def __init__(self, temperature: float = 4.0, initial_base: float = 8.0, base_decay: float = 0.99):
        if temperature <= 0 or initial_base <= 0 or not 0 < base_decay <= 1:
            raise ValueError(f"need temperature > 0, initial_base > 0, 0 < base_decay <= 1; got {temperature}, "
                             f"{initial_base}, {base_decay}.")
        self.temperature, self.initial_base, self.base_decay = temperature, initial_base, base_decay

    def base(self, epoch: int | float) -> float:
        return decayed_base(epoch, self.initial_base, self.base_decay)

    def __call__(self, student_logits, teacher_logits, labels=None, epoch=0):
        student, teacher = _select(student_logits, teacher_logits, labels)
        return base_decayed_kd_loss(student, teacher, epoch, self.temperature, self.initial_base, self.base_decay)


class HintonKL(DistillationLoss):
    """Hinton et al. (2015): T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), mean over samples/tokens.

    Raises:
        ValueError: a non-positive temperature.
    """

    def __init__(self, temperature: float = 4.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def __call__(self, student_logits, teacher_logits, labels=None, epoch=0):
        student, teacher = _select(student_logits, teacher_logits, labels)
        return kd_loss(student, teacher, self.temperature)


def _select(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """[M, V] rows of the kept positions, for the per-sample objectives."""
    _check(student_logits, teacher_logits, labels, None)
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if labels is None:
        return student, teacher
    keep = labels.reshape(-1) != IGNORE_INDEX
    return student[keep], teacher[keep]
