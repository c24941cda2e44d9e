"""Stop a run at the first non-finite training loss, with a message that says what to try."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override


class FiniteLossGuard(L.Callback):
    """Raise as soon as a training step returns a NaN or infinite loss.

    Lightning then ends the run; checkpoints written before stay on disk (nothing is deleted), so the run
    can resume from the last good one with ``--ckpt_path last`` after the cause is fixed.

    Args:
        check_every_n_steps: check every this many steps (each check synchronises with the device).

    Raises:
        FloatingPointError: on a non-finite loss.
    """

    def __init__(self, check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx % self.check_every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            where = getattr(trainer.checkpoint_callback, "dirpath", None)
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) at global step {trainer.global_step}. Lower the learning "
                "rate, enable gradient clipping (`trainer.gradient_clip_val`), or use `precision: 32-true` / "
                f"`bf16-mixed` instead of fp16. Checkpoints already written are kept (in {where})."
            )
