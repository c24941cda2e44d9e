"""Models that one recipe writes and another starts from (``export_dir`` → ``pretrained``)."""

from __future__ import annotations

import re
from pathlib import Path

from effitrain.lightning_modules.config_files import CONFIG_ROOT
from effitrain.lightning_modules.integrity import verify_folder

_EXPORT_DIR = re.compile(r"export_dir:\s*['\"]?([^\s'\"#]+)")
_ARTIFACT = re.compile(r"['\"]?(artifacts/[\w./-]+)")


def exported_paths(config_text: str) -> set[str]:
    """The folders a config writes (its ``export_dir`` values), read from the YAML text."""
    return {match.rstrip("/") for match in _EXPORT_DIR.findall(config_text)}


def consumed_artifacts(config_text: str) -> set[str]:
    """The ``artifacts/...`` folders a config reads: every one it names that it does not write itself."""
    return {match.rstrip("/") for match in _ARTIFACT.findall(config_text)} - exported_paths(config_text)


def producing_configs(path: str) -> list[str]:
    """The configs whose ``export_dir`` is ``path`` (scanned as text: no config is instantiated)."""
    wanted = Path(path).as_posix().rstrip("/")
    return [config.relative_to(CONFIG_ROOT.parent).as_posix() for config in sorted(CONFIG_ROOT.rglob("*.yaml"))
            if wanted in exported_paths(config.read_text())]


def require_local_model(path: str, what: str = "starting model") -> None:
    """Fail with the command that makes ``path`` when a local model folder is missing, or naming the damaged
    file when its content differs from the checksums recorded at export (``effitrain_run.json``)."""
    if Path(path).expanduser().exists():
        verify_folder(path)
        return
    makers = producing_configs(path)
    hint = (f"Make it first: `effitrain fit --config {makers[0]}` (in a checkout: `python train.py fit --config "
            f"{makers[0]}`)." if makers
            else "Give an existing folder or a hub name.")
    raise MissingArtifactError(f"The {what} {path!r} does not exist. {hint}")


class MissingArtifactError(FileNotFoundError):
    """A model folder that a recipe starts from is missing; the message names the command that makes it."""


def is_local_reference(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id."""
    return name.startswith((".", "/", "~", "artifacts/", "runs/")) or Path(name).expanduser().exists()


def consuming_configs(path: str) -> list[Path]:
    """The packaged recipes that start from ``path``: they mention it outside comments, ``*_dir:`` outputs and
    ``tokenizer:`` entries (a recipe that only borrows the tokenizer starts from another model)."""
    from effitrain.lightning_modules.config_files import packaged_recipes

    wanted = re.compile(rf"(?<![\w./-]){re.escape(Path(path).as_posix().rstrip('/'))}/?(?![\w./-])")
    found = []
    for config in packaged_recipes():
        lines = (line.split("#", 1)[0] for line in config.read_text().splitlines())
        if any(wanted.search(line) and not re.search(r"\w_dir:|tokenizer:", line) for line in lines):
            found.append(config)
    return found


def recipe_subcommand(config: Path) -> str:
    """``fit``, or what a training-free recipe names in its ``# subcommand: validate`` first line."""
    found = re.match(r"# subcommand: (\w+)", config.read_text())
    return found.group(1) if found else "fit"
