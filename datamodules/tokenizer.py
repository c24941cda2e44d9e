"""Tokenizers: a pretrained one by name/path through ``AutoTokenizer``, or a byte-level BPE trained on
the training documents with ``tokenizers`` and wrapped as a ``PreTrainedTokenizerFast`` so that it saves
and loads like any other transformers tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as BOS/EOS and ``<|pad|>`` for padding."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=EOS)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with a message that says what to do when it fails, and a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the tokenizer {name_or_path!r}: it is not a local folder with a tokenizer and "
            "could not be fetched from the hub (no network?). Give the path of a saved model/tokenizer folder, "
            f"or leave `tokenizer` unset to train a BPE on the data. ({type(err).__name__}: {err})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
