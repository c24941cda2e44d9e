"""Stop a run at the first non-finite or diverging training loss, with a message that says what to try."""

from __future__ import annotations

import statistics
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint file that exists in the trainer's checkpoint folders, as words for a message."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    files = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    if not files:
        return "no checkpoint has been written yet (the run restarts from its beginning)"
    newest = max(files, key=lambda p: p.stat().st_mtime)
    return f"the last checkpoint written before is {newest} (resume with `--ckpt_path {newest}`)"


class FiniteLossGuard(L.Callback):
    """Raise as soon as a training step returns a NaN or infinite loss, or a loss that diverges.

    Divergence: the loss exceeds ``divergence_factor`` × the median of the previous ``window`` checked losses
    (after at least ``window`` of them), which a bad learning rate or a damaged state produces long before a
    NaN. Lightning then ends the run; checkpoints written before stay on disk (nothing is deleted) and the
    message names the newest one, so the run resumes from it with ``--ckpt_path`` after the cause is fixed.

    Args:
        check_every_n_steps: check every this many steps (each check synchronises with the device).
        divergence_factor: k of "loss > k × running median"; ``None`` checks finiteness only.
        window: how many recent losses the running median uses.

    Raises:
        FloatingPointError: on a non-finite or diverging loss.
    """

    def __init__(self, check_every_n_steps: int = 1, divergence_factor: float | None = 10.0, window: int = 50):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}.")
        if divergence_factor is not None and divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1 (or null to turn the check off), got {divergence_factor}.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.check_every_n_steps, self.divergence_factor, self.window = check_every_n_steps, divergence_factor, window
        self.recent: deque[float] = deque(maxlen=window)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx % self.check_every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = loss.detach().float().mean().item()
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"Non-finite training loss ({value}) at global step {trainer.global_step}. Lower the learning "
                "rate, enable gradient clipping (`trainer.gradient_clip_val`), or use `precision: 32-true` / "
                f"`bf16-mixed` instead of fp16. Checkpoints are kept: {last_good_checkpoint(trainer)}.")
        if self.divergence_factor is not None and len(self.recent) == self.window:
            median = statistics.median(self.recent)
            if median > 0 and value > self.divergence_factor * median:
                raise FloatingPointError(
                    f"The training loss diverged at global step {trainer.global_step}: {value:.4g} is more than "
                    f"{self.divergence_factor:g}x the median {median:.4g} of the last {self.window} steps. Lower "
                    "the learning rate or enable gradient clipping; if the run was resumed, its checkpoint may be "
                    f"damaged. Checkpoints are kept: {last_good_checkpoint(trainer)}. (Raise "
                    "`--finite_loss.divergence_factor`, or set it to null, to accept such jumps.)")
        self.recent.append(value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent.extend(state_dict.get("recent", []))
