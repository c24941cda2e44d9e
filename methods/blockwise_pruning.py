"""Training-free pruning of a transformers causal LM, block by block (Wanda, DSnoT, magnitude).

As the official Wanda and DSnoT code (locuslab/wanda, zyxxmu/DSnoT `lib/prune.py`): the calibration
sequences are embedded once and the inputs of the first decoder block are caught; then for each block in
order, forward hooks on its Linear layers collect the input statistics (:class:`InputStats`) while the
block runs on the current inputs, its Linear layers are pruned, and the block runs again so that the
*pruned* block's outputs become the next block's inputs. Pruning writes zeros into the weights (nothing
else changes) and returns the keep-masks.

    masks = prune_causal_lm(model, calibration, method="wanda", sparsity=0.5, dsnot=DSnoTSettings())
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from effitrain.methods.dsnot import dsnot
from effitrain.methods.sparsity import to_groups
from effitrain.methods.wanda import check_sparsity_target, magnitude_prune_mask, score_mask, wanda_scores
from torch import Tensor, nn

__all__ = ["DSnoTSettings", "InputStats", "decoder_blocks", "prune_causal_lm", "prune_linear"]


class InputStats:
    """Statistics of a Linear layer's input features, accumulated over calibration forwards (official
    ``WrappedGPT``): ‖X_j‖² and Σ X_j per sequence, averaged over sequences, and Var(X_j) over each
    sequence's tokens, averaged over tokens. Feed it ``[B, T, d]`` (or ``[T, d]``) inputs."""

    def __init__(self, features: int, device: torch.device | None = None) -> None:
        self.sq_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.var_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sequences = 0
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, 1, -1)
        x = x.double()
        self.sq_sum += x.square().sum((0, 1))
        self.sum += x.sum((0, 1))
        self.var_sum += x.var(dim=1, unbiased=False).sum(0) * x.shape[1]
        self.sequences += x.shape[0]
        self.tokens += x.shape[0] * x.shape[1]

    @property
    def sq_norm(self) -> Tensor:
        """‖X_j‖² per sequence (Wanda's ``scaler_row``)."""
        return (self.sq_sum / max(self.sequences, 1)).float()

    @property
    def mean_sum(self) -> Tensor:
        """Σ_t X_j per sequence, averaged over sequences (DSnoT's ``sum_metric_row``)."""
        return (self.sum / max(self.sequences, 1)).float()

    @property
    def var(self) -> Tensor:
        """Var(X_j) within a sequence, averaged over tokens (DSnoT's ``var``)."""
        return (self.var_sum / max(self.tokens, 1)).float()


@dataclass
class DSnoTSettings:
    """DSnoT's knobs (official defaults): see ``effitrain.methods.dsnot.dsnot``. ``skip`` holds glob patterns
    of Linear names inside a block that keep the initial mask (official ``--skip_layer mlp``); ``shrink_only``
    is not in the official code (off)."""

    max_cycle_time: int = 50
    update_threshold: float = 0.1
    pow_of_var: float = 1.0
    same_sign: bool | None = None
    skip: tuple[str, ...] = ("mlp.*",)
    shrink_only: bool = False


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM: the ModuleList of ``config.num_hidden_layers`` entries
    (``model.layers`` of LLaMA/Mistral/Qwen, ``decoder.layers`` of OPT, ``transformer.h`` of GPT-2, ...).

    Raises:
        ValueError: no such list.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of {count} decoder blocks: block-by-block pruning "
                     "needs a transformers causal LM")


def prune_linear(weight: Tensor, method: str, sparsity: float | None, pattern: tuple[int, int] | None,
                 stats: InputStats | None = None, dsnot_settings: DSnoTSettings | None = None) -> Tensor:
    """The keep-mask of one Linear weight: the initial mask of ``method`` ('wanda' or 'magnitude'), refined by
    DSnoT when ``dsnot_settings`` is given (then ``stats`` is needed)."""
    if method == "wanda":
        metric = wanda_scores(weight, stats.sq_norm)
        mask = score_mask(metric, sparsity, pattern)
    elif method == "magnitude":
        metric = weight.detach().abs().float()
        # DSnoT from magnitude ranks per row, as its official code; plain magnitude is the layer-wide baseline
        mask = score_mask(metric, sparsity, pattern) if dsnot_settings else magnitude_prune_mask(weight, sparsity, pattern)
    else:
        raise ValueError(f"method must be 'wanda' or 'magnitude', got {method!r}")
    if dsnot_settings is None:
        return mask
    s = dsnot_settings
    # the official code orders unstructured prune candidates by the Wanda score even from a magnitude mask
    prune_metric = metric if pattern is not None or method == "wanda" else wanda_scores(weight, stats.sq_norm)
    return dsnot(weight, mask, stats.mean_sum, stats.var, prune_metric, s.max_cycle_time, s.update_threshold,
                 pattern, s.same_sign, s.pow_of_var, s.shrink_only).mask


class _Caught(Exception):
    """Raised by the hook that catches the first block's inputs, to skip the rest of the model."""


@torch.no_grad()
def prune_causal_lm(
    model: nn.Module,
    calibration: Iterable[Tensor],
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: tuple[int, int] | None = None,
    dsnot: DSnoTSettings | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Prune every Linear layer inside the decoder blocks of ``model`` in place; returns the keep-masks by name.

    Args:
        model: a transformers causal LM (embeddings and the LM head stay dense, as the official code).
        calibration: ``input_ids`` batches [B, T] (not needed for plain magnitude).
        method: 'wanda' (|W|·‖X‖ per output row) or 'magnitude' (|W|; the whole layer for unstructured).
        sparsity: the unstructured sparsity in [0, 1); ``None`` with a ``pattern``.
        pattern: ``(n, m)``: N:M sparsity instead.
        dsnot: refine the initial masks by DSnoT with these settings (``None``: no refinement).
        exclude: glob patterns of full Linear names left dense.

    Raises:
        ValueError: a bad sparsity or N:M, an unknown method, an empty calibration set when one is needed, no
            Linear layer to prune, a layer width that M does not divide; all before any weight changes.
    """
    check_sparsity_target(sparsity, pattern)
    if method not in ("wanda", "magnitude"):
        raise ValueError(f"method must be 'wanda' or 'magnitude', got {method!r}")
    exclude = tuple(exclude)
    blocks = decoder_blocks(model)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    linears = {i: {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)
                   and not any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in exclude)}
               for i, block in enumerate(blocks)}
    if not any(linears.values()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer in its decoder blocks to prune "
                         f"(exclude={list(exclude)})")
    if pattern is not None:
        for layers in linears.values():
            for layer in layers.values():
                to_groups(layer.weight, pattern[1])
    needs_data = method == "wanda" or dsnot is not None
    batches = [b for b in calibration] if needs_data else []
    if needs_data and (not batches or sum(b.shape[0] for b in batches) == 0):
        raise ValueError("the calibration set is empty: Wanda and DSnoT need input statistics (give sequences, "
                         "e.g. 128 from the training split)")
    masks: dict[str, Tensor] = {}
    if not needs_data:
        for i, layers in linears.items():
            for name, layer in layers.items():
                masks[f"{prefix}.{i}.{name}"] = _apply(layer, prune_linear(layer.weight, method, sparsity, pattern))
        return masks

    device = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    inputs: list[tuple[Tensor, dict]] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device))
            except _Caught:
                pass
    finally:
        handle.remove()
    try:
        for i, block in enumerate(blocks):
            layers = linears[i]
            stats = {name: InputStats(layer.in_features, device) for name, layer in layers.items()}
            hooks = [layer.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0]))
                     for name, layer in layers.items()]
            try:
                for hidden, kwargs in inputs:
                    block(hidden, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for name, layer in layers.items():
                skip = dsnot is not None and any(fnmatch.fnmatchcase(name, p) for p in dsnot.skip)
                mask = prune_linear(layer.weight, method, sparsity, pattern, stats[name], None if skip else dsnot)
                masks[f"{prefix}.{i}.{name}"] = _apply(layer, mask)
            inputs = [(_hidden(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return masks


def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _apply(layer: nn.Linear, mask: Tensor) -> Tensor:
    layer.weight.mul_(mask.to(layer.weight.dtype))
    return mask


def realized_sparsity(masks: dict[str, Tensor]) -> float:
    """The fraction of pruned weights over all masked layers."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1) if total else math.nan
