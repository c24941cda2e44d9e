"""LBC: learnable N:M sparsity by learning the best combination (Zhang et al., "Learning Best Combination for
Efficient N:M Sparsity", NeurIPS 2022; official code: zyxxmu/LBC `ResNet/utils/conv_type.py` `NMConv`,
`ResNet/imagenet.py` `remove_alpha`).

The weights are split into G groups of M consecutive inputs (``effitrain.methods.sparsity.to_groups``). The
C = C(M, N) ways to keep N of M form a fixed candidate table T [C, M]; each group g has a score α_g,c per
candidate. The layer computes with W⊙m where

    s = (α ⊙ alive) T,     m = [s ≠ 0]   (straight-through: ∂m/∂s = 1)

so ∂L/∂α_g,c = Σ_{j∈c} (∂L/∂W̃_j)·W_j and the weight gradient is g⊙m. α starts at 1/C(M−1, N−1), which makes
s = 1 everywhere: training starts dense. Before every iteration the smallest alive scores of each group are
removed for good (the explicit ``alive`` buffer, rather than testing α = 0, which momentum can nudge), so
that K of the C candidates stay alive, with the schedule (Sec. 3.3; official exponent 3 for ResNet, 4 for DeiT)

    K(t) = 1 + ⌈(C − 1)·(1 − (t − t_i)/(t_f − t_i))^e⌉,     t_i <= t <= t_f

from C at t_i to 1 at t_f; then one candidate a group is left, exactly N of every M weights survive, and α is
frozen while the weights keep training under the fixed mask.
"""

from __future__ import annotations

import itertools
import math

import torch
from effitrain.methods.sparsity import WeightMask, from_groups, to_groups
from torch import Tensor, nn

__all__ = ["LearnableNMMask", "alive_count", "candidate_table"]


def candidate_table(n: int, m: int) -> Tensor:
    """The C(m, n) binary rows with n ones, in lexicographic order of their positions: [C, m] float."""
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}")
    rows = [[1.0 if j in combo else 0.0 for j in range(m)] for combo in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


def alive_count(t: float, t_i: float, t_f: float, candidates: int, exponent: float = 3.0) -> int:
    """K(t) = 1 + ⌈(C − 1)(1 − (t − t_i)/(t_f − t_i))^e⌉, clipped to C before t_i and to 1 from t_f."""
    if t_f <= t_i:
        raise ValueError(f"the removal schedule needs t_i < t_f, got {t_i}, {t_f}")
    if t <= t_i:
        return candidates
    if t >= t_f:
        return 1
    left = 1.0 - (t - t_i) / (t_f - t_i)
    return 1 + math.ceil((candidates - 1) * left**exponent)


class _LBCMaskedWeight(torch.autograd.Function):
    """W ↦ W⊙m, m = [(α⊙alive)T ≠ 0]; backward: g⊙m to W and (to_groups(g⊙W) Tᵀ)⊙alive to α (the
    straight-through ∂m/∂s = 1), written out so that no intermediate of the STE is kept."""

    @staticmethod
    def forward(ctx, weight: Tensor, alpha: Tensor, owner: LearnableNMMask) -> Tensor:  # type: ignore[override]
        keep = from_groups(owner.scores() != 0, weight.shape)
        ctx.owner = owner
        ctx.save_for_backward(weight, keep)
        return weight * keep

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        weight, keep = ctx.saved_tensors
        owner = ctx.owner
        grad_weight = grad * keep if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            per_weight = to_groups(grad * weight, owner.m).to(owner.alpha.dtype)  # g_j·W_j, [G, M]
            grad_alpha = (per_weight @ owner.table.T).mul_(owner.alive)
        return grad_weight, grad_alpha, None


class LearnableNMMask(WeightMask):
    """Parametrization of a layer's weight with LBC's learnable N:M combinations.

    Args:
        shape: the weight's shape (its input width, I·kh·kw, must be a multiple of m).
        n, m: keep n of every m inputs at the end of the schedule.

    Holds ``alpha`` [G, C] (a parameter: the optimizer trains it), ``table`` [C, m] and ``alive`` [G, C]
    (buffers); all three are in the state_dict, so a resumed run continues the same schedule.
    """

    def __init__(self, shape: tuple[int, ...], n: int, m: int) -> None:
        super().__init__()
        table = candidate_table(n, m)
        groups = to_groups(torch.empty(shape, device="meta"), m).shape[0]
        self.n, self.m, self.shape = n, m, tuple(shape)
        self.register_buffer("table", table)
        self.register_buffer("alive", torch.ones(groups, table.shape[0], dtype=torch.bool))
        self.alpha = nn.Parameter(torch.full((groups, table.shape[0]), 1.0 / math.comb(m - 1, n - 1)))

    def scores(self) -> Tensor:
        """s = (α ⊙ alive) T, per group and position [G, m]."""
        return (self.alpha * self.alive) @ self.table

    def forward(self, weight: Tensor) -> Tensor:
        return _LBCMaskedWeight.apply(weight, self.alpha, self)

    @torch.no_grad()
    def mask(self, weight: Tensor | None = None) -> Tensor:
        return from_groups(self.scores() != 0, self.shape)

    @torch.no_grad()
    def keep_best(self, k: int) -> None:
        """Keep the k largest alive scores of each group alive; the rest are removed for good (α set to 0)."""
        if not 1 <= k <= self.alive.shape[1]:
            raise ValueError(f"k must be in [1, {self.alive.shape[1]}], got {k}")
        if int(self.alive.sum(1).max()) <= k:
            return
        ranked = self.alpha.detach().float().masked_fill(~self.alive, -torch.inf)
        best = torch.topk(ranked, k, dim=1).indices
        self.alive &= torch.zeros_like(self.alive).scatter_(1, best, True)
        self.alpha.masked_fill_(~self.alive, 0.0)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask().float().mean())

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, candidates={self.table.shape[0]}, alive≤{int(self.alive.sum(1).max())}"
