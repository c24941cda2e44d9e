"""Wanda: pruning by weights and activations (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024; official code: locuslab/wanda `lib/prune.py` `prune_wanda`).

The saliency of weight W_ij of a Linear layer is its magnitude times the ℓ2 norm of its input feature over
the calibration tokens (Eq. 1 of the paper):

    S_ij = |W_ij| · ‖X_j‖₂

and the comparison group is each output row: the ⌊s·d_in⌋ lowest scores of every row are pruned (or, for
N:M, the M − N lowest of every block of M inputs). No weight is updated. The masks are the shared ones of
``effitrain.methods.sparsity`` (``row_mask``, ``nm_mask``); the statistics come from
``effitrain.methods.blockwise_pruning.InputStats``.
"""

from __future__ import annotations

import math

from effitrain.methods.sparsity import magnitude_mask, nm_mask, row_mask
from torch import Tensor

__all__ = ["check_sparsity_target", "magnitude_prune_mask", "score_mask", "wanda_scores"]


def check_sparsity_target(sparsity: float | None, pattern: tuple[int, int] | None) -> None:
    """One of an unstructured sparsity in [0, 1) or an N:M pattern (1 <= N < M).

    Raises:
        ValueError: neither or both given, a sparsity outside [0, 1), or a bad N:M.
    """
    if (sparsity is None) == (pattern is None):
        raise ValueError("give either an unstructured `sparsity` in [0, 1) or an N:M `pattern`, not "
                         f"{'both' if pattern is not None else 'neither'}")
    if pattern is not None:
        n, m = pattern
        if not 1 <= n < m:
            raise ValueError(f"N:M sparsity needs 1 <= N < M (N kept of every M), got {n}:{m}")
    elif not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0 and not math.isnan(sparsity)):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """S = |W| · ‖X_j‖₂ (Eq. 1), ``input_sq_norm`` being ‖X_j‖² per input feature (any common scale)."""
    if input_sq_norm.shape != weight.shape[1:2]:
        raise ValueError(f"one input norm per input feature: got {tuple(input_sq_norm.shape)} for a weight of "
                         f"shape {tuple(weight.shape)}")
    return weight.detach().abs().float() * input_sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def score_mask(scores: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> Tensor:
    """Keep mask from per-weight scores: per output row (unstructured, Wanda's comparison group) or N:M."""
    check_sparsity_target(sparsity, pattern)
    return nm_mask(scores, *pattern) if pattern is not None else row_mask(scores, sparsity)


def magnitude_prune_mask(weight: Tensor, sparsity: float | None = None,
                         pattern: tuple[int, int] | None = None) -> Tensor:
    """The magnitude baseline as the official scripts run it: one |W| threshold over the whole layer
    (unstructured), or the N largest |W| of every M inputs."""
    check_sparsity_target(sparsity, pattern)
    return nm_mask(weight, *pattern) if pattern is not None else magnitude_mask(weight, sparsity)

