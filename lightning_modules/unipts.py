"""Post-training sparsity by distillation from the dense model (UniPTS, Xie et al., CVPR 2024).

The student is the ``ImageClassifier``'s network, started from a dense trained model (``pretrained``) and
made sparse by the ``DynamicSparsity`` callback (per-layer sparsities from ``SparsitySearch``). The teacher
is a frozen copy of that dense model, taken before any mask: it is no submodule, so it is neither in the
optimizer nor in the checkpoint (it is rebuilt from ``pretrained`` on resume). The only loss is UniPTS's
base-decayed objective (``effitrain.methods.distillation``, Sec. 3.1); labels are used for the validation metrics.
Any other objective of ``effitrain.methods.distillation`` plugs in through ``distill_loss`` (e.g. ``AdaptiveKL``).

Run::

    python train.py fit --config configs/pretrain/image_quickstart_resnet.yaml   # the dense model (artifacts/)
    python train.py fit --config configs/unipts/unipts.yaml                    # search + distillation at 90%
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from effitrain.lightning_modules.image_classifier import ImageClassifier
from effitrain.methods.distillation import BaseDecayedKL, DistillationLoss, HintonKL
from lightning.pytorch.utilities import rank_zero_warn

Objective = Literal["base_decayed", "kl", "ce"]


class SparseDistillClassifier(ImageClassifier):
    """An image classifier trained on the soft labels of its own dense starting point.

    Args:
        objective: ``base_decayed`` (UniPTS: (T²/B)·Σ p_t[ln p_t − ln p_s/τ_e], τ_e = initial_base·base_decay^epoch,
            no temperature on the student), ``kl`` (Hinton's T²·KL at temperature T on both sides) or ``ce``
            (plain cross-entropy on the labels, no teacher: the fine-tuning baseline).
        temperature: T of the teacher's softmax (UniPTS: 4).
        initial_base, base_decay: τ_0 and γ of τ_e = τ_0·γ^epoch (UniPTS: 8, 0.99).
        distill_loss: any ``effitrain.methods.distillation`` objective (``ForwardKL``, ``ReverseKL``,
            ``AdaptiveKL``, ...); replaces the one ``objective`` names (the temperature/base arguments then
            play no part).
        teacher_train_mode: run the frozen teacher in train mode (batch statistics in BatchNorm), as the
            official code does; ``False`` uses its running statistics.
        **kwargs: ``ImageClassifier`` arguments (``model_name``, ``pretrained``, ``optimizer``, ...).

    Raises:
        ValueError: an unknown objective, a non-positive temperature / base, or ``distill_loss`` with
            ``objective: ce`` (which has no teacher).
    """

    def __init__(self, objective: Objective = "base_decayed", temperature: float = 4.0, initial_base: float = 8.0,
                 base_decay: float = 0.99, teacher_train_mode: bool = True,
                 distill_loss: DistillationLoss | None = None, **kwargs: Any):
        if objective not in ("base_decayed", "kl", "ce"):
            raise ValueError(f"objective must be 'base_decayed', 'kl' or 'ce', got {objective!r}.")
        if objective == "ce" and distill_loss is not None:
            raise ValueError("objective 'ce' trains on labels without a teacher, so `distill_loss` has nothing to "
                             "distil: drop one of the two.")
        if distill_loss is None and objective != "ce":
            distill_loss = (BaseDecayedKL(temperature, initial_base, base_decay) if objective == "base_decayed"
                            else HintonKL(temperature))
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "distill_loss"])
        self.objective, self.distill_loss, self.teacher_train_mode = objective, distill_loss, teacher_train_mode
        if objective != "ce" and kwargs.get("pretrained") is None:
            rank_zero_warn("SparseDistillClassifier without `pretrained`: the teacher is an untrained network.")
        # A plain list hides the teacher from nn.Module's registry: no parameters(), no state_dict(), no DDP.
        self._teacher = [copy.deepcopy(self.model).requires_grad_(False)] if objective != "ce" else []

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        teacher.train(self.teacher_train_mode)
        return teacher(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None and len(images) % 2 == 0:
            images, targets = self.mixup(images, targets)
        logits = self(images)
        if self.distill_loss is None:
            loss = self.loss(logits, targets)
        else:
            loss = self.distill_loss(logits, self.teacher_logits(images), epoch=self.current_epoch)
            if isinstance(self.distill_loss, BaseDecayedKL):
                self.log("train/base_tau", self.distill_loss.base(self.current_epoch))
        self.log("train/loss", loss, prog_bar=True)
        if targets.ndim == 1:
            self.log("train/acc", (logits.argmax(-1) == targets).float().mean())
        return loss


__all__ = ["SparseDistillClassifier"]
