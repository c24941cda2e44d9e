"""Every shipped config parses, and every config meant to run here runs one step on CPU.

Recipes that start from another recipe's output (``pretrained: artifacts/...``) get it made first, by running
the producing config (the one whose ``export_dir`` writes it) in the same temporary working directory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

CONFIGS = REPO / "configs"
FRAGMENTS = sorted(p for d in ("trainer", "data", "callbacks") for p in (CONFIGS / d).glob("*.yaml"))
RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("trainer", "data", "callbacks"))
FULL = sorted(CONFIGS.glob("*/full/*.yaml"))
ARTIFACT = re.compile(r"['\"]?(artifacts/[\w./-]+)")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def produces(config: Path) -> set[str]:
    return set(re.findall(r"export_dir:\s*['\"]?(artifacts/[\w./-]+)", config.read_text()))


def consumes(config: Path) -> set[str]:
    return set(ARTIFACT.findall(config.read_text())) - produces(config)


def print_config(*configs: Path) -> None:
    args = ["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("config", RECIPES + FULL, ids=rel)
def test_config_parses(config: Path, capsys):
    print_config(config)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=rel)
def test_fragment_composes_with_a_recipe(fragment: Path, capsys):
    base = CONFIGS / "pretrain" / ("image_quickstart.yaml" if "image" in fragment.name else "quickstart.yaml")
    print_config(base, fragment)
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "lr_monitor:" in out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


def ensure_artifact(path: str, workspace: Path) -> None:
    if (workspace / path).exists():
        return
    makers = [c for c in RECIPES if path in produces(c)]
    assert makers, f"no config in configs/ writes {path} (export_dir)"
    run_fast(makers[0], workspace)


def run_fast(config: Path, workspace: Path):
    for needed in sorted(consumes(config)):
        ensure_artifact(needed, workspace)
    cli = run_cli(["fit", "--config", str(config), "--trainer.fast_dev_run=1",
                   "--trainer.default_root_dir=runs/test"], cwd=workspace)
    # fast_dev_run exports nothing: write the folders that later recipes start from by hand
    from effitrain.lightning_modules.export import publish

    for folder, write in cli.model.exports():
        publish(workspace / folder, write, cli.model.identity(), overwrite=True)
    return cli


@pytest.mark.slow
@pytest.mark.parametrize("config", RECIPES, ids=rel)
def test_recipe_runs_one_step(config: Path, workspace: Path):
    cli = run_fast(config, workspace)
    trainer = cli.trainer
    assert trainer.global_step >= 1
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    # The common callbacks are forced by the CLI: no recipe can drop them.
    for kind in (ModelCheckpoint, RichProgressBar, LearningRateMonitor, FiniteLossGuard):
        assert any(isinstance(cb, kind) for cb in trainer.callbacks), f"{rel(config)} lost {kind.__name__}"
    for path in produces(config):
        assert (workspace / path).is_dir(), f"{rel(config)} did not write {path}"
