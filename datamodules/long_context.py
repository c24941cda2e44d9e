"""Long-context data for segment-recurrent LMs (UIO-LLMs and kin).

- ``PasskeyDataModule`` (the offline default): a synthetic passkey retrieval task. A sentence
  "The pass key is 4 7 1 2. Remember it." is hidden at a random depth of a filler text, and the document
  ends with "What is the pass key? The pass key is 4 7 1 2"; only the answer digits are labelled. Validation
  runs at several lengths (beyond the training length) with fixed samples, one dataloader per length.
- ``LongTextDataModule``: long documents (the built-in corpus, local files or a hub dataset, concatenated)
  cut into sequences of ``seq_length`` tokens, validated at ``val_seq_length``.

Batches are dicts ``input_ids [B, N]`` and ``labels [B, N]`` (-100 = ignored, the model shifts), as for
``CausalLM``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from effitrain.datamodules.sources import load_documents
from effitrain.datamodules.text import PackedBlocks, TextDataModule
from effitrain.datamodules.tokenizer import load_tokenizer
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class PasskeyDataset(Dataset):
    """Deterministic passkey documents of exactly ``length`` tokens: sample ``i`` is drawn from seed ``seed + i``.

    Args:
        pieces: token ids of ``filler``, ``needle_prefix``, ``needle_suffix``, ``question`` and ``digits``
            (a list of 10 id lists, one per digit).
        length: tokens per document.
        key_digits: digits in the pass key.
        min_gap: at least this many tokens between the end of the needle and the question (use one segment
            or more to force the answer through memory).
    """

    def __init__(self, pieces: dict, length: int, num_samples: int, key_digits: int = 4, min_gap: int = 0,
                 seed: int = 0):
        self.pieces, self.length, self.num_samples = pieces, length, num_samples
        self.key_digits, self.min_gap, self.seed = key_digits, min_gap, seed
        longest_key = key_digits * max(len(d) for d in pieces["digits"])
        fixed = len(pieces["needle_prefix"]) + len(pieces["needle_suffix"]) + len(pieces["question"])
        if fixed + 2 * longest_key + min_gap > length:
            raise ValueError(f"A passkey document of {length} tokens cannot hold the needle, the question and a "
                             f"gap of {min_gap} tokens: raise the length or lower `min_gap`.")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + index)
        digits = torch.randint(0, 10, (self.key_digits,), generator=generator).tolist()
        key = [t for d in digits for t in self.pieces["digits"][d]]
        needle = self.pieces["needle_prefix"] + key + self.pieces["needle_suffix"]
        tail = self.pieces["question"] + key
        room = self.length - len(needle) - len(tail)
        filler = self.pieces["filler"]
        filler = (filler * (room // len(filler) + 1))[:room]
        depth = int(torch.randint(0, room - self.min_gap + 1, (1,), generator=generator))
        ids = filler[:depth] + needle + filler[depth:] + tail
        labels = [-100] * (self.length - len(key)) + key
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


class PasskeyDataModule(L.LightningDataModule):
    """Synthetic passkey retrieval, offline.

    Args:
        tokenizer: the model's tokenizer (a folder such as ``artifacts/tiny_llama`` or a hub name).
        train_length: tokens per training document.
        val_lengths: validation document lengths (one dataloader each; go beyond ``train_length`` to test
            length generalisation).
        key_digits: digits in the pass key.
        min_gap: tokens between the needle and the question (at least one segment forces memory use).
        filler: ``classic`` (the usual repeated sentences) or ``builtin`` (text of the built-in corpus).
        num_train, num_val: samples per epoch / per validation length.
    """

    def __init__(self, tokenizer: str = "artifacts/tiny_llama", train_length: int = 256,
                 val_lengths: Sequence[int] = (256, 512, 1024), key_digits: int = 4, min_gap: int = 64,
                 filler: str = "classic", num_train: int = 100_000, num_val: int = 64, batch_size: int = 4,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if filler not in ("classic", "builtin"):
            raise ValueError(f"filler must be 'classic' or 'builtin', got {filler!r}.")
        self.tokenizer_name, self.train_length, self.val_lengths = tokenizer, train_length, list(val_lengths)
        self.key_digits, self.min_gap, self.filler = key_digits, min_gap, filler
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer = None

    @property
    def max_length(self) -> int:
        return max([self.train_length, *self.val_lengths])

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        filler_text = CLASSIC_FILLER if self.filler == "classic" else " ".join(load_documents("builtin")[:50])
        self.pieces = dict(filler=encode(filler_text), needle_prefix=encode(" The pass key is"),
                           needle_suffix=encode(". Remember it. "),
                           question=encode(" What is the pass key? The pass key is"),
                           digits=[encode(f" {d}") for d in range(10)])
        self.train_set = PasskeyDataset(self.pieces, self.train_length, self.num_train, self.key_digits,
                                        self.min_gap, seed=self.seed)
        # validation samples come from a seed range training never draws
        self.val_sets = [PasskeyDataset(self.pieces, length, self.num_val, self.key_digits, self.min_gap,
                                        seed=10**9 + self.seed + 7919 * i)
                         for i, length in enumerate(self.val_lengths)]

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                  num_workers=self.num_workers)

    def val_dataloader(self) -> list[StatefulDataLoader]:
        return [StatefulDataLoader(s, batch_size=self.batch_size, num_workers=self.num_workers)
                for s in self.val_sets]


class LongTextDataModule(TextDataModule):
    """Long sequences of concatenated documents: train on ``seq_length`` tokens, validate on ``val_seq_length``.

    Args:
        seq_length: tokens per training sequence (e.g. 32 segments of 1024 for UIO's long-book data).
        val_seq_length: tokens per validation sequence (default: ``seq_length``).
        Other arguments as ``TextDataModule`` (``source``: ``builtin``, local files or a hub dataset).
    """

    def __init__(self, seq_length: int = 1024, val_seq_length: int | None = None, batch_size: int = 1,
                 **kwargs):
        super().__init__(block_size=seq_length, batch_size=batch_size, **kwargs)
        self.seq_length, self.val_seq_length = seq_length, val_seq_length or seq_length

    @property
    def max_length(self) -> int:
        return max(self.seq_length, self.val_seq_length)

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(PackedBlocks(self.val_tokens, self.val_seq_length), batch_size=self.batch_size,
                                  num_workers=self.num_workers)

