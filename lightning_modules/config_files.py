"""The packaged configs: the recipes and the trainer defaults ship inside the package as ``effitrain.configs``.

In a checkout they are the repository's ``configs/`` folder; in a wheel, ``site-packages/effitrain/configs``.
A recipe can be named by path (``configs/pretrain/quickstart.yaml``) or by name (``quickstart``, ``full/mofo_...``).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


class AmbiguousConfigName(ValueError):
    """A ``--config`` name that matches several packaged configs."""

DEFAULT_TRAINER_CONFIG = CONFIG_ROOT / "trainer" / "default.yaml"


def resolve_config(name: str) -> str:
    """A ``--config`` value as a file path: an existing path as given, else the packaged config of that name.

    ``quickstart``, ``quickstart.yaml``, ``pretrain/quickstart`` and ``configs/pretrain/quickstart.yaml`` (run
    outside a checkout) all name the packaged ``pretrain/quickstart.yaml``; a bare name is searched in every
    method folder (``mofo``, ``full/mofo_llama2_7b_metamath``). Anything else is returned unchanged, for the
    parser to report.

    Raises:
        AmbiguousConfigName: a bare name that matches several packaged configs (the message lists them).
    """
    if Path(name).expanduser().exists() or name.lstrip().startswith(("{", "[")):  # a file, or inline YAML
        return name
    relative = name.removeprefix("configs/")
    if not relative or relative.startswith(("/", ".", "~")):
        return name
    file = relative if relative.endswith((".yaml", ".yml")) else f"{relative}.yaml"
    packaged = CONFIG_ROOT / file
    if packaged.is_file():
        return str(packaged)
    found = sorted(CONFIG_ROOT.rglob(file))
    if len(found) > 1:
        names = ", ".join(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in found)
        raise AmbiguousConfigName(f"--config {name!r} names several packaged configs ({names}); give one of these.")
    return str(found[0]) if found else name


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config X`` / ``--config=X`` value resolved by :func:`resolve_config`."""
    resolved, take_next = [], False
    for arg in args:
        if take_next:
            arg, take_next = resolve_config(arg), False
        elif arg == "--config":
            take_next = True
        elif arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.removeprefix("--config="))
        resolved.append(arg)
    return resolved


def packaged_recipes() -> list[Path]:
    """Every runnable recipe config (not the trainer, data and callback fragments)."""
    fragments = {"trainer", "data", "callbacks"}
    return sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.relative_to(CONFIG_ROOT).parts[0] not in fragments)


def recipe_name(path: Path) -> str:
    """The short name ``--config`` accepts for a packaged recipe (its file stem, or its path when not unique)."""
    stems = [p.stem for p in packaged_recipes()]
    return path.stem if stems.count(path.stem) == 1 else path.relative_to(CONFIG_ROOT).with_suffix("").as_posix()


@dataclass(frozen=True)
class Recipe:
    """A packaged recipe as ``effitrain recipes`` lists it."""

    name: str
    path: Path
    summary: str                 # the first sentence of the config's header comment
    needs: tuple[str, ...]       # recipes to run first (they write the folders this one starts from)
    paper_scale: bool            # configs/<method>/full/: a GPU node with hub weights and data


_EXPORT = re.compile(r"export_dir:\s*['\"]?(artifacts/[\w./-]+)")
_ARTIFACT = re.compile(r"['\"]?(artifacts/[\w./-]+)")


def _first_sentence(text: str, limit: int = 240) -> str:
    """The header comment's first sentence (up to the first command line), shortened at a word past ``limit``."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#") or line.lstrip("# ").startswith(("python ", "effitrain ")):
            break
        words += line.lstrip("#").split()
    sentence = " ".join(words)
    end = re.search(r"[.;](\s+[A-Z]|$)", sentence)  # not "Sec. 3.2" or "et al. 2021"
    sentence = sentence[: end.start()] if end else sentence
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def recipe_catalog() -> list[Recipe]:
    """Every packaged recipe with one line on what it does and what must run before it (scanned as text)."""
    texts = {path: path.read_text() for path in packaged_recipes()}
    writers = {out: path for path, text in texts.items() for out in _EXPORT.findall(text)}
    catalog = []
    for path, text in texts.items():
        header = _first_sentence(text)
        made_here = set(_EXPORT.findall(text))
        needs = sorted({recipe_name(writers[a]) for a in _ARTIFACT.findall(text)
                        if a not in made_here and a in writers})
        catalog.append(Recipe(recipe_name(path), path, header, tuple(needs),
                              "full" in path.relative_to(CONFIG_ROOT).parts))
    return catalog


def format_recipe_catalog(width: int = 100) -> str:
    """The recipe list printed by ``effitrain recipes`` and at the end of ``effitrain fit --help``."""
    lines = ["Packaged recipes: `effitrain fit --config NAME` (starting-model producers first)."]
    catalog = sorted(recipe_catalog(), key=lambda r: (r.path.parent.name != "pretrain", r.path))
    for paper_scale in (False, True):
        lines.append("\nPaper scale (a GPU node; weights and data from the hub):" if paper_scale
                     else "\nRunnable on a CPU in minutes, on built-in data:")
        for recipe in (r for r in catalog if r.paper_scale == paper_scale):
            lines.append(f"  {recipe.name}")
            lines += textwrap.wrap(recipe.summary, width, initial_indent="      ", subsequent_indent="      ")
            if recipe.needs:
                lines.append(f"      needs first: {', '.join(recipe.needs)}")
    return "\n".join(lines)
