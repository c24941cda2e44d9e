"""EfficientQAT phase 2, E2E-QP (Chen et al., arXiv 2407.11062, Sec. 3.3): end-to-end training of the
quantization step sizes of a packed model on the causal-LM loss.

    python train.py fit --config configs/efficientqat/efficientqat_e2e_qp.yaml    # starts from the Block-AP folder

The integer codes (``qweight``) and zero points (``qzeros``) stay frozen int32 buffers; embeddings, norms and
the LM head are frozen; only every ``QuantLinear.scales`` trains, upcast to fp32 (the gradient through the
dequantization ``W = (q - z) s`` is ``q - z``). The written folder keeps the packed layout, so the model's
size on disk is unchanged. Paper: AdamW, wd 0, lr 2e-5 (2-bit) / 1e-5 (3/4-bit), cosine, 3 % warmup,
gradient clipping 0.3, one epoch of 4096 x 4096-token RedPajama samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from effitrain.lightning_modules.artifacts import require_local_model
from effitrain.lightning_modules.causal_lm import CausalLM
from effitrain.methods.composition import SPARSITY_FILE, sparsity_summary, zero_fraction
from effitrain.methods.gptq_format import load_quantized, save_quantized
from effitrain.methods.quantization import QuantLinear
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override


def adamw_e2e(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)


class EfficientQATE2EQP(CausalLM):
    """E2E-QP: train only the step sizes of a packed low-bit causal LM.

    Args:
        pretrained: a folder written by the Block-AP recipe (or ``effitrain.methods.gptq_format.save_quantized``).
        gradient_checkpointing: recompute activations in the backward pass (large models).
        optimizer, lr_scheduler: as for every recipe; the parameters are the scales only.
        export_dir: where the packed model with the trained scales is written.
        keep_mask: the base was pruned and packed with Block-AP's ``keep_mask``: its zeros stay exactly zero here
            by construction (a pruned code equals its zero point, and dW/ds = q - z = 0), which the export checks
            before writing, and the ``sparsity.json`` is carried into the written folder.
    """

    sharding_refusal = (
        "the packed model's integer codes and zero points are buffers, which FSDP2 does not shard (every rank "
        "would still hold the whole packed model), and the trainable step sizes are 1/group_size of the weights; "
        "a 2-bit 7B model fits one GPU: use DDP (configs/trainer/ddp.yaml) for data parallelism.")
    export_kind = "packed"  # the run summary's name for export_dir

    def __init__(self, pretrained: str, gradient_checkpointing: bool = False,
                 optimizer: OptimizerCallable = adamw_e2e, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False, keep_mask: bool = False):
        require_local_model(pretrained, "packed Block-AP model")
        super().__init__(pretrained=pretrained, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, export_dir=export_dir, overwrite_export=overwrite_export)
        self.model.requires_grad_(False)
        self.quant_layers = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        if not self.quant_layers:
            raise ValueError(f"{pretrained!r} holds no QuantLinear layers: E2E-QP needs a packed model.")
        for layer in self.quant_layers:
            layer.scales.data = layer.scales.data.float()
            layer.scales.requires_grad_(True)
        self.bits, self.group_size = self.quant_layers[0].bits, self.quant_layers[0].group_size
        self.sparsity = sparsity_summary(pretrained) if keep_mask else None
        if keep_mask and self.sparsity is None:
            raise ValueError(f"keep_mask=True but {pretrained} has no {SPARSITY_FILE}: pack the pruned model with "
                             "Block-AP's keep_mask=True first (configs/compose/sparse_block_ap.yaml).")
        # The codes and zero points are frozen buffers, so the (q == z) positions, which hold the pruned weights,
        # are those of the base; their count is kept to check at export that every one of them is still 0.
        self.zero_codes = sum(int(self._zero_code_mask(m).sum()) for m in self.quant_layers) if keep_mask else None

    @staticmethod
    def _zero_code_mask(layer: QuantLinear) -> torch.Tensor:
        return (layer.codes() == layer.zeros()[layer.g_idx.long()]).t()

    def load_model(self, pretrained: str, config: dict[str, Any] | None, trust_remote_code: bool,
                   dtype: str | None) -> torch.nn.Module:
        """The packed model with ``QuantLinear`` blocks (``load_quantized``), not transformers' loader."""
        return load_quantized(pretrained)

    def param_groups(self) -> list[torch.nn.Parameter]:
        return [layer.scales for layer in self.quant_layers]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for key, value in checkpoint["state_dict"].items():  # scales were trained in fp32
            if key.endswith(".scales"):
                checkpoint["state_dict"][key] = value.float()

    @override
    def save_export(self, folder: Path) -> None:
        """The packed model with fp16 scales (``save_quantized``) and the data's tokenizer."""
        if self.zero_codes is not None:
            masks = [self._zero_code_mask(layer) for layer in self.quant_layers]
            if sum(int(m.sum()) for m in masks) != self.zero_codes or any(
                    layer.dequantize(torch.float32)[m].any() for layer, m in zip(self.quant_layers, masks, strict=True)):
                raise RuntimeError("A pruned weight became nonzero during E2E-QP: the codes must stay frozen.")
        save_quantized(self.model, folder, self.bits, self.group_size)
        self.save_tokenizer(folder)
        if self.sparsity is not None:
            kept = zero_fraction([layer.dequantize(torch.float32) for layer in self.quant_layers])
            Path(folder, SPARSITY_FILE).write_text(json.dumps(
                {**self.sparsity, "quantized_block_sparsity": kept,
                 "kept_through": [*self.sparsity.get("kept_through", []), "e2e_qp"]}, indent=1))
