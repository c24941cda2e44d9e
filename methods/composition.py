"""Checks and helpers for chaining compression methods: prune (Wanda / DSnoT) → Block-AP → E2E-QP on one model,
and adapters on a packed low-bit base.

Sparse + low-bit (EfficientQAT, arXiv 2407.11062, Eq. 1-2, with a fixed pruning mask). The packed format
(GPTQ v2 tensors) stores per weight a code ``q`` and per group an integer zero point ``z`` and a step ``s``;
the weight is ``(q - z) * s``. A pruned weight is exactly zero after dequantization iff its code equals its
group's zero point, and since ``z`` is itself an integer in [0, 2^N - 1] the packed format represents that
with no extra tensor and no extra bit. Block-AP keeps the mask by quantizing ``W ⊙ m`` instead of ``W``:
``round(0 / s) + z = z``, so every pruned code is the zero point; the gradient of a pruned weight is 0, so it
stays 0. E2E-QP then trains only ``s`` with the codes frozen: ``dW/ds = q - z = 0`` at pruned weights, which
stay exactly 0 at every step (no mask needed there; the recipe's ``keep_mask`` checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the file the pruning recipe (and, with ``keep_mask``, the quantization recipes) write next to the weights
SPARSITY_FILE = "sparsity.json"


def packed_quantization(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of a local model folder (a packed low-bit model), else None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    qcfg = json.loads(config.read_text()).get("quantization_config")
    return qcfg if isinstance(qcfg, dict) and "bits" in qcfg else None


def refuse_packed_base(pretrained: str | None, recipe: str) -> None:
    """Fail before training when a recipe that updates the weights is given a packed low-bit model."""
    if pretrained is None:
        return
    qcfg = packed_quantization(Path(pretrained).expanduser())
    if qcfg is None:
        return
    raise ValueError(
        f"{pretrained} is a packed {qcfg['bits']}-bit model (quantization_config in config.json): its block "
        f"weights are frozen integer codes that {recipe} would have to update. Train its step sizes with "
        "effitrain.lightning_modules.efficientqat_e2e_qp.EfficientQATE2EQP, or an adapter on the frozen packed "
        "base with effitrain.lightning_modules.adapter_lm.AdapterCausalLM; or start from the full-precision "
        "folder it was made from.")


def sparsity_summary(folder: str | Path) -> dict | None:
    """The pruning summary of a model folder (``sparsity.json``: method, sparsity, pattern, per layer), if any."""
    path = Path(folder) / SPARSITY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_pattern_fits_groups(pattern: str | None, group_size: int, in_features: dict[str, int]) -> None:
    """An N:M mask kept through quantization needs M to divide the quantization group size: each block of M
    inputs must lie in one group, so that every group holds a whole number of N:M blocks (what sparse low-bit
    kernels read: per group, N codes and their positions in each block of M)."""
    if not pattern:
        return
    m = int(str(pattern).split(":")[1])
    for name, fan_in in in_features.items():
        g = fan_in if group_size <= 0 else group_size
        if g % m:
            raise ValueError(
                f"The pruned model has an {pattern} pattern but the quantization group size is {g} (layer {name}): "
                f"M={m} does not divide it, so N:M blocks would straddle two quantization groups. Choose a "
                f"group_size that is a multiple of {m}, or prune with an M that divides {g}.")


def zero_masks(named_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = nonzero) read from the zeros of a pruned model's weights."""
    return {name: w.detach() != 0 for name, w in named_weights.items()}


def zero_fraction(weights: list[torch.Tensor]) -> float:
    """The fraction of exact zeros over several weight tensors."""
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return zeros / max(total, 1)
