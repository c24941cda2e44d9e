"""The adapter fine-tuning recipe (lightning_modules/adapter*.py): trainable-only optimizer and checkpoints,
exact resume, and exports that peft / transformers / timm load with the trained model's outputs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from effitrain.datamodules.instructions import InstructionDataModule, arithmetic_records, format_prompt
from effitrain.datamodules.tokenizer import train_bpe_tokenizer
from effitrain.lightning_modules.adapter_lm import AdapterCausalLM
from effitrain.lightning_modules.adapter_vit import AdapterImageClassifier
from effitrain.lightning_modules.causal_lm import load_causal_lm
from effitrain.methods.moslora import MoSLoraConfig, load_moslora
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, PeftModel
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok")
    docs = [" ".join(format_prompt(r)) for r in arithmetic_records(200, 0)]
    train_bpe_tokenizer(docs, vocab_size=300).save_pretrained(path)
    return str(path)


def lm_module(adapter=None, **kwargs) -> AdapterCausalLM:
    torch.manual_seed(0)  # same base weights in every call (they are not in the checkpoints)
    adapter = adapter or MoSLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return AdapterCausalLM(adapter=adapter, config=TINY, **kwargs)


def data(tokenizer_dir: str) -> InstructionDataModule:
    return InstructionDataModule(tokenizer=tokenizer_dir, num_examples=96, batch_size=8, max_length=64)


def trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def test_optimizer_and_checkpoint_hold_only_the_adapter(tmp_path: Path, tokenizer_dir: str) -> None:
    module = lm_module()
    adapter_names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert adapter_names and all(".lora_" in n for n in adapter_names)
    assert sum(".lora_AB." in n for n in adapter_names) == 6  # 2 layers x 3 targets
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 2, callbacks=[ckpt]).fit(module, datamodule=data(tokenizer_dir))
    optimizer_params = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in module.parameters() if p.requires_grad}
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert set(state) == adapter_names


def test_resume_matches_an_uninterrupted_run(tmp_path: Path, tokenizer_dir: str) -> None:
    straight = lm_module()
    trainer(tmp_path / "a", 6).fit(straight, datamodule=data(tokenizer_dir))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", 3, callbacks=[ckpt]).fit(lm_module(), datamodule=data(tokenizer_dir))
    resumed = lm_module()
    trainer(tmp_path / "b", 6).fit(resumed, datamodule=data(tokenizer_dir), ckpt_path=tmp_path / "b" / "last.ckpt")

    expected = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(p, lm_module().state_dict()[n]) for n, p in expected.items() if "lora_B" in n)


def test_lm_exports_load_with_peft_and_transformers(tmp_path: Path, tokenizer_dir: str) -> None:
    module = lm_module(export_dir=str(tmp_path / "adapter"), merged_dir=str(tmp_path / "merged"))
    trainer(tmp_path, 3).fit(module, datamodule=data(tokenizer_dir))
    x = torch.randint(0, 300, (2, 12))
    module.eval()
    expected = module(x).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    native = load_moslora(lm_module().model.get_base_model(), tmp_path / "adapter" / "moslora").eval()
    torch.testing.assert_close(native(x).logits, expected, atol=0, rtol=0)
    torch.manual_seed(0)  # the base's weights, as lm_module() builds them
    folded = PeftModel.from_pretrained(load_causal_lm(None, TINY), tmp_path / "adapter").eval()
    torch.testing.assert_close(folded(x).logits, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "adapter" / "tokenizer.json").exists()


@pytest.mark.parametrize("adapter", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "attn.proj"], modules_to_save=["head"], use_dora=True),
    MoSLoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1", "fc2"], modules_to_save=["head"]),
], ids=["dora", "moslora"])
def test_vit_adapter_trains_and_merged_export_loads_in_timm(tmp_path: Path, adapter) -> None:
    torch.manual_seed(0)
    module = AdapterImageClassifier(
        adapter=adapter, model_name="vit_tiny_patch16_224", num_classes=10,
        model_kwargs=dict(img_size=32, patch_size=8, depth=2), export_dir=str(tmp_path / "adapter"),
        merged_dir=str(tmp_path / "merged"),
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("head" in n for n in trainable) and not any("patch_embed" in n or "blocks.0.norm" in n for n in trainable)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    trainer(tmp_path, 3).fit(module, DataLoader(TensorDataset(images, targets), batch_size=8))
    module.eval()
    expected = module(images)
    plain = timm.create_model(f"local-dir:{tmp_path / 'merged'}", pretrained=True).eval()
    torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
