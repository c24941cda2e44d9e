"""The end-of-run summary: how good the result is, against what, where it was written, and what comes next.

At the end of ``fit``, rank 0 prints and writes ``<default_root_dir>/summary.json``:

- the final and best value of every validation metric (``val/...``), the monitored one first, next to the
  starting model's value when there is one (``val/ppl 9.74 (base 155.6)``). The starting model's values
  come from a validation run before training: ``trainer.validate(model, data)`` then ``trainer.fit(...)``
  (the CLI does it for recipes that set ``summary.baseline: true``), or from ``baseline_metrics``;
- what the recipe wrote, with sizes: the module's ``written_outputs()`` (kind -> folder, e.g.
  ``{"adapter": ..., "merged": ...}``; see ``TrainModule.written_outputs``), plus the best and last checkpoints;
- ``next_commands``: the recipes that start from what this one wrote (the CLI fills them in).

The summary is printed in ``teardown``, after the recipe's own ``on_fit_end`` has exported its model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from rich import get_console
from typing_extensions import override

LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "mse", "bpc")


def lower_is_better(name: str) -> bool:
    """The direction of a metric, from its name (``val/loss``, ``val/ppl`` down; ``val/acc`` up)."""
    return any(word in name.lower() for word in LOWER_IS_BETTER)


def folder_size(path: Path) -> int:
    """Bytes in a file or a folder tree."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def _short(path: str) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _scalars(metrics: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


class RunSummary(Callback):
    """Print and save the end-of-run summary (rank 0).

    Args:
        baseline: validate the starting model before training, so the summary compares against it. The CLI
            runs that validation (one pass over the validation data) when this is ``True`` and the run does
            not resume from a checkpoint; with the plain Trainer, call ``trainer.validate`` before ``fit``.
        baseline_metrics: known starting values (e.g. ``{"val/acc": 0.978}``) instead of a validation run.
        next_commands: the commands that continue from this run's outputs (the CLI fills them in).
        filename: written in ``trainer.default_root_dir``; ``None``: print only.

    Raises:
        ValueError: ``filename`` is a path rather than a file name.
    """

    def __init__(self, baseline: bool = False, baseline_metrics: dict[str, float] | None = None,
                 next_commands: list[str] | None = None, filename: str | None = "summary.json"):
        if filename is not None and Path(filename).name != filename:
            raise ValueError(f"RunSummary: filename must be a file name (it goes in the run folder), got {filename!r}.")
        self.baseline = baseline
        self.baseline_metrics = dict(baseline_metrics) if baseline_metrics else None
        self.next_commands = list(next_commands) if next_commands else []
        self.filename = filename
        self.best: dict[str, dict[str, float]] = {}   # metric -> {"value", "step"}
        self.final: dict[str, float] = {}
        self._start: float | None = None
        self._fitting = False
        self.summary: dict[str, Any] | None = None

    # -- collecting -----------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._fitting = time.perf_counter(), True

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = _scalars(trainer.callback_metrics)
        if trainer.state.fn == "validate" and getattr(pl_module, "training_free", False):
            self._fitting = True  # a recipe whose run is a validation (pruning without training): report it
        if not self._fitting:  # a validation before fit: the starting model
            if self.baseline_metrics is None and metrics:
                self.baseline_metrics = metrics
            return
        self.final = metrics
        for name, value in metrics.items():
            best = self.best.get(name)
            better = best is None or (value < best["value"] if lower_is_better(name) else value > best["value"])
            if better:
                self.best[name] = {"value": value, "step": trainer.global_step}

    # -- reporting ------------------------------------------------------------------------------------
    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate") or not self._fitting:
            return
        self._fitting = False
        if not trainer.is_global_zero:
            return
        self.summary = self.build(trainer, pl_module)
        if self.filename:
            path = Path(trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.summary["summary_file"] = str(path)
            path.write_text(json.dumps(self.summary, indent=2) + "\n")
        get_console().print(self.render(self.summary), highlight=False, soft_wrap=True)

    def build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The summary as JSON data (the fields of ``summary.json``)."""
        checkpoint = trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None)
        final = self.final or _scalars(trainer.callback_metrics, prefix="")  # no validation: what was logged
        names = sorted(final, key=lambda n: (n != monitor, n))
        metrics = {name: {"final": final[name], "best": self.best.get(name, {}).get("value"),
                          "best_step": self.best.get(name, {}).get("step"),
                          "base": (self.baseline_metrics or {}).get(name)} for name in names}
        outputs = []
        written = pl_module.written_outputs() if hasattr(pl_module, "written_outputs") else {}
        for kind, folder in written.items():
            if folder and Path(folder).exists():
                outputs.append({"kind": kind, "path": str(folder), "bytes": folder_size(Path(folder))})
        for kind, ckpt in (("best checkpoint", getattr(checkpoint, "best_model_path", "")),
                           ("last checkpoint", getattr(checkpoint, "last_model_path", ""))):
            if ckpt and Path(ckpt).exists() and ckpt not in (o["path"] for o in outputs):
                outputs.append({"kind": kind, "path": _short(ckpt), "bytes": folder_size(Path(ckpt))})
        return {
            "recipe": type(pl_module).__name__,
            "run_dir": str(trainer.default_root_dir),
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "seconds": round(time.perf_counter() - self._start, 1) if self._start else None,
            "stopped_early": bool(trainer.should_stop and trainer.max_steps > trainer.global_step),
            "monitor": monitor,
            "metrics": metrics,
            "outputs": outputs,
            "next": self.next_commands,
        }

    @staticmethod
    def render(summary: dict[str, Any]) -> str:
        """The console text of a summary (Rich markup)."""
        took = f", {summary['seconds']:.0f} s" if summary.get("seconds") is not None else ""
        lines = [f"[bold]Run summary[/]: {summary['recipe']}, {summary['steps']} steps{took}"]
        width = max((len(n) for n in summary["metrics"]), default=0)
        for name, m in summary["metrics"].items():
            text = f"  {name:<{width}}  {m['final']:.4g}"
            if m["base"] is not None:
                text += f" (base {m['base']:.4g})"
            if m["best"] is not None and m["best"] != m["final"]:
                text += f", best {m['best']:.4g} at step {m['best_step']}"
            lines.append(text + ("  [dim](monitored)[/]" if name == summary["monitor"] else ""))
        if summary["outputs"]:
            lines.append("[bold]Written[/]:")
            kind_width = max(len(o["kind"]) for o in summary["outputs"])
            lines += [f"  {o['kind']:<{kind_width}}  {o['path']}  ({human_size(o['bytes'])})" for o in summary["outputs"]]
        if summary.get("summary_file"):
            lines.append(f"  {'summary':<{max(7, kind_width if summary['outputs'] else 0)}}  {summary['summary_file']}")
        if summary["next"]:
            lines.append("[bold]Next[/]: " + summary["next"][0])
            if len(summary["next"]) > 1:
                lines.append("  also: " + "; ".join(summary["next"][1:]))
        return "\n".join(lines)

    # -- resume ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "baseline_metrics": self.baseline_metrics}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best", {})
        self.baseline_metrics = self.baseline_metrics or state_dict.get("baseline_metrics")
