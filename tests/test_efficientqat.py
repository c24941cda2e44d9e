"""EfficientQAT recipes: Block-AP (per-block MSE below round-to-nearest, disk caches) and E2E-QP (only the
step sizes change), each run with a Lightning Trainer on a tiny random LLaMA and random tokens."""

import json

import lightning as L
import pytest
import torch
from effitrain.lightning_modules.efficientqat_block_ap import EfficientQATBlockAP
from effitrain.lightning_modules.efficientqat_e2e_qp import EfficientQATE2EQP
from effitrain.methods.gptq_format import load_quantized
from effitrain.methods.quantization import QuantLinear
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM


class RandomTokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        # a repeated pattern gives the LM something to learn in a few steps
        base = torch.randint(0, vocab, (n, length // 2), generator=g)
        self.ids = torch.cat([base, base], dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class TinyData(L.LightningDataModule):
    block_size = 32
    tokenizer = None

    def train_dataloader(self):
        return DataLoader(RandomTokens(16, 32, 96, 0), batch_size=4)

    def val_dataloader(self):
        return DataLoader(RandomTokens(8, 32, 96, 1), batch_size=4)


def make_fp_model(folder):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def run_block_ap(tmp_path, name, **kwargs):
    module = EfficientQATBlockAP(str(make_fp_model(tmp_path / "fp")), bits=2, group_size=32, epochs_per_block=3,
                                 quant_lr=1e-2, weight_lr=1e-3, export_dir=str(tmp_path / name), **kwargs)
    trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=TinyData())
    return module, tmp_path / name


@pytest.fixture(scope="module")
def block_ap_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("block_ap")
    return (tmp_path, *run_block_ap(tmp_path, "ram"))


def test_block_ap_beats_rtn_in_every_block(block_ap_run):
    tmp_path, module, folder = block_ap_run
    stats = json.loads((folder / "block_ap_stats.json").read_text())
    assert len(stats) == 2 and all(s["train_steps"] == 3 * 4 for s in stats)
    for s in stats:  # the trained block's output is closer to the FP block's than round-to-nearest's
        assert s["block_ap_mse"] < 0.9 * s["rtn_mse"], s
    # after the last block the fp cache holds the FP model's last block output (the FP chain), the quant
    # cache the packed model's (the quantized chain)
    ids = TinyData().train_dataloader().dataset.ids
    outputs = {}
    for name, model in (("fp", LlamaForCausalLM.from_pretrained(tmp_path / "fp")), ("q", load_quantized(folder))):
        hook = model.model.layers[-1].register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
    fp_out = outputs["fp"][0] if isinstance(outputs["fp"], tuple) else outputs["fp"]
    q_out = outputs["q"][0] if isinstance(outputs["q"], tuple) else outputs["q"]
    torch.testing.assert_close(module.fp_cache.data.float(), fp_out, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(module.quant_cache.data.float(), q_out, rtol=5e-3, atol=5e-3)
    assert not torch.allclose(fp_out, q_out, atol=1e-3)


def test_block_ap_disk_cache_gives_the_same_model(block_ap_run, tmp_path):
    _, _, folder = block_ap_run
    _, disk = run_block_ap(tmp_path, "disk", cache_dir=str(tmp_path / "caches"))
    assert (tmp_path / "caches" / "fp_inputs.bin").stat().st_size == 16 * 32 * 64 * 2
    ram, other = load_quantized(folder), load_quantized(disk)
    assert sum(isinstance(m, QuantLinear) for m in ram.modules()) == 2 * 7
    for key, value in ram.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_e2e_qp_trains_only_the_scales(block_ap_run, tmp_path):
    folder = block_ap_run[2]
    module = EfficientQATE2EQP(str(folder), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                               export_dir=str(tmp_path / "e2e"))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == 2 * sum(o * i // 32 for o, i in [(64, 64)] * 4 + [(128, 64)] * 2 + [(64, 128)])
    ids = TinyData().train_dataloader().dataset.ids

    def loss():
        with torch.no_grad():
            return module.model(input_ids=ids, labels=ids).loss.item()

    loss_before = loss()
    trainer(tmp_path, max_steps=8, limit_val_batches=2, gradient_clip_val=0.3).fit(module, datamodule=TinyData())
    assert loss() < loss_before
    after = module.model.state_dict()
    for key, value in before.items():
        if key.endswith(".scales"):
            assert not torch.equal(after[key].float(), value.float()), key
        else:
            assert torch.equal(after[key], value), key
    reloaded = load_quantized(tmp_path / "e2e")
    for key, value in after.items():  # written with fp16 scales, everything else unchanged
        expected = value.half() if key.endswith(".scales") else value
        assert torch.equal(reloaded.state_dict()[key].to(expected.dtype), expected), key
