"""What a run shows its user: step-based progress, no unmeasured FLOPs, known dependency warnings filtered
(ours kept), the end-of-run summary and summary.json, the next command, and the list of packaged recipes."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import REPO, run_cli
from effitrain.callbacks.model_summary import RunModelSummary
from effitrain.callbacks.progress import StageProgress, StepProgressBar, stage_progress
from effitrain.callbacks.run_summary import RunSummary
from effitrain.lightning_modules.cli import main, next_commands
from effitrain.lightning_modules.config_files import packaged_recipes, recipe_name, resolve_config
from effitrain.lightning_modules.console import quiet_known_warnings
from lightning.pytorch.demos.boring_classes import BoringModel


class ValBoring(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val/loss", loss)
        self.log("val/acc", 1.0 / (1.0 + self.global_step))  # falls as steps go: best is the first
        return loss


def test_step_budget_progress_and_summary(tmp_path, capsys):
    """6 steps over 2 epochs of 4 batches: one bar of 6 steps (not 4 per epoch), and the summary's best/final."""
    bar, summary = StepProgressBar(), RunSummary(baseline_metrics={"val/loss": 9.0})
    trainer = L.Trainer(max_steps=6, limit_train_batches=4, limit_val_batches=2, val_check_interval=2,
                        callbacks=[bar, RunModelSummary(), summary], default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False)
    trainer.fit(ValBoring())
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (6, 6)
    out = capsys.readouterr().out
    assert re.search(r"Step \(epoch 1\).*6/6", out)
    assert "FLOPs" not in out and "Trainable params" in out  # no example_input_array: nothing measured
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["recipe"] == "ValBoring"
    assert saved["metrics"]["val/acc"]["best"] == pytest.approx(1 / 3) and saved["metrics"]["val/acc"]["best_step"] == 2
    assert saved["metrics"]["val/acc"]["final"] == pytest.approx(1 / 7)
    assert saved["metrics"]["val/loss"]["base"] == 9.0
    assert "val/loss" in out and "(base 9)" in out


def test_epoch_budget_keeps_lightning_bar(tmp_path):
    bar = StepProgressBar()
    L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[bar], logger=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(BoringModel())
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (3, 3) and "Epoch 1/1" in task.description


def test_stage_progress_logs_when_not_a_terminal(caplog):
    with caplog.at_level("INFO"):
        assert list(stage_progress(range(5), "Calibration")) == [0, 1, 2, 3, 4]
        with StageProgress("Search", total=3) as progress:
            for _ in range(3):
                progress.advance(note="best 0.9")
    assert "Calibration: 5/5 done" in caplog.text and "Search: 3/3 done" in caplog.text and progress.done == 3


def test_stage_progress_draws_a_bar_on_a_terminal(monkeypatch):
    import effitrain.callbacks.progress as progress_module
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "get_console", lambda: Console(file=screen, force_terminal=True, width=100))
    assert sum(stage_progress(iter(range(4)), "Block-AP calibration", total=4)) == 6
    assert re.search(r"Block-AP calibration.*4/4", screen.getvalue())


def test_known_dependency_warnings_are_filtered_and_ours_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for module in ("torchdata.stateful_dataloader.stateful_dataloader", "effitrain.datamodules.text"):
            warnings.warn_explicit("'set_vital' is deprecated, please do not call", UserWarning, "x.py", 1, module=module)
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "y.py", 1,
                               module="lightning.pytorch.utilities._pytree")
        warnings.warn("effitrain: a warning of ours", UserWarning, stacklevel=1)
    shown = [(w.filename, str(w.message)) for w in caught]
    # the same text from our own module still shows: filters match the emitting package too
    assert shown == [("x.py", "'set_vital' is deprecated, please do not call"),
                     (__file__, "effitrain: a warning of ours")]


def test_recipe_list_names_every_packaged_recipe(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    for path in packaged_recipes():
        name = recipe_name(path)
        assert re.search(rf"^  {re.escape(name)}$", out, re.M), f"{name} missing from `effitrain recipes`"
        assert resolve_config(name) == str(path)  # the listed name is what --config takes
    moslora = out.split("\n  moslora\n")[1].split("\n  ")[0:3]
    assert any("needs first: quickstart" in line for line in moslora)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "\n  moslora\n" in capsys.readouterr().out  # also at the end of `fit --help`


@pytest.mark.parametrize("class_path", sorted({yaml.safe_load(p.read_text())["model"]["class_path"]
                                               for p in packaged_recipes()}))
def test_model_help_for_every_recipe_class(class_path, capsys):
    short = class_path.rsplit(".", 1)[1]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--model.help", short])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    module, name = class_path.rsplit(".", 1)
    signature = inspect.signature(getattr(importlib.import_module(module), name))
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert own and all(f"--model.{p.name}" in out for p in own)  # every argument of the class is documented


def test_next_command_for_a_starting_model():
    class Quickstart:
        def written_outputs(self):
            return {"model": "artifacts/tiny_llama"}

    commands = next_commands(Quickstart())
    assert "effitrain fit --config moslora" in commands and "effitrain fit --config mofo" in commands
    # a training-free recipe is suggested under its own subcommand
    assert "effitrain validate --config wanda" in commands and "effitrain fit --config wanda" not in commands
    # recipes that only borrow the tokenizer (they start from the pruned model) are not next
    assert not any("full" in c or "quickstart" in c for c in commands)


@pytest.mark.slow
def test_recipe_console_output(tiny_lm_dir, tmp_path):
    """The MoSLoRA recipe as a user runs it (a subprocess: real console, real warnings), 4 steps on a tiny base."""
    args = [sys.executable, str(REPO / "train.py"), "fit", "--config", "moslora",
            f"--model.init_args.pretrained={tiny_lm_dir}", f"--data.init_args.tokenizer={tiny_lm_dir}",
            "--data.init_args.num_examples=200", "--data.init_args.batch_size=8",
            "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
            "--trainer.default_root_dir=runs/t", "--model.init_args.export_dir=out/adapter",
            "--model.init_args.merged_dir=out/merged", "--model.init_args.task_eval_size=4",
            "--model.init_args.task_max_new_tokens=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    for noise in ("set_vital", "LeafSpec", "Total FLOPs", "tensorboardX", "/-2", "💡", "args parameter"):
        assert noise not in console, f"{noise!r} in the console output"
    assert re.search(r"Step \(epoch 0\).*4/4", console)  # the bar counts steps of the budget
    assert "Run summary" in console and "out/adapter" in console and "out/merged" in console
    saved = json.loads((tmp_path / "runs/t/summary.json").read_text())
    assert saved["steps"] == 4 and saved["monitor"] == "val/loss" and saved["recipe"] == "AdapterCausalLM"
    for name in ("val/loss", "val/ppl", "val/exact_match"):
        metric = saved["metrics"][name]
        assert metric["final"] is not None and metric["base"] is not None  # baseline: true in moslora.yaml
    kinds = {o["kind"]: o for o in saved["outputs"]}
    assert kinds["adapter"]["path"] == "out/adapter" and kinds["adapter"]["bytes"] > 0
    assert (tmp_path / kinds["merged"]["path"] / "config.json").exists() and "best checkpoint" in kinds
    assert saved["next"] == [] and saved["summary_file"] == "runs/t/summary.json"
    assert Path(tmp_path / "runs/t/checkpoints/last.ckpt").exists()
