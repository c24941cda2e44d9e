"""Shared helpers for timm's feature-extraction interface (``forward_intermediates``,
``prune_intermediate_layers``, ``features_only=True``) of this project's token models."""

from __future__ import annotations

import torch


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """The blocks whose outputs ``forward_intermediates`` returns, as timm's models read ``indices``:
    ``None`` all blocks, an int n the last n, a sequence the given ones (negative from the end).

    Returns the absolute indices and the largest one.

    Raises:
        ValueError: an index out of range.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_blocks} blocks).")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = [i + num_blocks if i < 0 else i for i in indices]
        if not taken or any(not 0 <= i < num_blocks for i in taken):
            raise ValueError(f"indices {list(indices)} out of range for {num_blocks} blocks.")
    return taken, max(taken)


def tokens_to_nchw(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, H·W, C) in raster order as a (B, C, H, W) map."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
