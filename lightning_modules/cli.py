"""The command line: ``python train.py fit --config configs/X.yaml`` (or the ``effitrain`` script).

A ``LightningCLI`` in subclass mode for model and data. ``configs/trainer/default.yaml`` is loaded before any
``--config``. The common callbacks are forced sections (``checkpoint``, ``progress_bar``, ``lr_monitor``,
``finite_loss``), so a recipe's ``trainer.callbacks`` list, which replaces earlier lists, cannot drop them.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.finite_loss_guard import FiniteLossGuard

DEFAULT_TRAINER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "default.yaml"


class EffitrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(FiniteLossGuard, "finite_loss")

    def before_instantiate_classes(self) -> None:
        # A fixed checkpoint folder per run root, so `--ckpt_path last` finds the previous run's last.ckpt
        # (the logger's version folder changes on every launch).
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("checkpoint") is not None and config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or "."
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")


def main(args: list[str] | None = None, run: bool = True) -> EffitrainCLI:
    defaults = [str(DEFAULT_TRAINER_CONFIG)] if DEFAULT_TRAINER_CONFIG.exists() else []
    return EffitrainCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={cmd: {"default_config_files": defaults} for cmd in ("fit", "validate", "test", "predict")},
        args=args, run=run,
    )


if __name__ == "__main__":
    main()
