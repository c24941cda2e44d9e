"""Progress in the unit a run is budgeted in, and for the long stages outside the training loop.

``StepProgressBar`` is Lightning's ``RichProgressBar`` with one bar over the whole run, counted in optimizer
steps out of ``max_steps``, when steps bound the run (Lightning's own bar restarts every epoch and reads
``Epoch 1/-2`` under a step budget). When epochs bound the run it is Lightning's bar unchanged.

``stage_progress`` wraps any loop that is not a training step (calibration passes, a search's generations,
block-by-block reconstruction), so that no stage is silent for minutes::

    from effitrain.callbacks.progress import stage_progress

    for batch in stage_progress(loader, "Calibration", total=n_batches, trainer=trainer):
        ...

On a terminal it is a Rich bar (a task of the trainer's own bar when that one is live, since Rich shows one
live display at a time); when the output is a file or a pipe it logs a line every ``log_every_s`` seconds and
one at the end. Only rank 0 shows anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typing_extensions import override

T = TypeVar("T")


def step_bounded(trainer: L.Trainer) -> bool:
    """Whether ``max_steps`` ends the run before ``max_epochs`` would."""
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is None or max_steps < 0:
        return False
    if max_epochs is None or max_epochs < 0:
        return True
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return True
    steps_per_epoch = max(1, int(batches) // max(1, trainer.accumulate_grad_batches))
    return max_steps <= max_epochs * steps_per_epoch


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` counting optimizer steps out of ``max_steps`` when the run has a step budget.

    Args:
        log_every_s: when the console is not a terminal (output to a file, a pipe, a job log), where a live
            bar shows nothing until the end, log a one-line status (step, metrics) at most this often.
        **kwargs: ``RichProgressBar``'s arguments (``refresh_rate``, ``leave``, ``theme``, ``console_kwargs``).

    Raises:
        ValueError: ``log_every_s`` is not positive.
    """

    def __init__(self, log_every_s: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        if log_every_s <= 0:
            raise ValueError(f"StepProgressBar: log_every_s must be > 0 seconds, got {log_every_s}.")
        self.log_every_s = log_every_s
        self._by_steps = False
        self._last_log = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._by_steps = step_bounded(trainer)
        self._last_log = time.monotonic()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled or self.progress is None:
            return
        description = f"Step (epoch {trainer.current_epoch})"
        if self.train_progress_bar_id is None:  # one task for the whole run: not reset at each epoch
            self.train_progress_bar_id = self.progress.add_task(description, total=trainer.max_steps,
                                                                completed=trainer.global_step)
        else:
            self.progress.update(self.train_progress_bar_id, description=description, visible=True)
        self.refresh()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.is_enabled and self.progress is not None:
            if self.train_progress_bar_id is None:  # resumed mid-epoch
                self.on_train_epoch_start(trainer, pl_module)
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()
        if self.is_enabled and not get_console().is_terminal and trainer.is_global_zero:
            now = time.monotonic()
            if now - self._last_log >= self.log_every_s:
                self._last_log = now
                rank_zero_info(self._status_line(trainer, pl_module))

    def _status_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        where = (f"step {trainer.global_step}/{trainer.max_steps}" if self._by_steps
                 else f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1}")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        return f"{where} {shown}".rstrip()


def _live_bar(trainer: L.Trainer | None) -> Progress | None:
    """The trainer's Rich progress display if it is running now (Rich allows one live display at a time)."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    progress = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
    return progress if progress is not None and progress.live.is_started else None


class StageProgress:
    """A progress display for one stage outside the training loop; a context manager.

    Args:
        description: what the stage is, e.g. ``"Block-AP calibration"``.
        total: the number of items, if known.
        trainer: the running trainer, if any: its live Rich bar receives the task, and only its rank 0 shows.
        log_every_s: on a console that is not a terminal, the interval between status lines.

    Example::

        with StageProgress("Sparsity search", total=generations, trainer=trainer) as progress:
            for generation in range(generations):
                ...
                progress.advance(note=f"best {best:.3f}")
    """

    def __init__(self, description: str, total: int | None = None, trainer: L.Trainer | None = None,
                 log_every_s: float = 30.0):
        self.description, self.total, self.log_every_s = description, total, log_every_s
        self.enabled = trainer.is_global_zero if trainer is not None else rank_zero_only.rank == 0
        self._live = _live_bar(trainer)
        self._own: Progress | None = None
        self._progress: Progress | None = None
        self._task = None
        self.done = 0

    def __enter__(self) -> StageProgress:
        self._start = self._last = time.monotonic()
        if not self.enabled:
            return self
        if not get_console().is_terminal:  # a file or a pipe, where a live bar shows nothing: status lines
            self._live = None
            rank_zero_info(f"{self.description}: started ({self.total if self.total is not None else '?'} to do)")
            return self
        if self._live is None:
            self._own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=get_console())
            self._own.start()
        self._progress = self._live or self._own
        self._task = self._progress.add_task(self.description, total=self.total, note="")
        return self

    def advance(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more items done; ``note`` (e.g. the best score so far) is shown beside the bar."""
        self.done += n
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, advance=n, note=note)
            self._progress.refresh()
            return
        now = time.monotonic()
        if now - self._last >= self.log_every_s:
            self._last = now
            of = f"/{self.total}" if self.total is not None else ""
            rank_zero_info(f"{self.description}: {self.done}{of} ({now - self._start:.0f} s) {note}".rstrip())

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self._own is not None:
            self._own.stop()
        elif self._progress is not None:
            self._progress.remove_task(self._task)
        of = f"/{self.total}" if self.total is not None else ""
        if self._own is None:  # the trainer's bar drops the task, and a log has no bar: say that it ended
            rank_zero_info(f"{self.description}: {self.done}{of} done in {time.monotonic() - self._start:.1f} s")


def stage_progress(iterable: Iterable[T], description: str, total: int | None = None,
                   trainer: L.Trainer | None = None, log_every_s: float = 30.0) -> Iterator[T]:
    """Yield from ``iterable`` inside a :class:`StageProgress` that advances by one per item.

    ``total`` defaults to ``len(iterable)`` when it has one; the other arguments are :class:`StageProgress`'s.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with StageProgress(description, total, trainer, log_every_s) as progress:
        for item in iterable:
            yield item
            progress.advance()
