"""Models that one recipe writes and another starts from (``export_dir`` → ``pretrained``)."""

from __future__ import annotations

import re
from pathlib import Path

from effitrain.lightning_modules.config_files import CONFIG_ROOT


def producing_configs(path: str) -> list[str]:
    """The configs whose ``export_dir`` is ``path`` (scanned as text: no config is instantiated)."""
    wanted = Path(path).as_posix().rstrip("/")
    found = []
    for config in sorted(CONFIG_ROOT.rglob("*.yaml")):
        for match in re.finditer(r"export_dir:\s*['\"]?([^\s'\"#]+)", config.read_text()):
            if match.group(1).rstrip("/") == wanted:
                found.append(config.relative_to(CONFIG_ROOT.parent).as_posix())
    return found


def require_local_model(path: str, what: str = "starting model") -> None:
    """Fail with the command that makes ``path`` when a local model folder is missing."""
    if Path(path).expanduser().exists():
        return
    makers = producing_configs(path)
    hint = (f"Make it first: `python train.py fit --config {makers[0]}`." if makers
            else "Give an existing folder or a hub name.")
    raise MissingArtifactError(f"The {what} {path!r} does not exist. {hint}")


class MissingArtifactError(FileNotFoundError):
    """A model folder that a recipe starts from is missing; the message names the command that makes it."""


def is_local_reference(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id."""
    return name.startswith((".", "/", "~", "artifacts/", "runs/")) or Path(name).expanduser().exists()


def consuming_configs(path: str) -> list[Path]:
    """The packaged recipes that start from ``path`` (mention it outside comments and ``*_dir:`` outputs)."""
    from effitrain.lightning_modules.config_files import packaged_recipes

    wanted = re.compile(rf"(?<![\w./-]){re.escape(Path(path).as_posix().rstrip('/'))}/?(?![\w./-])")
    found = []
    for config in packaged_recipes():
        lines = (line.split("#", 1)[0] for line in config.read_text().splitlines())
        if any(wanted.search(line) and not re.search(r"\w_dir:", line) for line in lines):
            found.append(config)
    return found
