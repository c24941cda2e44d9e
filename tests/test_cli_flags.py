"""The standard Trainer flags switch the CLI's forced callbacks off, and a missing input ends the console
script with one ``error:`` line that names the fix (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

QUICKSTART = str(REPO / "configs" / "pretrain" / "quickstart.yaml")


def fit_two_steps(tmp_path: Path, tiny_lm_dir: Path, corpus: Path, *flags: str):
    return run_cli(["fit", "--config", QUICKSTART, f"--model.init_args.pretrained={tiny_lm_dir}",
                    "--model.init_args.export_dir=null", f"--data.init_args.source={corpus}",
                    f"--data.init_args.tokenizer={tiny_lm_dir}", "--data.init_args.block_size=32",
                    "--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                    "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path}", *flags],
                   cwd=tmp_path).trainer


def kinds(trainer) -> set[type]:
    found = set()
    for callback in trainer.callbacks:
        for kind in (ModelCheckpoint, ProgressBar, LearningRateMonitor, FiniteLossGuard):
            if isinstance(callback, kind):
                found.add(kind)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("flag, dropped", [
    ("--trainer.enable_progress_bar=false", ProgressBar),
    ("--trainer.enable_checkpointing=false", ModelCheckpoint),
    ("--trainer.logger=false", LearningRateMonitor),
])
def test_standard_flag_switches_its_callback_off(flag, dropped, tmp_path, tiny_lm_dir, small_corpus):
    trainer = fit_two_steps(tmp_path, tiny_lm_dir, small_corpus, flag)
    assert trainer.global_step == 2
    assert kinds(trainer) == {ModelCheckpoint, ProgressBar, LearningRateMonitor, FiniteLossGuard} - {dropped}
    if dropped is ModelCheckpoint:
        assert not (tmp_path / "checkpoints").exists()
    else:  # the forced checkpoint callback still writes last.ckpt (save_last: true in trainer/default.yaml)
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if dropped is LearningRateMonitor:
        assert trainer.logger is None


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "effitrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "effitrain.lightning_modules.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("override, names", [
    ("--model.init_args.pretrained=artifacts/tiny_llama",
     ["'artifacts/tiny_llama' does not exist", "effitrain fit --config configs/pretrain/quickstart.yaml"]),
    ("--data.init_args.source=./no/such/folder", ["'./no/such/folder' does not exist", "'builtin'"]),
])
def test_missing_input_ends_with_one_error_line(override, names, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*console_script(), "fit", "--config", "quickstart", override], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    for name in names:
        assert name in errors[0]


def test_config_names_resolve_to_packaged_recipes(tmp_path, monkeypatch):
    from effitrain.lightning_modules import config_files
    from effitrain.lightning_modules.config_files import CONFIG_ROOT, resolve_config, resolve_config_args

    monkeypatch.chdir(tmp_path)  # outside a checkout: no configs/ folder here
    quickstart = str(CONFIG_ROOT / "pretrain" / "quickstart.yaml")
    for name in ("quickstart", "quickstart.yaml", "pretrain/quickstart", "configs/pretrain/quickstart.yaml"):
        assert resolve_config(name) == quickstart, name
    assert resolve_config("mofo") == str(CONFIG_ROOT / "mofo" / "mofo.yaml")
    assert resolve_config("full/mofo_llama2_7b_metamath") == str(CONFIG_ROOT / "mofo" / "full" /
                                                                 "mofo_llama2_7b_metamath.yaml")
    (tmp_path / "mine.yaml").write_text("trainer: {}\n")
    assert resolve_config("mine.yaml") == "mine.yaml"  # an existing file wins over a packaged name
    assert resolve_config("no_such_recipe") == "no_such_recipe"  # left for the parser to report
    assert resolve_config_args(["fit", "--config", "quickstart", "--config=mofo"]) == [
        "fit", "--config", quickstart, "--config=" + str(CONFIG_ROOT / "mofo" / "mofo.yaml")]

    packaged = tmp_path / "packaged"
    for method in ("a", "b"):
        (packaged / method).mkdir(parents=True)
        (packaged / method / "same.yaml").write_text("{}\n")
    monkeypatch.setattr(config_files, "CONFIG_ROOT", packaged)
    with pytest.raises(ValueError, match=r"several packaged configs \(a/same, b/same\)"):
        config_files.resolve_config("same")
