"""Where text documents come from: the built-in corpus, local files or folders, or a hub dataset.

``source`` is ``builtin`` / ``builtin:<name>``, a path to a ``.txt`` / ``.jsonl`` / ``.json`` /
``.parquet`` file or a folder of them, or a hub dataset name loaded with ``datasets.load_dataset``.
"""

from __future__ import annotations

from pathlib import Path

from effitrain.datamodules.corpus import builtin_documents

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in (*TEXT_SUFFIXES, *RECORD_SUFFIXES)


def local_files(source: str) -> list[Path]:
    """The data files a local source names, sorted; a clear error if there are none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Data path {source!r} does not exist. Give an existing file or folder, "
                                "a hub dataset name, or 'builtin' for the built-in corpus.")
    suffixes = (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in suffixes)
    if not files:
        raise ValueError(f"Data folder {source!r} holds no {', '.join(suffixes)} files.")
    return files


def load_records(source: str, split: str = "train"):
    """Records (dicts) of a jsonl/parquet file or folder, or of a hub dataset split, via ``datasets``."""
    import datasets

    if looks_like_path(source) or Path(source).expanduser().exists():
        files = [str(p) for p in local_files(source) if p.suffix in RECORD_SUFFIXES]
        if not files:
            raise ValueError(f"{source!r} holds no .jsonl/.json/.parquet records.")
        builder = RECORD_SUFFIXES[Path(files[0]).suffix]
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as err:  # datasets reports neither the file nor the line
            diagnose_records(files)
            raise ValueError(f"Could not read the records of {source!r} ({type(err).__name__}: {err}).") from None
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # datasets raises many types for a missing/unreachable dataset
        raise ValueError(
            f"Could not load {source!r}: it is not an existing local path, and loading it from the hub failed "
            f"(no network, or no such dataset/split {split!r}). Give a local file or folder, or 'builtin'. "
            f"({type(err).__name__}: {err})"
        ) from None


def diagnose_records(files: list[str]) -> None:
    """Raise ``ValueError`` naming the first malformed file (and line, for JSON Lines) among ``files``."""
    import json

    for name in files:
        path = Path(name)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                pq.read_metadata(path)
            except Exception as err:
                raise ValueError(f"{path} is not a valid Parquet file ({err}). Rewrite it, or remove it from the "
                                 "data folder.") from None
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:  # a .json file may hold one JSON document rather than lines
            json.loads(text)
            continue
        except json.JSONDecodeError:
            pass
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}). Each line "
                                 "of a .jsonl file must be one JSON object; fix or remove that line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object with a text "
                                 "field. Each line of a .jsonl file must be one JSON object.")


def load_documents(source: str, split: str = "train", text_column: str = "text") -> list[str]:
    """The text documents of ``source``: a ``.txt`` file is one document; records give one per row."""
    if source == "builtin" or source.startswith("builtin:"):
        name = source.partition(":")[2] or "python_docs"
        return builtin_documents(name)
    documents: list[str] = []
    if looks_like_path(source) or Path(source).expanduser().exists():
        files = local_files(source)
        documents += [p.read_text(encoding="utf-8") for p in files if p.suffix in TEXT_SUFFIXES]
        if any(p.suffix in RECORD_SUFFIXES for p in files):
            documents += _column(load_records(source), text_column, source)
    else:
        documents = _column(load_records(source, split), text_column, source)
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise ValueError(f"The dataset {source!r} is empty: it holds no non-empty text documents.")
    return documents


def _column(records, column: str, source: str) -> list[str]:
    if column not in records.column_names:
        raise ValueError(f"{source!r} has no column {column!r}; its columns are {records.column_names}. "
                         "Set `text_column`.")
    return list(records[column])
