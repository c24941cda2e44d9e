"""Content checksums for checkpoints and exported model folders, verified when they are loaded.

A checkpoint carries the SHA-256 of every tensor and number it holds (weights, optimizer moments, schedulers,
callback and loop states) under ``checkpoint["effitrain"]["checksum"]``; a damaged file (bytes overwritten
inside a tensor, which ``torch.load`` does not notice) fails on load with a message naming it instead of
training on garbage. An export folder carries ``effitrain_run.json`` with the SHA-256 of each file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

#: The key of this project's entry in a Lightning checkpoint (run identity, recipe, checksum).
CHECKPOINT_KEY = "effitrain"
#: The file in an export folder that names the run which wrote it and the checksum of every file.
MANIFEST = "effitrain_run.json"


class IntegrityError(ValueError):
    """A checkpoint or an exported model whose content does not match its recorded checksum."""


def _update(digest: Any, value: Any, path: str) -> None:
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):  # DTensor shards etc.: not hashed
            return
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{path}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _update(digest, value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _update(digest, item, f"{path}/{i}")
    elif isinstance(value, (bool, int, float, str)) or value is None:
        digest.update(f"{path}={value!r};".encode())
    # other objects (hyper-parameter objects, ...) are not part of the checksum


def checkpoint_checksum(checkpoint: dict[str, Any]) -> str:
    """SHA-256 over every tensor and plain value of ``checkpoint`` (this project's own entry excluded)."""
    digest = hashlib.sha256()
    _update(digest, {k: v for k, v in checkpoint.items() if k != CHECKPOINT_KEY}, "")
    return digest.hexdigest()


def stamp_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Record the checksum; call it after every other change to ``checkpoint``."""
    checkpoint.setdefault(CHECKPOINT_KEY, {})["checksum"] = checkpoint_checksum(checkpoint)


def verify_checkpoint(checkpoint: dict[str, Any], path: str | None) -> None:
    """Raise ``IntegrityError`` naming ``path`` when the content differs from the recorded checksum.

    Checkpoints written before checksums existed (no record) are accepted as they are.
    """
    recorded = checkpoint.get(CHECKPOINT_KEY, {}).get("checksum")
    if recorded is not None and recorded != checkpoint_checksum(checkpoint):
        raise IntegrityError(
            f"The checkpoint {path or '(given checkpoint)'} is corrupted: its content does not match the checksum "
            "recorded when it was written. Resume from an older checkpoint of the same folder, or start anew "
            "without --ckpt_path.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the manifest itself excluded), by relative path."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of an export folder, or ``None`` when it has none (written elsewhere)."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path} is not valid JSON ({err}): the export folder is damaged.") from None


def verify_folder(folder: str | Path) -> None:
    """Raise ``IntegrityError`` naming the file when an exported folder's content differs from its manifest."""
    manifest = read_manifest(folder)
    if not manifest or "files" not in manifest:
        return
    root = Path(folder).expanduser()
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise IntegrityError(f"The exported model {root} lacks {name}, listed in its {MANIFEST}: the folder "
                                 "is incomplete. Export it again from its run's last checkpoint.")
        if file_sha256(path) != expected:
            raise IntegrityError(f"{path} is corrupted: its content does not match the checksum in {root / MANIFEST}. "
                                 "Export it again from its run's last checkpoint.")
