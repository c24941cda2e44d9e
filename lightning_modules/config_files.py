"""The packaged configs: the recipes and the trainer defaults ship inside the package as ``effitrain.configs``.

In a checkout they are the repository's ``configs/`` folder; in a wheel, ``site-packages/effitrain/configs``.
A recipe can be named by path (``configs/pretrain/quickstart.yaml``) or by name (``quickstart``, ``full/mofo_...``).
"""

from __future__ import annotations

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
