"""Shared helpers for timm's feature-extraction interface (``forward_intermediates``,
``prune_intermediate_layers``, ``features_only=True``) of this project's token models.

``forward_intermediates(x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
output_fmt="NCHW", intermediates_only=False)`` reads its arguments as timm's
``VisionTransformer.forward_intermediates``:

* ``indices``: blocks to return: ``None`` all, an int n the last n, a list the given ones;
* ``return_prefix_tokens``: return (patch tokens, prefix tokens) pairs (the class token, or the registers);
* ``norm``: apply the final norm to each intermediate;
* ``stop_early``: skip the blocks after the last one taken (use with ``intermediates_only``);
* ``output_fmt``: ``'NCHW'`` (patch grid) or ``'NLC'`` (tokens);
* ``intermediates_only``: return only the intermediates, else (final features as ``forward_features``,
  intermediates).
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_FORMATS = ("NCHW", "NLC")
IndexLike = slice | torch.Tensor


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


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")


def tokens_to_nchw(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, H·W, C) in raster order as a (B, C, H, W) map."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()


def split_intermediates(intermediates: list[torch.Tensor], prefix: IndexLike, patches: IndexLike,
                        grid: tuple[int, int], output_fmt: str, return_prefix_tokens: bool) -> list:
    """Each (B, N, D) block output as ``forward_intermediates`` returns it: its patch tokens (``patches``
    indexes them along N, in raster order) in ``output_fmt``, paired with its prefix tokens (``prefix``)
    when ``return_prefix_tokens``."""
    prefix_tokens = [y[:, prefix] for y in intermediates]
    patch_tokens = [y[:, patches] for y in intermediates]
    if output_fmt == "NCHW":
        patch_tokens = [tokens_to_nchw(y, grid) for y in patch_tokens]
    if return_prefix_tokens:
        return list(zip(patch_tokens, prefix_tokens, strict=True))
    return patch_tokens


def prune_blocks(model: nn.Module, blocks: str, norm: str, indices: int | list[int], prune_norm: bool,
                 prune_head: bool) -> list[int]:
    """``prune_intermediate_layers``: drop the blocks (the ``model.<blocks>`` list) after the last one
    ``indices`` takes, and the final norm (``model.<norm>``) and head when asked; returns the absolute
    indices kept (``features_only=True`` uses this)."""
    taken, last = take_indices(len(getattr(model, blocks)), indices)
    setattr(model, blocks, getattr(model, blocks)[:last + 1])
    if prune_norm:
        setattr(model, norm, nn.Identity())
    if prune_head:
        model.reset_classifier(0, "")
    return taken
