"""LBC: learnable N:M sparsity by learning the best combination (Zhang et al., "Learning Best Combination for
Efficient N:M Sparsity", NeurIPS 2022; official code: zyxxmu/LBC `ResNet/utils/conv_type.py` `NMConv`,
`ResNet/imagenet.py` `remove_alpha`).

The weights are split into G groups of M consecutive inputs (``effitrain.methods.sparsity.to_groups``). The
C = C(M, N) ways to keep N of M form a fixed candidate table T [C, M]; each group g has a score α_g,c per
candidate. The layer computes with W⊙m where

    s = (α ⊙ alive) T,     m = [s ≠ 0]   (straight-through: ∂m/∂s = 1)

so ∂L/∂α_g,c = Σ_{j∈c} (∂L/∂W̃_j)·W_j and the weight gradient is g⊙m. α starts at 1/C(M−1, N−1), which makes
s = 1 everywhere: training starts dense. m is taken as the union of the alive candidates, [(alive)T > 0]: the
same as [s ≠ 0] except when alive scores cancel exactly, so it changes only when a candidate is removed and
is cached between removals (all ones, and skipped, while every weight is in some alive candidate). Before every iteration the smallest alive scores of each group are
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


def _group_products(grad: Tensor, weight: Tensor, m: int) -> Tensor:
    """g⊙W as [G, m] groups (``to_groups``), in one pass: for a conv the channel-last regrouping is the
    layout the product is written in, rather than a copy after it."""
    if weight.dim() <= 2:
        return (grad * weight).reshape(-1, m)
    order = (0, *range(2, weight.dim()), 1)
    out = torch.empty([weight.shape[i] for i in order], dtype=torch.result_type(grad, weight), device=weight.device)
    return torch.mul(grad.permute(order), weight.permute(order), out=out).reshape(-1, m)


class _LBCMaskedWeight(torch.autograd.Function):
    """W ↦ W⊙m for the owner's mask m; backward: g⊙m to W and (to_groups(g⊙W) Tᵀ)⊙alive to α (the
    straight-through ∂m/∂s = 1), written out so that no intermediate of the STE is kept. While every
    weight is in some alive candidate (m = 1) the products with m are skipped."""

    @staticmethod
    def forward(ctx, weight: Tensor, alpha: Tensor, owner: LearnableNMMask) -> Tensor:  # type: ignore[override]
        keep = owner.current_keep()
        ctx.owner = owner
        if keep is None:
            ctx.save_for_backward(weight)
            return weight.view_as(weight)
        ctx.save_for_backward(weight, keep)
        return weight * keep

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        weight, *keep = ctx.saved_tensors
        owner = ctx.owner
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad * keep[0] if keep else grad
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            per_weight = _group_products(grad, weight, owner.m).to(owner.alpha.dtype)  # g_j·W_j, [G, M]
            # T (gW)ᵀ into α's candidate-major storage: MKL is several times faster at this short-wide
            # product than at the tall-skinny (gW) Tᵀ, and the result needs no transposing copy
            grad_alpha = torch.mm(owner.table, per_weight.t()).t()
            if owner.removed_any():
                grad_alpha.masked_fill_(~owner.alive, 0.0)
        return grad_weight, grad_alpha, None


class LearnableNMMask(WeightMask):
    """Parametrization of a layer's weight with LBC's learnable N:M combinations.

    Args:
        shape: the weight's shape (its input width, I·kh·kw, must be a multiple of m).
        n, m: keep n of every m inputs at the end of the schedule.

    Holds ``alpha`` [G, C] (a parameter: the optimizer trains it), ``table`` [C, m] and ``alive`` [G, C]
    (buffers); all three are in the state_dict, so a resumed run continues the same schedule.

    ``alpha`` holds α − α0, the scores relative to their common start α0 = 1/C(M−1, N−1) (``alpha_start``).
    On a trained network one step moves a score by about 1e-9 to 1e-7, below float32's resolution at 1/3
    (3e-8): stored as α itself, as the official code does, most updates round away, most groups' scores are
    still exactly tied when removal starts, and the tie, not the training, picks the combination that
    survives. The gradient does not depend on α, so under SGD (momentum, coupled weight decay) or AdamW,
    α = α0·(a decay common to all candidates) + (α − α0 trained from 0): the order of a group's scores, which
    is all that removal reads, is the official one, without the rounding.
    """

    def __init__(self, shape: tuple[int, ...], n: int, m: int) -> None:
        super().__init__()
        table = candidate_table(n, m)
        groups = to_groups(torch.empty(shape, device="meta"), m).shape[0]
        self.n, self.m, self.shape = n, m, tuple(shape)
        self.register_buffer("table", table)
        self.register_buffer("alive", torch.ones(groups, table.shape[0], dtype=torch.bool))
        self.alpha_start = 1.0 / math.comb(m - 1, n - 1)
        # α − α0 (see the class docstring), [G, C] held candidate-major (a transposed [C, G]), the layout
        # its gradient is produced in
        self.alpha = nn.Parameter(torch.zeros(table.shape[0], groups).t())
        self._key: tuple[int, int] | None = None  # the ``alive`` the cached mask below was computed from
        self._keep: Tensor | None = None
        self._most_alive = table.shape[0]
        self._removed_any = False

    def scores(self) -> Tensor:
        """s = (α ⊙ alive) T, per group and position [G, m] (α = α0 + ``alpha``; weight decay's uniform
        shrinking of α0 is not tracked, as it changes no order)."""
        return ((self.alpha + self.alpha_start) * self.alive) @ self.table

    def _refresh(self) -> None:
        """Recompute what depends only on ``alive``, once per change of it (its in-place version counter
        moves on removal, on ``load_state_dict`` and on any direct edit; its storage moves with ``.to``)."""
        key = (self.alive.data_ptr(), self.alive._version)
        if self._key == key:
            return
        covered = (self.alive.to(self.table.dtype) @ self.table) > 0  # in some alive candidate [G, m]
        self._keep = None if bool(covered.all()) else from_groups(covered, self.shape)
        self._most_alive = int(self.alive.sum(1).max())
        self._removed_any = not bool(self.alive.all())
        self._key = key

    def current_keep(self) -> Tensor | None:
        """The boolean mask m in the weight's shape, or None while it is all ones."""
        self._refresh()
        return self._keep

    def removed_any(self) -> bool:
        """Whether some candidate has left ``alive`` (before that the α gradient needs no masking)."""
        self._refresh()
        return self._removed_any

    def forward(self, weight: Tensor) -> Tensor:
        return _LBCMaskedWeight.apply(weight, self.alpha, self)

    @torch.no_grad()
    def mask(self, weight: Tensor | None = None) -> Tensor:
        keep = self.current_keep()
        return torch.ones(self.shape, dtype=torch.bool, device=self.alive.device) if keep is None else keep.clone()

    @torch.no_grad()
    def keep_best(self, k: int) -> None:
        """Keep the k largest alive scores of each group alive; the rest are removed for good (their
        ``alpha`` set to 0; ``alive`` alone decides, so momentum moving it later changes nothing)."""
        if not 1 <= k <= self.alive.shape[1]:
            raise ValueError(f"k must be in [1, {self.alive.shape[1]}], got {k}")
        self._refresh()
        if self._most_alive <= k:
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
