"""Knowledge distillation for causal LMs: a frozen teacher, a trainable student, a pluggable token-level KD loss.

The recipe of the AKL paper (Wu et al., arXiv 2404.02657) on MiniLLM's trainer (``minillm/finetune.py``):

    loss = (1 − kd_ratio) · CE(student, labels) + kd_ratio · KD(student, teacher)

over the response tokens (prompt tokens carry label −100, as ``InstructionDataModule`` makes them), with KD
any ``effitrain.methods.distillation`` objective: ``ForwardKL``, ``ReverseKL`` or ``AdaptiveKL`` (the
paper's; μ = 0.5), token-mean reduced. ``kd_ratio: 0`` is plain supervised fine-tuning (no teacher forward).
Validation reports the token loss and perplexity (``val/loss``, ``val/ppl``) and the quality of greedy answers
to held-out prompts (``val/rougeL``, ``val/exact_match``).

Run (the testbed; docs/akl.md)::

    python train.py fit --config configs/pretrain/quickstart.yaml        # artifacts/tiny_llama
    python train.py fit --config configs/akl/arith_teacher.yaml          # the teacher: artifacts/arith_teacher
    python train.py fit --config configs/akl/distill_akl.yaml            # a 1.5M student distilled with AKL
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from effitrain.lightning_modules.base import adamw
from effitrain.lightning_modules.causal_lm import CausalLM
from effitrain.lightning_modules.generation import AnswerQuality
from effitrain.lightning_modules.teacher import (
    check_teacher,
    check_teacher_tokenizer,
    load_teacher,
    teacher_logits,
)
from effitrain.methods.distillation import AdaptiveKL, DistillationLoss
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override


class DistillLM(CausalLM):
    """A causal-LM student trained on labels and on a frozen teacher's token distributions.

    Args:
        teacher: the teacher's folder or hub name (loaded frozen, in eval mode), or an ``nn.Module`` whose
            parameters are already frozen; ``None`` only with ``kd_ratio: 0``.
        teacher_dtype: load the teacher in lower precision (``bfloat16``, ``float16``); the KD loss upcasts.
        distill_loss: the KD objective (default ``AdaptiveKL(mu=0.5)``).
        kd_ratio: weight of KD in (1 − kd_ratio)·CE + kd_ratio·KD (MiniLLM's ``kd_base.sh``: 0.5).
        max_new_tokens, generate_examples: greedy answers to this many held-out prompts per validation, each
            up to ``max_new_tokens`` tokens (``generate_examples: 0`` turns generation off).
        pretrained, config, ...: the student, as in ``CausalLM``.

    Raises:
        ValueError: ``kd_ratio`` outside [0, 1]; no teacher while ``kd_ratio > 0``; a teacher whose vocabulary
            or tokenizer differs from the student's; a teacher with trainable parameters.
    """

    def __init__(self, teacher: str | torch.nn.Module | None = None, teacher_dtype: str | None = None,
                 distill_loss: DistillationLoss | None = None, kd_ratio: float = 0.5,
                 max_new_tokens: int = 32, generate_examples: int = 64,
                 pretrained: str | None = None, config: dict[str, Any] | None = None,
                 trust_remote_code: bool = False, dtype: str | None = None, gradient_checkpointing: bool = False,
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False):
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must lie in [0, 1] (loss = (1 - kd_ratio)·CE + kd_ratio·KD), got {kd_ratio}.")
        if teacher is None and kd_ratio > 0:
            raise ValueError(f"kd_ratio={kd_ratio} needs a `teacher` (a model folder or hub name); "
                             "set kd_ratio: 0 for supervised fine-tuning without one.")
        super().__init__(pretrained, config, trust_remote_code, dtype, gradient_checkpointing, optimizer,
                         lr_scheduler, export_dir, overwrite_export,
                         task_eval_size=0)  # answers are scored by AnswerQuality below, not CausalLM's task metric
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "teacher", "distill_loss"])
        self.kd_ratio = kd_ratio
        self.distill_loss = distill_loss if distill_loss is not None else AdaptiveKL(mu=0.5)
        self.teacher_name = teacher if isinstance(teacher, str) else None
        teacher = load_teacher(teacher, trust_remote_code, teacher_dtype)
        # A plain list hides the teacher from nn.Module's registry: not in parameters(), state_dict() or DDP.
        self._teacher = [teacher] if teacher is not None else []
        self.check_teacher()
        self.answers = AnswerQuality(max_new_tokens, generate_examples) if generate_examples > 0 else None

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def check_teacher(self) -> None:
        """The teacher is frozen and speaks the student's vocabulary (raises ValueError otherwise)."""
        check_teacher(self.teacher, self.model)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.check_teacher()
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        check_teacher_tokenizer(self.teacher_name, tokenizer)

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return teacher_logits(self.teacher, batch)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CE and (when kd_ratio > 0) KD on the shifted pairs (logit at t, label at t + 1), and their mix."""
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        out = {"ce": ce, "loss": ce}
        if self.kd_ratio > 0:
            teacher = self.teacher_logits(batch)[:, :-1]
            out["kd"] = self.distill_loss(logits, teacher, labels, epoch=self.current_epoch)
            out["loss"] = (1.0 - self.kd_ratio) * ce + self.kd_ratio * out["kd"]
        return out

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/ce", out["ce"])
        if "kd" in out:
            self.log("train/kd", out["kd"])
        return out["loss"]

    @override
    def on_validation_epoch_start(self) -> None:
        if self.answers is not None:
            self.answers.reset()

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if self.answers is not None and tokenizer is not None:
            self.answers.update(self.model, batch, tokenizer)

    @override
    def on_validation_epoch_end(self) -> None:
        if self.answers is not None and self.answers.seen:
            for name, value in self.answers.compute().items():
                self.log(f"val/{name}", value, prog_bar=name == "exact_match")


__all__ = ["DistillLM"]
