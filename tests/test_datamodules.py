"""The shared datamodules: splits, packing, caching, response-only labels, local and hub-style loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from effitrain.datamodules.corpus import builtin_documents, split_documents
from effitrain.datamodules.images import ImageDataModule
from effitrain.datamodules.instructions import InstructionDataModule, arithmetic_records
from effitrain.datamodules.text import TextDataModule


def test_split_is_random_by_document_deterministic_and_disjoint():
    docs = [f"document {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert val != docs[-10:] and val != docs[:10]  # not an alphabetical / positional cut


def test_builtin_corpus_is_python_docs():
    docs = builtin_documents("python_docs")
    assert len(docs) > 400 and sum(map(len, docs)) > 1_000_000
    assert any("for_stmt" in d or "The \"for\" statement" in d for d in docs)


def test_text_packs_blocks_and_caches_tokens(small_corpus, tmp_path, monkeypatch):
    dm = TextDataModule(source=str(small_corpus), vocab_size=512, block_size=32, batch_size=4,
                        cache_dir=str(tmp_path))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"], batch["labels"])
    eos = dm.tokenizer.eos_token_id
    assert int((np.asarray(dm.train_tokens) == eos).sum()) == 54  # 60 documents, 10% held out, one EOS each
    # A second datamodule reads the cache: tokenizing again would fail here.
    monkeypatch.setattr("effitrain.datamodules.text._tokenize_and_join", lambda *a: pytest.fail("re-tokenized"))
    again = TextDataModule(source=str(small_corpus), vocab_size=512, block_size=32, cache_dir=str(tmp_path))
    again.setup()
    assert np.array_equal(again.train_tokens, dm.train_tokens)


def test_text_loads_jsonl_and_parquet_records(tmp_path):
    import datasets

    rows = [{"text": f"record number {i} " * 20} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    for name in ("a.jsonl", "b.parquet"):
        dm = TextDataModule(source=str(tmp_path / name), vocab_size=300, block_size=16,
                            cache_dir=str(tmp_path / f"cache_{name}"))
        dm.setup()
        assert len(dm.train_dataloader().dataset) > 0


def test_pretrained_tokenizer_by_path(small_corpus, tiny_lm_dir, tmp_path):
    dm = TextDataModule(source=str(small_corpus), tokenizer=str(tiny_lm_dir), block_size=32, cache_dir=str(tmp_path))
    dm.setup()
    assert len(dm.tokenizer) == 512 and int(np.asarray(dm.train_tokens).max()) < 512


def test_instructions_learn_only_the_response(tiny_lm_dir):
    dm = InstructionDataModule(tokenizer=str(tiny_lm_dir), num_examples=50, batch_size=4)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        learned = labels[labels != -100]
        text = dm.tokenizer.decode(learned)
        assert "### Response" not in text and text.endswith(dm.tokenizer.eos_token)
        assert torch.equal(ids[labels != -100], learned)
        assert int(mask.sum()) == int((ids != dm.tokenizer.pad_token_id).sum()) or mask.all()
    assert arithmetic_records(5, seed=1) == arithmetic_records(5, seed=1) != arithmetic_records(5, seed=2)


def test_instructions_train_on_inputs_learns_prompt_and_response(tiny_lm_dir):
    """``train_on_inputs`` (LLM-Adapters' finetune.py): every real token is a label, the prompt included."""
    dm = InstructionDataModule(tokenizer=str(tiny_lm_dir), num_examples=50, batch_size=4, train_on_inputs=True)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        real = mask.bool()
        assert torch.equal(labels[real], ids[real]) and (labels[~real] == -100).all()
        assert "### Response" in dm.tokenizer.decode(labels[real])


def test_instructions_from_alpaca_jsonl(tiny_lm_dir, tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 10))
    dm = InstructionDataModule(tokenizer=str(tiny_lm_dir), source=str(path), batch_size=2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 20


def test_digits_images_and_calibration_subset():
    dm = ImageDataModule(image_size=24, batch_size=8, limit_train=100, auto_augment="rand-m9-mstd0.5-inc1",
                         re_prob=0.25)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and dm.num_classes == 10
    assert len(dm.train_set) == 100 and len(dm.val_set) == 360
    assert set(dm.val_set.targets.tolist()) == set(range(10))


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(folder / f"{i}.png")
    dm = ImageDataModule(source=str(tmp_path), image_size=16, batch_size=2)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.train_set) == 8
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 3, 16, 16)
