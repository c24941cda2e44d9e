"""The command line: ``effitrain fit --config quickstart`` (or ``python train.py fit --config configs/X.yaml``).

A ``LightningCLI`` in subclass mode for model and data. The packaged ``trainer/default.yaml`` is loaded
before any ``--config``; a ``--config`` is a path or the name of a packaged recipe. The common callbacks are
forced sections (``checkpoint``, ``progress_bar``, ``model_summary``, ``lr_monitor``, ``finite_loss``,
``summary``), so a recipe's ``trainer.callbacks`` list, which replaces earlier lists, cannot drop them; the
standard Trainer flags (``enable_progress_bar``, ``enable_checkpointing``, ``enable_model_summary``, ``logger``)
still switch theirs off. ``effitrain recipes`` lists the packaged recipes (also shown by ``fit --help``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import NoReturn

import lightning as L
import yaml
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from effitrain.callbacks.last_checkpoint import LastCheckpoint
from effitrain.callbacks.model_summary import RunModelSummary
from effitrain.callbacks.progress import StepProgressBar
from effitrain.callbacks.run_summary import RunSummary
from effitrain.lightning_modules.artifacts import consuming_configs, recipe_subcommand
from effitrain.lightning_modules.base import TrainModule
from effitrain.lightning_modules.config_files import (
    DEFAULT_TRAINER_CONFIG,
    format_recipe_catalog,
    recipe_name,
    resolve_config_args,
)
from effitrain.lightning_modules.console import quiet_known_warnings
from effitrain.lightning_modules.resume import check_same_recipe, load_checkpoint, resolve_ckpt_path
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torchmetrics import Metric
from typing_extensions import override

FORCED_CALLBACKS = {
    "checkpoint": ModelCheckpoint,
    "last_checkpoint": LastCheckpoint,
    "progress_bar": StepProgressBar,
    "model_summary": RunModelSummary,
    "lr_monitor": LearningRateMonitor,
    "finite_loss": FiniteLossGuard,
    "summary": RunSummary,  # after progress_bar: the bar is stopped before the summary prints
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the recipe list (the epilog) kept as written."""


def _switched_off(trainer: dict) -> set[str]:
    """The forced callbacks a standard Trainer flag turns off (Lightning refuses them beside the flag)."""
    off = set()
    if trainer.get("enable_progress_bar") is False:
        off.add("progress_bar")
    if trainer.get("enable_checkpointing") is False:
        off |= {"checkpoint", "last_checkpoint"}
    if trainer.get("enable_model_summary") is False:
        off.add("model_summary")
    if trainer.get("logger") is False:  # LearningRateMonitor needs a logger
        off.add("lr_monitor")
    return off


class EffitrainParser(LightningArgumentParser):
    """Parser errors print the message first and a two-line usage, not the full option list."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\nusage: {prog} --config RECIPE [--section.key=value ...]   "
                         f"(every option: {prog} --help)\n")
        sys.exit(2)


def _checkpoint_dir(config) -> str:
    return os.path.join(config.trainer.default_root_dir or ".", "checkpoints")


class EffitrainCLI(LightningCLI):
    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the command line's recipe instead of Lightning's default, which takes
        the model's class and arguments from the checkpoint over the command line's (Lightning 2.5/2.6;
        tests/test_cli_resume.py names it). The command line's config is kept as given."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if not config.get("ckpt_path"):
            return
        path = resolve_ckpt_path(config.ckpt_path, (config.get("checkpoint") or {}).get("dirpath")
                                 or _checkpoint_dir(config))
        if path is None:
            return
        config.ckpt_path = path
        if Path(path).is_dir():  # a sharded checkpoint (torch.distributed.checkpoint): Lightning's strategy reads it
            return
        checkpoint = load_checkpoint(path)
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        model = dump[self.config.subcommand]["model"]
        class_path = model["class_path"]
        module, _, name = class_path.rpartition(".")
        model_class = getattr(__import__(module, fromlist=[name]), name, None)
        run_args = getattr(model_class, "run_args", TrainModule.run_args)
        check_same_recipe(checkpoint, path, class_path, model.get("init_args") or {}, run_args)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in FORCED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)

    @override
    def before_instantiate_classes(self) -> None:
        # A fixed checkpoint folder per run root, so `--ckpt_path last` finds the previous run's last.ckpt
        # (the logger's version folder changes on every launch).
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in ("checkpoint", "last_checkpoint"):
            if config.get(key) is not None and config[key].dirpath is None:
                config[key].dirpath = (config.get("checkpoint") or {}).get("dirpath") or _checkpoint_dir(config)

    @override
    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        off = _switched_off(trainer_config)
        forced = [config[key] for key in FORCED_CALLBACKS if key not in off and config.get(key) is not None]
        # Private in Lightning 2.5/2.6 (tests/test_compat.py names it): appends the forced callbacks and the
        # config-saving callback to the trainer's own list.
        return self._instantiate_trainer(trainer_config, forced)

    def before_fit(self) -> None:
        """Give the run summary the next commands, and validate the starting model when it asks for it."""
        summary = next((cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)), None)
        if summary is None:
            return
        if not summary.next_commands:
            summary.next_commands = next_commands(self.model)
        resuming = self.config_init[self.subcommand].get("ckpt_path") is not None  # the baseline is in it
        if (summary.baseline and summary.baseline_metrics is None and not resuming
                and self.trainer.limit_val_batches != 0 and is_overridden("validation_step", self.model)):
            rank_zero_info("Validating the starting model, for the run summary (summary.baseline: false skips it)")
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            # validate ran under inference mode: metric states reset there are inference tensors, which the
            # training-time validation could not update in place
            for module in self.model.modules():
                if isinstance(module, Metric):
                    module.reset()


def next_commands(model: L.LightningModule) -> list[str]:
    """``effitrain fit`` (or ``validate``, for training-free recipes) commands of the CPU recipes that start from
    what ``model`` writes."""
    outputs = model.written_outputs() if hasattr(model, "written_outputs") else {}
    commands = []
    for folder in outputs.values():
        for config in consuming_configs(folder) if folder else []:
            command = f"effitrain {recipe_subcommand(config)} --config {recipe_name(config)}"
            if "full" not in config.parts and command not in commands:
                commands.append(command)
    return commands


def import_recipe_classes() -> None:
    """Import every recipe and data module, so that ``--model NAME`` / ``--model.help NAME`` take short names."""
    import effitrain.datamodules
    import effitrain.lightning_modules

    for package in (effitrain.lightning_modules, effitrain.datamodules):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


def build_cli(args: list[str] | None = None, run: bool = True) -> EffitrainCLI:
    """The CLI object (tests and notebooks use this; the console script uses :func:`main`)."""
    quiet_known_warnings()
    import_recipe_classes()
    if args is None:  # resolved in place: LightningCLI warns when given `args` beside a command line
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(list(args))
    catalog = format_recipe_catalog()
    return EffitrainCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, parser_class=EffitrainParser,
        parser_kwargs={"formatter_class": _HelpFormatter,  # subcommand parsers take the main parser's
                       **{cmd: {"default_config_files": [str(DEFAULT_TRAINER_CONFIG)], "epilog": catalog}
                          for cmd in ("fit", "validate", "test", "predict")}},
        args=args, run=run,
    )


#: Errors about the user's input or run, reported as one message (``EFFITRAIN_TRACEBACK=1`` shows the traceback).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError)


def main(args: list[str] | None = None) -> None:
    """The ``effitrain`` console script: exit status 0 on success; a bad input or a failed run ends with one
    message (printed once, with no traceback).

    ``effitrain recipes`` lists the packaged recipes; every other command goes to the LightningCLI.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["recipes"], ["list"]):
        print(format_recipe_catalog())
        return
    try:
        build_cli(args)
    except USER_ERRORS as err:
        if os.environ.get("EFFITRAIN_TRACEBACK"):
            raise
        while isinstance(err.__cause__, USER_ERRORS):  # the constructor's own error, not the parser's wrapper
            err = err.__cause__
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
