"""EfficientQAT phase 2, E2E-QP (Chen et al., arXiv 2407.11062, Sec. 3.3): end-to-end training of the
quantization step sizes of a packed model on the causal-LM loss.

    python train.py fit --config configs/efficientqat/efficientqat_e2e_qp.yaml    # starts from the Block-AP folder

The integer codes (``qweight``) and zero points (``qzeros``) stay frozen int32 buffers; embeddings, norms and
the LM head are frozen; only every ``QuantLinear.scales`` trains, upcast to fp32 (the gradient through the
dequantization ``W = (q - z) s`` is ``q - z``). The written folder keeps the packed layout, so the model's
size on disk is unchanged. Paper: AdamW, wd 0, lr 2e-5 (2-bit) / 1e-5 (3/4-bit), cosine, 3 % warmup,
gradient clipping 0.3, one epoch of 4096 x 4096-token RedPajama samples.

Optionally (not in the paper, which trains on CE alone) the packed student distils from the floating-point
model it was quantized from: ``loss = (1 − kd_ratio)·CE + kd_ratio·KD`` with KD any
``effitrain.methods.distillation`` objective (``ForwardKL``, ``ReverseKL``, ``AdaptiveKL``, ...), as ``DistillLM``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from effitrain.lightning_modules.artifacts import require_local_model
from effitrain.lightning_modules.causal_lm import CausalLM
from effitrain.lightning_modules.teacher import (
    check_teacher,
    check_teacher_tokenizer,
    load_teacher,
    teacher_logits,
)
from effitrain.methods.composition import SPARSITY_FILE, sparsity_summary, zero_fraction
from effitrain.methods.distillation import DistillationLoss
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
        distill_loss: a KD objective to distil from ``teacher`` (default ``None``: plain CE, as the paper).
        teacher: the floating-point model's folder (e.g. the one Block-AP started from), loaded frozen.
        kd_ratio: weight of KD in (1 − kd_ratio)·CE + kd_ratio·KD, used only with ``distill_loss``.
        teacher_dtype: load the teacher in lower precision (``bfloat16``, ``float16``).

        keep_mask: the base was pruned and packed with Block-AP's ``keep_mask``: its zeros stay exactly zero here
            by construction (a pruned code equals its zero point, and dW/ds = q - z = 0), which the export checks
            before writing, and the ``sparsity.json`` is carried into the written folder.

    Raises:
        ValueError: ``kd_ratio`` outside [0, 1]; ``distill_loss`` without ``teacher`` (or the reverse); a teacher
            whose vocabulary differs from the packed model's.
    """

    sharding_refusal = (
        "the packed model's integer codes and zero points are buffers, which FSDP2 does not shard (every rank "
        "would still hold the whole packed model), and the trainable step sizes are 1/group_size of the weights; "
        "a 2-bit 7B model fits one GPU: use DDP (configs/trainer/ddp.yaml) for data parallelism.")
    export_kind = "packed"  # the run summary's name for export_dir

    def __init__(self, pretrained: str, gradient_checkpointing: bool = False,
                 optimizer: OptimizerCallable = adamw_e2e, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False,
                 distill_loss: DistillationLoss | None = None, teacher: str | None = None, kd_ratio: float = 0.5,
                 teacher_dtype: str | None = None, keep_mask: bool = False):
        require_local_model(pretrained, "packed Block-AP model")
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must lie in [0, 1] (loss = (1 - kd_ratio)·CE + kd_ratio·KD), got {kd_ratio}.")
        if (distill_loss is None) != (teacher is None):
            raise ValueError("E2E-QP distils only with both `distill_loss` and `teacher` (the floating-point model's "
                             f"folder); got distill_loss={distill_loss!r}, teacher={teacher!r}. Set both, or neither "
                             "for plain CE.")
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
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "distill_loss"])
        self.distill_loss, self.kd_ratio, self.teacher_name = distill_loss, kd_ratio, teacher
        # A plain list hides the teacher from nn.Module's registry: not in parameters(), state_dict() or DDP.
        self._teacher = [load_teacher(teacher, dtype=teacher_dtype)] if teacher is not None else []
        check_teacher(self.teacher, self.model)

        self.sparsity = sparsity_summary(pretrained) if keep_mask else None
        if keep_mask and self.sparsity is None:
            raise ValueError(f"keep_mask=True but {pretrained} has no {SPARSITY_FILE}: pack the pruned model with "
                             "Block-AP's keep_mask=True first (configs/compose/sparse_block_ap.yaml).")
        # The codes and zero points are frozen buffers, so the (q == z) positions, which hold the pruned weights,
        # are those of the base; their count is kept to check at export that every one of them is still 0.
        self.zero_codes = sum(int(self._zero_code_mask(m).sum()) for m in self.quant_layers) if keep_mask else None


    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        check_teacher_tokenizer(self.teacher_name, tokenizer)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """CE (the paper), or (1 − kd_ratio)·CE + kd_ratio·KD on the shifted pairs when distilling."""
        if self.distill_loss is None:
            return super().training_step(batch, batch_idx)
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        kd = self.distill_loss(logits, teacher_logits(self.teacher, batch)[:, :-1], labels, epoch=self.current_epoch)
        loss = (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/ce": ce, "train/kd": kd})
        return loss

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
