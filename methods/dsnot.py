"""DSnoT: training-free prune-and-grow refinement of a sparse mask (Zhang et al., "Dynamic Sparse No
Training", ICLR 2024; official code: zyxxmu/DSnoT `lib/prune.py` `prune_DSnoT`).

Given a Linear layer W [d_out, d_in], an initial keep-mask (Wanda's or magnitude's) and statistics of the
layer's input over the calibration tokens, every output row i is refined independently, without changing
any weight value:

* the expected output gap of the row (Sec. 3, the reconstruction error), with X̄_j the per-sequence sum of
  feature j averaged over sequences (the official ``sum_metric_row``):

      ε_i = Σ_{j pruned} W_ij · X̄_j

* grow: among the row's pruned weights ordered by W_ij·X̄_j / Var(X_j), the largest if ε_i > 0 (it shrinks
  ε_i most per unit of variance), else the smallest; a pointer moves inward from that end each cycle;
* prune: the row's kept weights with a negative contribution W_ij·X̄_j in ascending Wanda score, then the
  positive ones in descending Wanda score; the first if ε_i >= 0, else the last: the least salient weight
  whose removal moves ε_i towards 0. The official code orders them by the Wanda score whatever chose the
  initial mask (magnitude included). For N:M the pruned partner is instead the least salient kept weight of
  the grown weight's block of M by the initial method's score, so every block keeps N;
* a row swaps (one grow + one prune) while it is active: |ε_i| > ``update_threshold`` and, with the sign
  rule, sign(ε_i after the swap) = sign(ε_i at the start); an inactive row stays inactive. The loop stops
  when no row is active or after ``max_cycle_time`` cycles.

Neither rule checks that a swap shrinks |ε_i|: when a row has run out of kept weights whose removal moves ε_i
towards 0 (rows that read a large-mean input direction with weights of one sign), the prune pointer goes on
to weights of the other sign in descending Wanda score, and |ε_i| grows. ``shrink_only=True`` (not in the
official code) stops a row at the first swap that would not shrink |ε_i|.

Nonzeros per row (and per M-block) never change, each weight is swapped at most once, and a regrown weight
keeps its dense value. The official scripts pass ``--without_same_sign`` as ``type=bool``, which turns the
sign rule off for unstructured sparsity whatever is given; it stays on for N:M. ``same_sign=None`` follows
that behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from effitrain.methods.sparsity import to_groups
from torch import Tensor

__all__ = ["DSnoTResult", "dsnot"]


@dataclass
class DSnoTResult:
    """The refined keep-mask, the number of swaps of each row, and ε per row before and after."""

    mask: Tensor
    swaps: Tensor
    gap_before: Tensor
    gap_after: Tensor


@torch.no_grad()
def dsnot(
    weight: Tensor,
    mask: Tensor,
    input_sum: Tensor,
    input_var: Tensor,
    prune_metric: Tensor,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pattern: tuple[int, int] | None = None,
    same_sign: bool | None = None,
    pow_of_var: float = 1.0,
    shrink_only: bool = False,
) -> DSnoTResult:
    """Refine the keep-``mask`` of ``weight`` [d_out, d_in] by DSnoT's prune-and-grow cycles.

    Args:
        weight: the dense weights (never changed).
        mask: the initial keep-mask (True = kept), e.g. Wanda's ``score_mask``.
        input_sum: X̄_j, per input feature (the official scale: the sum over a sequence's tokens, averaged
            over sequences; it sets the scale of ``update_threshold``).
        input_var: Var(X_j) per input feature.
        prune_metric: orders the prune candidates (least salient first). The official choice: Wanda's
            |W|·‖X‖ for unstructured masks, also when magnitude chose them; the initial method's score
            (|W|·‖X‖ or |W|) for N:M.
        max_cycle_time: at most this many swaps per row (official: 50).
        update_threshold: rows with |ε| at or below this stop swapping (official: 0.1).
        pattern: ``(n, m)`` when ``mask`` is N:M.
        same_sign: the sign rule; ``None``: off for unstructured, on for N:M (the official behaviour).
        pow_of_var: the exponent of Var(X_j) in the grow metric (official: 1).
        shrink_only: a row also stops at the first swap that would not shrink |ε_i| (not official: off).

    Raises:
        ValueError: shapes that do not match, a negative ``max_cycle_time`` or ``update_threshold``.
    """
    rows, cols = weight.shape
    if mask.shape != weight.shape or prune_metric.shape != weight.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and prune_metric {tuple(prune_metric.shape)} must have the "
                         f"weight's shape {tuple(weight.shape)}")
    if input_sum.shape != (cols,) or input_var.shape != (cols,):
        raise ValueError(f"input statistics need one value per input feature ({cols})")
    if max_cycle_time < 0 or update_threshold < 0:
        raise ValueError(f"max_cycle_time and update_threshold must be >= 0, got {max_cycle_time}, {update_threshold}")
    same_sign = pattern is not None if same_sign is None else same_sign
    keep = mask.clone()
    contribution = weight.float() * input_sum.float().unsqueeze(0)  # W_ij·X̄_j (the official DSnoT_metric)
    gap = (contribution * ~keep).sum(1)  # ε_i
    gap_before = gap.clone()
    sign0 = torch.sign(gap)
    arange = torch.arange(rows, device=weight.device)

    # grow candidates: the pruned weights of each row in ascending W·X̄/Var (kept ones sorted past the end)
    grow_key = (contribution / input_var.float().clamp_min(1e-12).pow(pow_of_var).unsqueeze(0)).masked_fill(keep, torch.inf)
    grow_order = torch.sort(grow_key, dim=1, stable=True).indices
    n_pruned = (~keep).sum(1)  # the same for every row of a per-row or N:M mask; kept per row for safety
    grow_lo, grow_hi = torch.zeros_like(n_pruned), n_pruned - 1

    metric = prune_metric.float().clone()
    if pattern is None:
        # prune candidates: kept weights in ascending prune metric, negatives first, positives reversed
        n_kept = keep.sum(1)
        order = torch.sort(metric.masked_fill(~keep, torch.inf), dim=1, stable=True).indices
        rank = torch.arange(cols, device=weight.device).expand(rows, cols)
        negative = contribution.gather(1, order) < 0
        in_kept = rank < n_kept.unsqueeze(1)
        key = torch.where(negative, rank, 2 * cols - rank).masked_fill(~in_kept, 4 * cols)
        prune_order = order.gather(1, torch.sort(key, dim=1, stable=True).indices)
        prune_lo, prune_hi = torch.zeros_like(n_kept), n_kept - 1
    else:
        m = pattern[1]
        to_groups(weight, m)  # a width M does not divide fails here
        metric.masked_fill_(~keep, torch.inf)  # pruned (and regrown) weights are never the partner

    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    swaps = torch.zeros(rows, dtype=torch.long, device=weight.device)
    for _ in range(max_cycle_time):
        if not active.any():
            break
        positive = gap > 0
        active &= grow_lo <= grow_hi
        g_pos = torch.where(positive, grow_hi, grow_lo).clamp(0, cols - 1)
        grow_idx = grow_order.gather(1, g_pos.unsqueeze(1)).squeeze(1)
        grow_hi, grow_lo = grow_hi - positive.long(), grow_lo + (~positive).long()
        if pattern is None:
            negative_gap = gap < 0
            active &= prune_lo <= prune_hi
            p_pos = torch.where(negative_gap, prune_hi, prune_lo).clamp(0, cols - 1)
            prune_idx = prune_order.gather(1, p_pos.unsqueeze(1)).squeeze(1)
            prune_hi, prune_lo = prune_hi - negative_gap.long(), prune_lo + (~negative_gap).long()
        else:
            start = grow_idx - grow_idx % m
            block = start.unsqueeze(1) + torch.arange(m, device=weight.device)
            prune_idx = start + metric.gather(1, block).argmin(1)
            # a block whose kept weights were all regrown has no partner left: the row stops (the official
            # code would prune an already pruned weight there, and the block would keep N + 1)
            active &= torch.isfinite(metric[arange, prune_idx])
        grown, pruned = contribution[arange, grow_idx], contribution[arange, prune_idx]
        after = gap + pruned - grown
        active &= gap.abs() > update_threshold
        if same_sign:
            active &= torch.sign(after) == sign0
        if shrink_only:
            active &= after.abs() < gap.abs()
        rows_on = arange[active]
        keep[rows_on, prune_idx[active]] = False
        keep[rows_on, grow_idx[active]] = True
        if pattern is not None:
            metric[rows_on, prune_idx[active]] = torch.inf
        gap = torch.where(active, after, gap)
        swaps += active.long()
    return DSnoTResult(keep, swaps, gap_before, gap)
