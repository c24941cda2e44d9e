"""``last.ckpt`` every N steps, every T minutes and at the end of training, whatever the validation interval."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` at most ``every_n_train_steps`` steps or ``every_n_minutes`` minutes old.

    A kill (preemption, OOM killer, Ctrl-C twice) then loses at most that interval: ``--ckpt_path last`` resumes
    from it. The file is written beside and renamed into place, so a kill while writing leaves the previous one
    intact. As a ``Checkpoint`` it runs after the other callbacks of a step, so their state is the step's.

    Args:
        dirpath: the folder; ``None`` uses the ``ModelCheckpoint``'s folder (``<default_root_dir>/checkpoints``).
        every_n_train_steps: save every this many optimizer steps (``0``: not by steps).
        every_n_minutes: save when this much time passed since the last save (``None``: not by time).
        filename: the file's name (Lightning's ``--ckpt_path last`` looks for ``last*.ckpt``).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 50,
                 every_n_minutes: float | None = 10.0, filename: str = "last.ckpt"):
        if every_n_train_steps < 0 or (every_n_minutes is not None and every_n_minutes <= 0):
            raise ValueError(f"Need every_n_train_steps >= 0 and every_n_minutes > 0 (or null), got "
                             f"{every_n_train_steps} and {every_n_minutes}.")
        self.dirpath, self.filename = dirpath, filename
        self.every_n_train_steps, self.every_n_minutes = every_n_train_steps, every_n_minutes
        self._last_time = time.monotonic()
        self._saved_step = -1

    def path(self, trainer: L.Trainer) -> Path:
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or os.path.join(trainer.default_root_dir, "checkpoints")) / self.filename

    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint now (a collective: every rank calls it)."""
        target = self.path(trainer)
        partial = target.with_name(f".{target.name}.partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the full state, to resume
        if trainer.is_global_zero:
            os.replace(partial, target)
        trainer.strategy.barrier("last_checkpoint")
        self._saved_step, self._last_time = trainer.global_step, time.monotonic()

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.global_step == self._saved_step

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step, self._last_time = trainer.global_step, time.monotonic()  # a resume starts at its file

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._skip(trainer):
            return
        by_steps = self.every_n_train_steps > 0 and trainer.global_step % self.every_n_train_steps == 0
        by_time = (self.every_n_minutes is not None
                   and time.monotonic() - self._last_time >= 60 * self.every_n_minutes)
        if by_steps or trainer.strategy.broadcast(by_time):
            self.save(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._skip(trainer):
            self.save(trainer)
