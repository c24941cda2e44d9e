"""Causal language-modelling data: documents packed into fixed-length blocks.

Documents come from ``effitrain.datamodules.sources`` (built-in corpus, local files, hub). They are split into
train/val by document at random (seeded), tokenized (a pretrained tokenizer, or a byte-level BPE trained on
the training documents), joined with EOS and cut into blocks of ``block_size`` tokens. Token streams and the
trained tokenizer are cached under ``cache_dir`` keyed by everything that changes them, so a second run does
not re-tokenize.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from effitrain.datamodules.corpus import split_documents
from effitrain.datamodules.sources import load_documents, local_files, looks_like_path
from effitrain.datamodules.tokenizer import load_tokenizer, train_bpe_tokenizer
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader


def default_cache_dir() -> str:
    return os.environ.get("EFFITRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "effitrain"))


class PackedBlocks(Dataset):
    """Non-overlapping blocks of a token stream; labels equal inputs (the model shifts them)."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.block_size
        block = torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))
        return {"input_ids": block, "labels": block.clone()}


class TextDataModule(L.LightningDataModule):
    """Packed-block text data for causal-LM training.

    Args:
        source: ``builtin`` (Python's docs), a local ``.txt``/``.jsonl``/``.parquet`` file or folder, or a hub
            dataset name.
        tokenizer: a tokenizer name or folder; ``None`` trains a byte-level BPE of ``vocab_size`` on the training
            documents (saved with the cache and exported with the model).
        block_size: tokens per training example.
        val_fraction: share of documents held out for validation (a seeded random split by document).
        split, text_column: for hub datasets and record files.
    """

    def __init__(self, source: str = "builtin", tokenizer: str | None = None, vocab_size: int = 4096,
                 block_size: int = 128, batch_size: int = 16, val_fraction: float = 0.1, seed: int = 1234,
                 split: str = "train", text_column: str = "text", shuffle: bool = True, num_workers: int = 0,
                 cache_dir: str | None = None, trust_remote_code: bool = False):
        super().__init__()
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}.")
        self.source, self.tokenizer_name, self.vocab_size = source, tokenizer, vocab_size
        self.block_size, self.batch_size, self.val_fraction, self.seed = block_size, batch_size, val_fraction, seed
        self.split, self.text_column, self.shuffle, self.num_workers = split, text_column, shuffle, num_workers
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        if looks_like_path(source):
            local_files(source)  # fail now, before any model is built, if the path is wrong

    # -- cache ---------------------------------------------------------------------------------------
    def _cache_key(self) -> str:
        files = []
        if not self.source.startswith("builtin") and Path(self.source).expanduser().exists():
            files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(self.source)]
        key = dict(source=self.source, files=files, tokenizer=self.tokenizer_name, vocab=self.vocab_size,
                   val=self.val_fraction, seed=self.seed, split=self.split, column=self.text_column, v=1)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / "text" / self._cache_key()

    def prepare_data(self) -> None:
        """Tokenize once (rank 0) into the cache; ``setup`` on every rank then only reads it."""
        if (self.cache_path / "train.npy").exists():
            return
        documents = load_documents(self.source, self.split, self.text_column)
        train_docs, val_docs = split_documents(documents, self.val_fraction, self.seed)
        if self.tokenizer_name is None:
            tokenizer = train_bpe_tokenizer(train_docs, self.vocab_size)
        else:
            tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_path.parent))
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, docs in (("train", train_docs), ("val", val_docs)):
            np.save(tmp / f"{name}.npy", _tokenize_and_join(tokenizer, docs))
        try:
            tmp.rename(self.cache_path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.prepare_data()
        self.tokenizer = load_tokenizer(str(self.cache_path / "tokenizer"))
        self.train_tokens = np.load(self.cache_path / "train.npy", mmap_mode="r")
        self.val_tokens = np.load(self.cache_path / "val.npy", mmap_mode="r")
        for name, tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) < self.block_size:
                raise ValueError(f"The {name} split of {self.source!r} has {len(tokens)} tokens, fewer than one "
                                 f"block of {self.block_size}: lower `block_size` or add data.")

    # -- loaders -------------------------------------------------------------------------------------
    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(PackedBlocks(self.train_tokens, self.block_size), batch_size=self.batch_size,
                                  shuffle=self.shuffle, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(PackedBlocks(self.val_tokens, self.block_size), batch_size=self.batch_size,
                                  num_workers=self.num_workers)

    def test_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()


def _tokenize_and_join(tokenizer, documents: list[str]) -> np.ndarray:
    """Token ids of all documents, each followed by EOS, as one uint32 stream."""
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = [t for doc in ids for t in (*doc, eos)]
    return np.asarray(stream, dtype=np.uint32)
