"""Every shipped config parses, and every config meant to run here runs one step on CPU.

Recipes that start from another recipe's output (``pretrained: artifacts/...``) get it made first, by running
the producing config (the one whose ``export_dir`` writes it) in the same temporary working directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from effitrain.callbacks.model_summary import RunModelSummary
from effitrain.callbacks.progress import StepProgressBar
from effitrain.callbacks.run_summary import RunSummary
from effitrain.lightning_modules.artifacts import consumed_artifacts, exported_paths, recipe_subcommand
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

CONFIGS = REPO / "configs"
FRAGMENTS = sorted(p for d in ("trainer", "data", "callbacks") for p in (CONFIGS / d).glob("*.yaml"))
RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("trainer", "data", "callbacks"))
FULL = sorted(CONFIGS.glob("*/full/*.yaml"))


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def produces(config: Path) -> set[str]:
    return {path for path in exported_paths(config.read_text()) if path.startswith("artifacts/")}


def consumes(config: Path) -> set[str]:
    return consumed_artifacts(config.read_text())


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
    if fragment.parent.name == "callbacks":  # a callback fragment is appended to trainer.callbacks
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["fit", "--config", str(base), f"--trainer.callbacks+={fragment}", "--print_config"])
        assert exit_info.value.code in (0, None)
    else:
        print_config(base, fragment)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert "checkpoint" in resolved and "lr_monitor" in resolved
    own = yaml.safe_load(fragment.read_text())
    if fragment.parent.name == "callbacks":  # its entry is in the trainer's callbacks
        assert own["class_path"] in [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    else:  # each of the fragment's own keys took its value in the resolved config
        assert_subset(own, resolved, rel(fragment))


def assert_subset(fragment, resolved, where: str) -> None:
    if isinstance(fragment, dict):
        for key, value in fragment.items():
            assert isinstance(resolved, dict) and key in resolved, f"{where}: {key} missing"
            assert_subset(value, resolved[key], f"{where}.{key}")
    elif not isinstance(fragment, list):  # lists (callbacks) are replaced or appended: checked by the recipes
        assert resolved == fragment or str(resolved) == str(fragment), f"{where}: {resolved!r} != {fragment!r}"


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
    # overwrite_export: the recipe's export folder may hold a producer's export written by hand below
    cli = run_cli([recipe_subcommand(config), "--config", str(config), "--trainer.fast_dev_run=1",
                   "--model.init_args.overwrite_export=true", "--trainer.default_root_dir=runs/test"], cwd=workspace)
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
    assert trainer.global_step >= 1 or recipe_subcommand(config) == "validate"
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    # The common callbacks are forced by the CLI: no recipe can drop them (`trainer.logger: false` switches the
    # learning-rate monitor off, as the standard flag should).
    forced = (ModelCheckpoint, StepProgressBar, RunModelSummary, LearningRateMonitor, FiniteLossGuard, RunSummary)
    for kind in (k for k in forced if trainer.loggers or k is not LearningRateMonitor):
        assert any(isinstance(cb, kind) for cb in trainer.callbacks), f"{rel(config)} lost {kind.__name__}"
    summary = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary)).summary
    assert summary["steps"] == trainer.global_step and (workspace / "runs/test/summary.json").is_file()
    for path in produces(config):
        assert (workspace / path).is_dir(), f"{rel(config)} did not write {path}"
