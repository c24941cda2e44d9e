"""UIOLM under Lightning: manual optimisation, checkpoints with the reservoir RNG, 2-process DDP with unequal lengths."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from effitrain.datamodules.long_context import PasskeyDataModule
from effitrain.lightning_modules.uio_lm import UIOLM
from effitrain.methods.incremental_tbptt import IncrementalTBPTT
from effitrain.methods.reservoir import RecencyWindow
from effitrain.models.memory_lm import MemoryLM
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SEG = 16
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1)
LENGTHS = [3, 5, 2, 4]  # segments per sequence: rank 0 gets sequences 0 and 2, rank 1 gets 1 and 3


class Sequences(Dataset):
    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(2, 64, (LENGTHS[index] * SEG,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids.clone()}


def tiny_uio(**kwargs) -> UIOLM:
    torch.manual_seed(0)
    module = UIOLM(pretrained=None, config=TINY, segment_length=SEG, num_memory_tokens=4, encoder_rank=4,
                   encoder_alpha=8, transfer_rank=4, transfer_alpha=8, window=1, sampler="recency",
                   **{"optimizer": functools.partial(torch.optim.SGD, lr=0.5), **kwargs})
    with torch.no_grad():  # non-zero LoRA B: every trainable tensor gets a gradient from the first step
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return module


def trainable(module: UIOLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.model.trainable_state_dict().items()}


def test_ddp_unequal_lengths_equals_one_process_mean(tmp_path, monkeypatch):
    """Two gloo ranks whose sequences have different segment counts: one all-reduce per step, no hang, and the
    parameters after two steps equal one process averaging both ranks' gradients, clipping and stepping."""
    # Lightning always gives DDP training a shuffling DistributedSampler seeded by PL_GLOBAL_SEED: fix the seed
    # and replay that sampler's order for the reference.
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    order = [list(DistributedSampler(Sequences(), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    reference = tiny_uio()
    start = trainable(reference)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    data = Sequences()
    for step in range(2):
        total = None
        for index in (order[0][step], order[1][step]):
            sample = data[index]
            tbptt = IncrementalTBPTT(RecencyWindow(1))
            reference.model.incremental_backward(sample["input_ids"][None], sample["labels"][None], tbptt)
            grads = [p.grad.clone() for p in reference.parameters() if p.requires_grad]
            reference.zero_grad(set_to_none=True)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        for param, grad in zip([p for p in reference.parameters() if p.requires_grad], total, strict=True):
            param.grad = grad / 2
        torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()

    module = tiny_uio()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Sequences(), batch_size=1, shuffle=False))
    after = trainable(module)
    expected = trainable(reference)
    assert any(not torch.equal(after[k], start[k]) for k in after)
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_recipe_trains_only_memory_parameters_and_checkpoints_rng(tmp_path, tiny_lm_dir):
    """Two passkey steps: the frozen base is untouched, the checkpoint holds only the trainable tensors plus the
    reservoir generator state, and loading it restores the generator."""
    module = UIOLM(pretrained=str(tiny_lm_dir), segment_length=32, num_memory_tokens=4, encoder_rank=4,
                   transfer_rank=4, window=1, eval_memory=["on", "zero"], export_dir=str(tmp_path / "export"))
    base_before = {k: v.clone() for k, v in module.model.base.state_dict().items() if "lora_" not in k}
    memory_before = trainable(module)
    data = PasskeyDataModule(tokenizer=str(tiny_lm_dir), train_length=128, val_lengths=[128, 256], min_gap=32,
                             batch_size=2, num_val=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=data)
    assert {"val/acc_on@128", "val/acc_zero@256", "val/loss"} <= set(trainer.callback_metrics)
    for key, value in module.model.base.state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), key
    assert any(not torch.equal(v, memory_before[k]) for k, v in trainable(module).items())
    reloaded = MemoryLM.from_pretrained(tmp_path / "export")
    ids = torch.randint(2, 64, (1, 64))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), module.model(ids))

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in module.model.trainable_state_dict()}
    saved_rng = checkpoint["uio_policy"][0]["rng_state"]
    assert torch.equal(saved_rng, module.tbptt.policy.generator.get_state())
    fresh = UIOLM(pretrained=str(tiny_lm_dir), segment_length=32, num_memory_tokens=4, encoder_rank=4,
                  transfer_rank=4, window=1, seed=123)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.tbptt.policy.generator.get_state(), saved_rng)


def test_rejects_contexts_beyond_the_rope_budget_before_training(tmp_path, tiny_lm_dir):
    data = PasskeyDataModule(tokenizer=str(tiny_lm_dir), train_length=128, val_lengths=[8192], min_gap=32)
    module = UIOLM(pretrained=str(tiny_lm_dir), segment_length=32, num_memory_tokens=4, encoder_rank=4,
                   transfer_rank=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="longest context is"):
        trainer.fit(module, datamodule=data)


def test_passkey_documents_have_exact_length_and_labels_only_on_the_key(tiny_lm_dir):
    data = PasskeyDataModule(tokenizer=str(tiny_lm_dir), train_length=128, val_lengths=[256], min_gap=40)
    data.setup()
    sample = data.val_sets[0][3]
    assert sample["input_ids"].shape == sample["labels"].shape == (256,)
    key = sample["labels"][sample["labels"] != -100]
    digits = data.tokenizer.decode(key).split()
    assert len(digits) == 4 and all(d.isdigit() for d in digits)
    text = data.tokenizer.decode(sample["input_ids"])
    assert f"The pass key is {' '.join(digits)}. Remember it." in text
    needle_end = text.index("Remember it.")
    assert len(data.tokenizer(text[needle_end:])["input_ids"]) > 40  # the question is at least min_gap away
    assert torch.equal(data.val_sets[0][3]["input_ids"], sample["input_ids"])  # deterministic


def test_bf16_true_keeps_fp32_master_weights_and_decays_the_memory_embedding(tmp_path):
    """Under ``bf16-true`` the frozen base is bf16 but the trainable tensors and AdamW's state stay fp32, and
    the memory embedding is in the decayed group (the official run's single AdamW group)."""
    module = tiny_uio(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Sequences(), batch_size=1))
    trained = dict(module.named_parameters())
    assert all(p.dtype == torch.float32 for p in trained.values() if p.requires_grad)
    assert trained["model.base.model.embed_tokens.weight"].dtype == torch.bfloat16
    optimizer = trainer.optimizers[0]
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.1 and "model.memory_embedding" in group["param_names"]
