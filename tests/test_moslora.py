"""MoSLoRA as a peft LoRA variant (methods/moslora.py): the equalities of arXiv 2406.11909 on tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from effitrain.methods.moslora import (
    MoSLoraConfig,
    MoSLoraLinear,
    load_moslora,
    plain_lora_state_dict,
    save_as_plain_lora,
)
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype: torch.dtype = torch.float32, width: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=width * 3 // 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def randomize_B(model: nn.Module, std: float = 0.2) -> None:
    """B = 0 at init hides every mixer effect; give B values so the equalities below are not trivial."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


@pytest.mark.parametrize("mixer_init", ["kaiming", "orthogonal", "identity"])
def test_init_output_equals_base_model(mixer_init: str) -> None:
    base = tiny_llama()
    x = tokens()
    expected = base(x).logits
    model = get_peft_model(base, MoSLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, mixer_init=mixer_init))
    layers = [m for m in model.modules() if isinstance(m, MoSLoraLinear)]
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    mixer = layers[0].lora_AB["default"]
    assert mixer.weight.shape == (4, 4) and mixer.bias is None and mixer.weight.requires_grad
    if mixer_init == "identity":
        assert torch.equal(mixer.weight, torch.eye(4))
    if mixer_init == "orthogonal":
        torch.testing.assert_close(mixer.weight @ mixer.weight.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x).logits, expected, atol=0, rtol=0)


def test_zero_mixer_and_dora_are_refused() -> None:
    with pytest.raises(ValueError, match="never trains"):
        MoSLoraConfig(r=4, target_modules=["q_proj"], mixer_init="zeros")
    with pytest.raises(ValueError, match="DoRA"):
        MoSLoraConfig(r=4, target_modules=["q_proj"], use_dora=True)


def test_forward_is_W0x_plus_s_BMA_x() -> None:
    """Eq. 4: y = W0·x + (alpha/r)·B·M·A·x, checked on one layer against the explicit formula."""
    model = get_peft_model(tiny_llama(), MoSLoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]))
    randomize_B(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    A, M, B = layer.lora_A["default"].weight, layer.lora_AB["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + (12 / 4) * x @ (B @ M @ A).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_W0() -> None:
    base = tiny_llama(torch.float64)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, MoSLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    randomize_B(model)
    x = tokens()
    unmerged = model(x).logits
    model.merge_adapter()
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-10, rtol=0)
    model.unmerge_adapter()
    for name, param in model.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in w0:
            torch.testing.assert_close(param, w0[key], atol=1e-13, rtol=0)
    # merge_and_unload leaves a plain transformers model with the same outputs
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not any(isinstance(m, MoSLoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-10, rtol=0)


def test_frozen_identity_mixer_is_plain_lora() -> None:
    """M = I, frozen: outputs, gradients and AdamW steps equal peft's LoRA with the same A, B (dropout included)."""
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LLAMA_TARGETS)
    mos = get_peft_model(tiny_llama(), MoSLoraConfig(mixer_init="identity", **kwargs))
    lora = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    randomize_B(mos)
    lora.load_state_dict(mos.state_dict(), strict=False)  # same A, B; lora_AB is unexpected there
    for name, param in mos.named_parameters():
        if "lora_AB" in name:
            param.requires_grad_(False)
    mos.train(), lora.train()
    mos_params = {n.replace(".lora_AB", ""): p for n, p in mos.named_parameters() if p.requires_grad}
    lora_params = dict((n, p) for n, p in lora.named_parameters() if p.requires_grad)
    assert mos_params.keys() == lora_params.keys()
    opt_mos = torch.optim.AdamW(mos_params.values(), lr=1e-2)
    opt_lora = torch.optim.AdamW(lora_params.values(), lr=1e-2)
    x = tokens()
    for step in range(3):
        torch.manual_seed(step)
        loss_mos = mos(input_ids=x, labels=x).loss
        torch.manual_seed(step)
        loss_lora = lora(input_ids=x, labels=x).loss
        torch.testing.assert_close(loss_mos, loss_lora, atol=1e-6, rtol=0)
        loss_mos.backward(), loss_lora.backward()
        for name, param in mos_params.items():
            torch.testing.assert_close(param.grad, lora_params[name].grad, atol=1e-6, rtol=1e-5)
        opt_mos.step(), opt_lora.step(), opt_mos.zero_grad(), opt_lora.zero_grad()
    for name, param in mos_params.items():
        torch.testing.assert_close(param, lora_params[name], atol=1e-5, rtol=1e-5)


def test_fixed_orthogonal_mixer_follows_lora_from_MA_under_sgd() -> None:
    """The paper's appendix: with M orthogonal and frozen, SGD on (A, B) moves ΔW exactly as LoRA started from A' = M·A."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    kwargs = dict(r=4, lora_alpha=4, target_modules=["0", "2"])
    mos = get_peft_model(copy.deepcopy(net), MoSLoraConfig(mixer_init="orthogonal", **kwargs))
    lora = get_peft_model(copy.deepcopy(net), LoraConfig(**kwargs))
    randomize_B(mos, std=0.3)
    lora.load_state_dict({k.replace(".lora_AB", ""): v for k, v in mos.state_dict().items() if ".lora_AB" not in k},
                         strict=False)
    with torch.no_grad():  # A' = M·A
        for name in ("0", "2"):
            m_layer, l_layer = mos.base_model.model.get_submodule(name), lora.base_model.model.get_submodule(name)
            l_layer.lora_A["default"].weight.copy_(m_layer.lora_AB["default"].weight @ m_layer.lora_A["default"].weight)
            m_layer.lora_AB["default"].weight.requires_grad_(False)
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64)
    opt_mos = torch.optim.SGD([p for p in mos.parameters() if p.requires_grad], lr=0.1)
    opt_lora = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        for model, opt in ((mos, opt_mos), (lora, opt_lora)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        for name in ("0", "2"):
            delta_mos = mos.base_model.model.get_submodule(name).get_delta_weight("default")
            delta_lora = lora.base_model.model.get_submodule(name).get_delta_weight("default")
            torch.testing.assert_close(delta_mos, delta_lora, atol=1e-12, rtol=0)
    assert delta_mos.abs().max() > 1e-3  # the trajectory moved


def test_save_load_and_plain_lora_export(tmp_path: Path) -> None:
    base = lambda: tiny_llama(width=128)  # noqa: E731
    model = get_peft_model(base(), MoSLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_B(model)
    x = tokens()
    expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_moslora(base(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(x).logits, expected, atol=0, rtol=0)
    assert sum("lora_AB" in n for n, _ in reloaded.named_parameters()) == 4
    # the file holds exactly the trainable tensors: 2 layers x (q: (128+128)*4 + 16, v: (128+64)*4 + 16) floats
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    n_adapter = 2 * ((128 + 128) * 4 + 16 + (128 + 64) * 4 + 16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_adapter
    assert 4 * n_adapter < adapter_bytes < 4 * n_adapter + 4096  # + the safetensors header
    assert adapter_bytes < 0.02 * sum(p.numel() * 4 for p in base().parameters())

    # the official fork's adapter_config.json flags the mixer with use_moslora (no mixer_init); same lora_AB keys
    config_file = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("mixer_init"), saved.update(use_moslora=True, peft_type="LORA")
    config_file.write_text(json.dumps(saved))
    torch.testing.assert_close(load_moslora(base(), tmp_path / "adapter")(x).logits, expected, atol=0, rtol=0)

    save_as_plain_lora(model, tmp_path / "plain")
    assert not any("lora_AB" in k for k in plain_lora_state_dict(model))
    plain = PeftModel.from_pretrained(base(), tmp_path / "plain")
    assert not any(isinstance(m, MoSLoraLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="plain LoRA"):
        load_moslora(base(), tmp_path / "plain")


def test_timm_vit_linear_layers() -> None:
    """qkv, proj, fc1, fc2 of a timm ViT: init = base, merged = unmerged."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = vit(images)
    with pytest.raises(ValueError, match="Conv2d"):  # 'proj' also names patch_embed.proj
        get_peft_model(copy.deepcopy(vit), MoSLoraConfig(r=4, target_modules=["qkv", "proj", "fc1", "fc2"]))
    model = get_peft_model(vit, MoSLoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1", "fc2"],
                                               modules_to_save=["head"]))
    assert sum(isinstance(m, MoSLoraLinear) for m in model.modules()) == 8
    torch.testing.assert_close(model(images), expected, atol=0, rtol=0)
    randomize_B(model)
    unmerged = model(images)
    model.merge_adapter()
    torch.testing.assert_close(model(images), unmerged, atol=1e-5, rtol=1e-5)


LLAMA3_8B = dict(  # meta-llama/Meta-Llama-3-8B config.json
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
)


def _full_config_adapter(kind: str) -> MoSLoraConfig | LoraConfig:
    cfg = yaml.safe_load((ROOT / "configs/moslora/full/moslora_llama3_8b_commonsense.yaml").read_text())
    adapter = dict(cfg["model"]["init_args"]["adapter"]["init_args"])
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    if kind == "lora":
        adapter.pop("mixer_init", None)
        return LoraConfig(**adapter)
    return MoSLoraConfig(**adapter)


@pytest.mark.parametrize("kind, expected", [("lora", 28_311_552), ("moslora", 28_311_552 + 40_960)])
def test_llama3_8b_full_config_trainable_count_on_meta(kind: str, expected: int) -> None:
    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        model = get_peft_model(base, _full_config_adapter(kind))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
