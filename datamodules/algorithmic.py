"""Synthetic sequence tasks whose answers only the decoder blocks can compute: a testbed for weight
quantization (EfficientQAT) where a tiny model's quality visibly depends on the precision of its blocks.

Task ``reverse``: a random string of ``length`` symbols, a separator, then the string reversed::

    <bos> x_1 ... x_L | x_L ... x_1

Only the answer (after ``|``) is scored: its labels are the tokens, the prompt's are -100 (like response-only
instruction data), so the loss/perplexity measure the answer alone. Training and validation strings are drawn
from disjoint seeds, so validation measures the learned algorithm, not memorised strings. Reversal needs
position-based attention (the embedding and head alone cannot do it), so noise in the blocks' weights shows up
as wrong answers.
"""

from __future__ import annotations

import string

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerFast

BOS, SEP, PAD = "<bos>", "|", "<pad>"
TASKS = ("reverse", "modsum", "markov2")


def symbol_tokenizer(num_symbols: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``num_symbols`` letters plus ``<bos>``, ``|``, ``<pad>`` (space-separated)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    symbols = list((string.ascii_lowercase + string.ascii_uppercase)[:num_symbols])
    vocab = {tok: i for i, tok in enumerate([BOS, SEP, PAD, *symbols])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=PAD)


def answer(task: str, x: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """The answer symbols (0-based) of strings ``x`` [n, L] (0-based symbols)."""
    if task == "reverse":
        return x.flip(1)
    return (x + x.flip(1)) % num_symbols  # modsum


def markov2_table(num_symbols: int, branching: int, seed: int) -> torch.Tensor:
    """A random order-2 transition table [V, V, V]: each context (a, b) allows ``branching`` successors with
    random (Dirichlet(1)) probabilities. The same ``seed`` gives the same language for every split."""
    g = torch.Generator().manual_seed(seed)
    v = num_symbols
    table = torch.zeros(v, v, v)
    successors = torch.rand(v, v, v, generator=g).argsort(-1)[..., :branching]
    weights = -torch.rand(v, v, branching, generator=g).log()  # Exp(1) draws: a normalised vector is Dirichlet(1)
    table.scatter_(-1, successors, weights / weights.sum(-1, keepdim=True))
    return table


def markov2_entropy(table: torch.Tensor) -> float:
    """Mean next-token entropy (nats) under the chain's contexts, weighted uniformly: the floor of the loss."""
    p = table.clamp_min(1e-12)
    return float(-(table * p.log()).sum(-1).mean())


class Markov2Strings(Dataset):
    """Sequences of an order-2 Markov chain (``markov2_table``); every token after the first two is scored.

    The next token is a random function of the previous two, so the model must attend to the previous token and
    look the pair up in its MLP weights (V^2 contexts): a capacity-bound lookup whose loss never saturates.
    """

    def __init__(self, table: torch.Tensor, size: int, length: int, seed: int, first_symbol_id: int = 3):
        g = torch.Generator().manual_seed(seed)
        v = table.shape[0]
        x = torch.zeros(size, length, dtype=torch.long)
        x[:, :2] = torch.randint(0, v, (size, 2), generator=g)
        for t in range(2, length):
            x[:, t] = torch.multinomial(table[x[:, t - 2], x[:, t - 1]], 1, generator=g).squeeze(1)
        self.input_ids = x + first_symbol_id
        self.labels = self.input_ids.clone()
        self.labels[:, :2] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class TaskStrings(Dataset):
    """``size`` examples of ``task`` as ``input_ids``/``labels`` (prompt labels -100), generated from ``seed``."""

    def __init__(self, task: str, size: int, length: int, num_symbols: int, seed: int, first_symbol_id: int = 3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, num_symbols, (size, length), generator=g)
        bos = torch.zeros(size, 1, dtype=torch.long)
        sep = torch.ones(size, 1, dtype=torch.long)
        y = answer(task, x, num_symbols)
        self.input_ids = torch.cat([bos, x + first_symbol_id, sep, y + first_symbol_id], dim=1)
        self.labels = self.input_ids.clone()
        self.labels[:, : length + 2] = -100  # the model shifts: position L+1 (|) predicts the first answer token

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class AlgorithmicDataModule(L.LightningDataModule):
    """Synthetic task data for causal LMs (``task: reverse``).

    Args:
        task: ``reverse`` (the only task so far).
        length: symbols per string; a sequence is ``2 * length + 2`` tokens.
        num_symbols: alphabet size (at most 52).
        train_size, val_size: examples per split (disjoint seeds).
        batch_size: examples per batch.
        seed: seed of the training strings (validation uses ``seed + 1``).
        shuffle: shuffle the training examples each epoch.
    """

    def __init__(self, task: str = "reverse", length: int = 15, num_symbols: int = 16, train_size: int = 20000,
                 val_size: int = 512, batch_size: int = 32, seed: int = 0, shuffle: bool = True,
                 branching: int = 4):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}: use one of {TASKS}.")
        if not 2 <= num_symbols <= 52:
            raise ValueError(f"num_symbols must be in [2, 52], got {num_symbols}.")
        if length < 1 or train_size < batch_size:
            raise ValueError(f"Need length >= 1 and train_size >= batch_size (got {length}, {train_size}).")
        self.task, self.length, self.num_symbols = task, length, num_symbols
        self.train_size, self.val_size, self.batch_size = train_size, val_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.branching = branching
        self.block_size = length if task == "markov2" else 2 * length + 2
        self.tokenizer = symbol_tokenizer(num_symbols)

    def setup(self, stage: str | None = None) -> None:
        if self.task == "markov2":
            table = markov2_table(self.num_symbols, self.branching, self.seed)
            self.train_set = Markov2Strings(table, self.train_size, self.block_size, self.seed + 1)
            self.val_set = Markov2Strings(table, self.val_size, self.block_size, self.seed + 2)
            return
        self.train_set = TaskStrings(self.task, self.train_size, self.length, self.num_symbols, self.seed)
        self.val_set = TaskStrings(self.task, self.val_size, self.length, self.num_symbols, self.seed + 1)

    def train_dataloader(self) -> StatefulDataLoader:
        # resumable: Lightning saves the loader's position, so a resumed run sees the same batches
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader
