"""The command line: ``effitrain fit --config quickstart`` (or ``python train.py fit --config configs/X.yaml``).

A ``LightningCLI`` in subclass mode for model and data. The packaged ``trainer/default.yaml`` is loaded
before any ``--config``; a ``--config`` is a path or the name of a packaged recipe. The common callbacks are
forced sections (``checkpoint``, ``progress_bar``, ``lr_monitor``, ``finite_loss``), so a recipe's
``trainer.callbacks`` list, which replaces earlier lists, cannot drop them; the standard Trainer flags
(``enable_progress_bar``, ``enable_checkpointing``, ``logger``) still switch theirs off.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from effitrain.lightning_modules.config_files import (
    DEFAULT_TRAINER_CONFIG,
    AmbiguousConfigName,
    resolve_config_args,
)
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

FORCED_CALLBACKS = {
    "checkpoint": ModelCheckpoint,
    "progress_bar": RichProgressBar,
    "lr_monitor": LearningRateMonitor,
    "finite_loss": FiniteLossGuard,
}


def _switched_off(trainer: dict) -> set[str]:
    """The forced callbacks a standard Trainer flag turns off (Lightning refuses them beside the flag)."""
    off = set()
    if trainer.get("enable_progress_bar") is False:
        off.add("progress_bar")
    if trainer.get("enable_checkpointing") is False:
        off.add("checkpoint")
    if trainer.get("logger") is False:  # LearningRateMonitor needs a logger
        off.add("lr_monitor")
    return off


class EffitrainCLI(LightningCLI):
    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in FORCED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)

    @override
    def before_instantiate_classes(self) -> None:
        # A fixed checkpoint folder per run root, so `--ckpt_path last` finds the previous run's last.ckpt
        # (the logger's version folder changes on every launch).
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("checkpoint") is not None and config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or "."
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")

    @override
    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        off = _switched_off(trainer_config)
        forced = [config[key] for key in FORCED_CALLBACKS if key not in off and config.get(key) is not None]
        # Private in Lightning 2.5/2.6 (tests/test_compat.py names it): appends the forced callbacks and the
        # config-saving callback to the trainer's own list.
        return self._instantiate_trainer(trainer_config, forced)


def build_cli(args: list[str] | None = None, run: bool = True) -> EffitrainCLI:
    """The CLI object (tests and notebooks use this; the console script uses :func:`main`).

    ``args`` default to the command line (``sys.argv[1:]``), with each ``--config`` name resolved.
    """
    if args is None:  # resolved in place: LightningCLI warns when given `args` beside a command line
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(list(args))
    return EffitrainCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={cmd: {"default_config_files": [str(DEFAULT_TRAINER_CONFIG)]}
                       for cmd in ("fit", "validate", "test", "predict")},
        args=args, run=run,
    )


def _missing_input(err: BaseException) -> FileNotFoundError | None:
    """The FileNotFoundError behind ``err``, if any (jsonargparse re-raises a failed ``__init__`` as a
    ValueError caused by it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FileNotFoundError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """The ``effitrain`` console script: exit status 0 on success; a missing starting model or data path
    ends with one ``error:`` line naming the fix (exit status 1), not a traceback."""
    try:
        build_cli(args)
    except AmbiguousConfigName as err:
        sys.exit(f"error: {err}")
    except Exception as err:
        missing = _missing_input(err)
        if missing is None:
            raise
        sys.exit(f"error: {missing}")


if __name__ == "__main__":
    main()
