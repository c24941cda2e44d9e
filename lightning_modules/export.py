"""Writing a recipe's final model folder without ever clobbering: a temporary folder renamed into place, the
run's identity recorded in it, and another run's folder replaced only when asked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effitrain.lightning_modules.integrity import MANIFEST, folder_checksums, read_manifest


class ExportExistsError(FileExistsError):
    """The export folder holds the model of another run; the message names both runs and the fix."""


def describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "files not written by an effitrain run"
    return (f"run {identity.get('run_id')} of {identity.get('recipe')} (root {identity.get('root_dir')}, "
            f"written {identity.get('written', 'at an unknown time')})")


def check_target(folder: str | Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Raise ``ExportExistsError`` when ``folder`` holds another run's export and ``overwrite`` is off.

    The same run (a resumed one keeps its identity from the checkpoint) may replace its own export.
    """
    path = Path(folder).expanduser()
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    theirs = read_manifest(path) if path.is_dir() else None
    if theirs and theirs.get("run_id") == identity["run_id"]:
        return
    raise ExportExistsError(
        f"The export folder {path} already holds {describe(theirs)}; this is {describe(identity)}. "
        "It is not replaced: give another `--model.init_args.export_dir`, or replace it with "
        "`--model.init_args.overwrite_export=true`.")


def publish(folder: str | Path, write: Callable[[Path], None], identity: dict[str, Any], overwrite: bool) -> Path:
    """Write the folder with ``write(temporary_folder)``, add the manifest, then rename it into place.

    A crash while writing leaves the previous folder as it was (only the temporary ``.<name>.tmp-<run>`` is left).
    """
    target = Path(folder).expanduser()
    check_target(target, identity, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.tmp-{identity['run_id']}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    write(temporary)
    manifest = {**identity, "files": folder_checksums(temporary)}
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if target.exists():
        previous = target.parent / f".{target.name}.old-{identity['run_id']}"
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
        temporary.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        temporary.rename(target)
    return target
