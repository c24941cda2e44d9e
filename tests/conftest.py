"""Shared fixtures: offline hub, a per-session cache, a tiny LLaMA folder with its tokenizer, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def effitrain_cache(tmp_path_factory) -> Path:
    """Tokenized data is cached once per test session, away from the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["EFFITRAIN_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of 60 .txt documents from the pydoc topics (fast to tokenize)."""
    from effitrain.datamodules.corpus import pydoc_topics

    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(pydoc_topics()[:60]):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, small_corpus) -> Path:
    """A tiny random LLaMA (width 128, 2 layers) saved with a 512-token BPE, as ``from_pretrained`` expects."""
    import torch
    from effitrain.datamodules.tokenizer import train_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = train_bpe_tokenizer((p.read_text() for p in sorted(small_corpus.glob("*.txt"))), vocab_size=512)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)  # the same weights in every session (pinned losses start from them)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(args: list[str], cwd: Path | None = None):
    """Run the CLI in this process (faster than a subprocess) from ``cwd``; returns the LightningCLI."""
    from effitrain.lightning_modules.cli import build_cli

    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return build_cli(args)
    finally:
        os.chdir(previous)
