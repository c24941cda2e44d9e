"""Resume belongs to the recipe: ``--ckpt_path`` is checked against the command line's recipe before training.

A checkpoint written by another recipe, or by the same recipe with other model arguments, is refused with a
message naming both; the command line's run-level arguments (``export_dir``, ...) are kept as given; a damaged
file fails with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from effitrain.lightning_modules.integrity import CHECKPOINT_KEY, verify_checkpoint


class ResumeMismatchError(ValueError):
    """``--ckpt_path`` names a checkpoint that the command line's recipe cannot continue."""


def resolve_ckpt_path(value: str, checkpoint_dir: str) -> str | None:
    """A ``--ckpt_path`` value as a file: ``last`` is ``<checkpoint_dir>/last.ckpt`` (an error when there is
    none, rather than a silent start from step 0); Lightning's other keywords are left to Lightning (``None``)."""
    if value == "last":
        path = Path(checkpoint_dir) / "last.ckpt"
        if not path.exists():  # a file, or a folder of shards under a sharded strategy
            raise FileNotFoundError(
                f"--ckpt_path last: there is no {path} to resume from (the run wrote no checkpoint yet, or its "
                "trainer.default_root_dir differs). Start the run anew without --ckpt_path.")
        return str(path)
    if value in ("best", "hpc", "registry") or value.startswith("registry:"):
        return None
    if not Path(value).exists():
        raise FileNotFoundError(f"--ckpt_path {value}: no such checkpoint file or folder.")
    return value


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint on CPU (memory-mapped), its checksum verified; errors name the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/... for a damaged zip or pickle
        raise ValueError(f"The checkpoint {path} cannot be read ({type(err).__name__}: {err}); the file is damaged "
                         "or is no Lightning checkpoint. Resume from an older checkpoint or start anew.") from None
    verify_checkpoint(checkpoint, path)
    return checkpoint


def _plain(value: Any) -> Any:
    """A value as comparable JSON data (lists of names sorted: peft stores ``target_modules`` as a set)."""
    value = json.loads(json.dumps(value, default=str))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value


def _differences(saved: Any, given: Any, key: str) -> list[str]:
    saved, given = _plain(saved), _plain(given)
    if isinstance(saved, dict) and isinstance(given, dict):
        if saved.get("class_path", given.get("class_path")) != given.get("class_path", saved.get("class_path")):
            return [f"{key}: {saved.get('class_path')} in the checkpoint, {given.get('class_path')} given"]
        out = []
        for sub in sorted(saved.keys() & given.keys()):
            # inside a config object, a field left unset (None) may be filled by the library at run time
            if sub != "class_path" and given[sub] is not None:
                out += _differences(saved[sub], given[sub], f"{key}.{sub}")
        return out
    return [] if saved == given else [f"{key}: {saved!r} in the checkpoint, {given!r} given"]


def check_same_recipe(checkpoint: dict[str, Any], path: str, class_path: str, init_args: dict[str, Any],
                      run_args: tuple[str, ...]) -> None:
    """Raise ``ResumeMismatchError`` when ``checkpoint`` was not written by ``class_path`` with ``init_args``
    (arguments in ``run_args`` may differ: they belong to the run, not to the model)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    saved_class = checkpoint.get(CHECKPOINT_KEY, {}).get("recipe") or hparams.get("_class_path")
    if saved_class and saved_class != class_path:
        raise ResumeMismatchError(
            f"--ckpt_path {path} was written by the recipe {saved_class}, but this command trains {class_path}. "
            "A checkpoint resumes only the recipe that wrote it: run that recipe's config with --ckpt_path, or "
            "start this recipe from the other run's exported model (`--model.init_args.pretrained <folder>`).")
    differences = []
    for key in sorted(hparams.keys() & init_args.keys()):
        if not key.startswith("_") and key not in run_args:
            differences += _differences(hparams[key], init_args[key], key)
    if differences:
        raise ResumeMismatchError(
            f"--ckpt_path {path} was written by {class_path} with other model arguments: "
            + "; ".join(differences) + ". Resume with the arguments of that run (its config.yaml in the run "
            "folder), or start anew without --ckpt_path.")
