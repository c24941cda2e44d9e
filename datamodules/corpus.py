"""The built-in text corpus: English text that ships with every CPython, so it works offline.

Documents are the pydoc topics (``pydoc_data.topics``, the language reference behind ``help()``) and,
per standard-library module, its module/class/function docstrings read with ``ast`` (nothing is
imported, so no module's import side effects run). About 590 documents, 2 MB of text.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

_SKIP_TOP = {"test", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "tkinter"}


def pydoc_topics() -> list[str]:
    """The pydoc topics, one document each, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its docstrings joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in _SKIP_TOP or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        text = "\n\n".join(doc for doc in map(ast.get_docstring, nodes) if doc)
        if text:
            documents.append(text)
    return documents


def builtin_documents(name: str = "python_docs") -> list[str]:
    """The documents of a built-in corpus: ``python_docs`` (topics + docstrings) or ``pydoc_topics``."""
    if name == "pydoc_topics":
        return pydoc_topics()
    if name == "python_docs":
        return pydoc_topics() + stdlib_docstrings()
    raise ValueError(f"Unknown built-in corpus {name!r}: use 'builtin:python_docs' or 'builtin:pydoc_topics'.")


def split_documents(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic random split by document (never alphabetical: neighbours are related topics)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(documents)))
    val = [documents[i] for i in sorted(order[:n_val])]
    train = [documents[i] for i in sorted(order[n_val:])]
    return train, val
