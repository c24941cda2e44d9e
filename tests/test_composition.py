"""Compositions: a pruned model through Block-AP and E2E-QP with its mask kept (zeros exact through training,
packing, saving and loading), and the conflicts refused before training. Tiny random LLaMA, random tokens."""

import json

import pytest
import torch
from effitrain.lightning_modules.adapter_lm import AdapterCausalLM
from effitrain.lightning_modules.causal_lm import CausalLM
from effitrain.lightning_modules.efficientqat_block_ap import EfficientQATBlockAP
from effitrain.lightning_modules.efficientqat_e2e_qp import EfficientQATE2EQP
from effitrain.lightning_modules.pruned_lm import PrunedCausalLM
from effitrain.methods.blockwise_pruning import prune_causal_lm
from effitrain.methods.composition import check_pattern_fits_groups
from effitrain.methods.gptq_format import load_quantized, save_quantized
from effitrain.methods.moslora import MoSLoraConfig
from effitrain.methods.packing import pack_codes
from effitrain.methods.quant_peft import (
    QuantLoraLinear,
    QuantMoSLoraLinear,
    load_adapter_on_packed,
    with_quant_linear,
)
from effitrain.methods.quant_surgery import decoder_blocks, named_linears, quantize_model_rtn
from effitrain.methods.quantization import FakeQuantLinear, QuantLinear
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from tests.test_efficientqat import TinyData, make_fp_model, trainer

GROUP = 32


def pruned_folder(tmp_path, pattern: str | None):
    """The tiny LLaMA of test_efficientqat, magnitude-pruned (2:4 or 50% unstructured) in its blocks, saved with
    the sparsity.json the pruning recipe writes."""
    fp = make_fp_model(tmp_path / "fp")
    model = LlamaForCausalLM.from_pretrained(fp)
    nm = tuple(int(v) for v in pattern.split(":")) if pattern else None
    prune_causal_lm(model, [], "magnitude", None if nm else 0.5, nm)
    folder = tmp_path / f"pruned_{pattern or 'u50'}".replace(":", "_")
    model.save_pretrained(folder)
    (folder / "sparsity.json").write_text(json.dumps({"method": "magnitude", "pattern": pattern, "sparsity": 0.5}))
    return folder


def block_masks(folder) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM.from_pretrained(folder)
    return {f"{i}.{name}": m.weight != 0 for i, block in enumerate(decoder_blocks(model))
            for name, m in named_linears(block)}


def dequantized(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": m.dequantize(torch.float32) for i, block in enumerate(decoder_blocks(model))
            for name, m in block.named_modules() if isinstance(m, QuantLinear)}


def block_ap(folder, out, keep_mask: bool, **kwargs):
    module = EfficientQATBlockAP(str(folder), bits=2, group_size=GROUP, epochs_per_block=2, quant_lr=1e-2,
                                 weight_lr=1e-2, export_dir=str(out), keep_mask=keep_mask, **kwargs)
    trainer(out.parent, limit_val_batches=0).fit(module, datamodule=TinyData())
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pruned 2:4 → Block-AP (keep_mask) → E2E-QP (keep_mask), and Block-AP without keep_mask as the contrast."""
    tmp = tmp_path_factory.mktemp("compose")
    pruned = pruned_folder(tmp, "2:4")
    kept = block_ap(pruned, tmp / "bap_kept", keep_mask=True)
    lost = block_ap(pruned, tmp / "bap_lost", keep_mask=False)
    e2e = EfficientQATE2EQP(str(kept), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                            export_dir=str(tmp / "e2e"), keep_mask=True)
    scales_before = [m.scales.detach().clone() for m in e2e.quant_layers]
    trainer(tmp, max_steps=6, limit_val_batches=0).fit(e2e, datamodule=TinyData())
    assert all(not torch.equal(a, m.scales) for a, m in zip(scales_before, e2e.quant_layers, strict=True))
    return {"pruned": pruned, "kept": kept, "lost": lost, "e2e_module": e2e, "e2e": tmp / "e2e"}


def test_pruned_weights_stay_exactly_zero_through_block_ap_e2e_qp_packing_and_loading(chain):
    masks = block_masks(chain["pruned"])
    assert 0.49 < 1 - torch.cat([m.flatten() for m in masks.values()]).float().mean() <= 0.5
    stages = {"block_ap": load_quantized(chain["kept"]), "e2e_qp (memory)": chain["e2e_module"].model,
              "e2e_qp (loaded)": load_quantized(chain["e2e"])}
    for stage, model in stages.items():
        weights = dequantized(model)
        assert weights.keys() == masks.keys()
        for name, keep in masks.items():
            assert torch.count_nonzero(weights[name][~keep]) == 0, (stage, name)
            # the 2:4 pattern still holds: at most 2 nonzeros in every 4 consecutive inputs
            assert int((weights[name] != 0).reshape(-1, 4).sum(-1).max()) <= 2, (stage, name)
    # the pruned codes are their groups' zero points in the packed tensors
    for block in decoder_blocks(stages["e2e_qp (loaded)"]):
        layer = block.self_attn.q_proj
        q_minus_z = layer.codes() - layer.zeros()[layer.g_idx.long()]
        assert torch.equal(q_minus_z.t() == 0, layer.dequantize(torch.float32) == 0)
    summary = json.loads((chain["e2e"] / "sparsity.json").read_text())
    assert summary["kept_through"] == ["block_ap", "e2e_qp"] and summary["pattern"] == "2:4"
    assert summary["quantized_block_sparsity"] >= 0.5


def test_without_keep_mask_block_ap_trains_pruned_weights_back(chain):
    masks = block_masks(chain["pruned"])
    weights = dequantized(load_quantized(chain["lost"]))
    revived = sum(int(torch.count_nonzero(weights[n][~keep])) for n, keep in masks.items())
    assert revived > 0.1 * sum(int((~keep).sum()) for keep in masks.values())


def test_e2e_qp_export_equals_the_trained_model_with_fp16_scales(chain):
    trained = chain["e2e_module"].quant_layers
    loaded = [m for m in load_quantized(chain["e2e"]).modules() if isinstance(m, QuantLinear)]
    for a, b in zip(trained, loaded, strict=True):
        expected = (a.codes() - a.zeros()[a.g_idx.long()]).float() * a.scales.detach().half().float()[a.g_idx.long()]
        assert torch.equal(b.dequantize(torch.float32), expected.t())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_masked_fake_quant_equals_packed_dequantization(bits):
    """The packed layer's dequantized weight equals the masked fake-quant weight of the trained layer, exactly
    (steps rounded to fp16 as stored), and every pruned weight is 0 in both."""
    torch.manual_seed(bits)
    linear = torch.nn.Linear(128, 48, bias=False)
    keep = torch.rand(48, 128) > 0.5
    layer = FakeQuantLinear(linear, bits, 64, mask=keep)
    with torch.no_grad():  # "trained": weights, steps and zero points moved away from their init
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        layer.scale.mul_(1 + 0.2 * torch.rand_like(layer.scale)).copy_(layer.scale.half().float())
        layer.zero_point.add_(torch.randint(-1, 2, layer.zero_point.shape).float())
    fake = layer.quantized_weight().detach()
    packed = layer.to_quant_linear().dequantize(torch.float32)
    assert torch.equal(packed, fake)
    assert torch.count_nonzero(fake[~keep]) == 0
    assert torch.count_nonzero(layer.weight[~keep]) > 0  # the layer's own weight there is not zero


def test_masked_weights_receive_no_gradient():
    linear = torch.nn.Linear(64, 16, bias=False)
    keep = torch.rand(16, 64) > 0.5
    layer = FakeQuantLinear(linear, 4, 32, mask=keep)
    layer(torch.randn(8, 64)).square().sum().backward()
    assert torch.count_nonzero(layer.weight.grad[~keep]) == 0 and torch.count_nonzero(layer.weight.grad[keep]) > 0


# -- conflicts, refused before training ------------------------------------------------------------------
def test_nm_block_straddling_quant_groups_is_refused(tmp_path):
    folder = pruned_folder(tmp_path, "2:4")
    (folder / "sparsity.json").write_text(json.dumps({"pattern": "4:8"}))
    with pytest.raises(ValueError, match="M=8 does not divide it"):
        EfficientQATBlockAP(str(folder), bits=2, group_size=4, keep_mask=True)
    check_pattern_fits_groups("2:4", 64, {"q": 64})  # fits: no error
    with pytest.raises(ValueError, match="M=4 does not divide"):
        check_pattern_fits_groups("2:4", -1, {"q": 66})


def test_keep_mask_needs_a_pruned_model(tmp_path):
    with pytest.raises(ValueError, match="have no zeros: prune it first"):
        EfficientQATBlockAP(str(make_fp_model(tmp_path / "fp")), bits=2, group_size=GROUP, keep_mask=True)


def test_packed_base_refused_by_recipes_that_update_weights(chain):
    packed = str(chain["kept"])
    for build in (lambda: CausalLM(pretrained=packed), lambda: PrunedCausalLM(pretrained=packed),
                  lambda: EfficientQATBlockAP(packed, bits=2, group_size=GROUP)):
        with pytest.raises(ValueError, match="is a packed 2-bit model.*EfficientQATE2EQP"):
            build()


def test_e2e_keep_mask_needs_the_sparse_block_ap_output(chain):
    with pytest.raises(ValueError, match="has no sparsity.json: pack the pruned model"):
        EfficientQATE2EQP(str(chain["lost"]), keep_mask=True)


# -- adapters on a packed base (Q-PEFT) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_base(tmp_path_factory):
    """The tiny LLaMA, round-to-nearest w2g32, saved as a packed folder."""
    tmp = tmp_path_factory.mktemp("qpeft")
    model = quantize_model_rtn(LlamaForCausalLM.from_pretrained(make_fp_model(tmp / "fp")), 2, GROUP)
    return save_quantized(model, tmp / "packed", 2, GROUP)


ADAPTERS = {
    "moslora": lambda: MoSLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_on_packed_base_trains_only_the_adapter_and_exports_equal(packed_base, tmp_path, kind):
    module = AdapterCausalLM(adapter=ADAPTERS[kind](), pretrained=str(packed_base), task_eval_size=0,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                             export_dir=str(tmp_path / "adapter"), merged_dir=str(tmp_path / "merged"))
    quant = [m for m in module.model.modules() if isinstance(m, QuantLinear)]
    adapted = [m for m in module.model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(adapted) == 3 * 2 and all(isinstance(m.get_base_layer(), QuantLinear) for m in adapted)
    assert isinstance(adapted[0], QuantMoSLoraLinear) == (kind == "moslora")
    base_before = {k: v.clone() for k, v in module.model.get_base_model().state_dict().items() if ".lora_" not in k}
    ids = TinyData().train_dataloader().dataset.ids[:4]
    module.model(input_ids=ids, labels=ids).loss.backward()
    # the frozen base gets no gradient (codes and zeros are int buffers; the fp16 scales are frozen)
    assert all(m.scales.grad is None and not m.scales.requires_grad for m in quant)
    assert all(p.grad is None for n, p in module.model.named_parameters() if ".lora_" not in n)
    lora_a = [p for n, p in module.model.named_parameters() if ".lora_A." in n]
    assert lora_a and all(p.requires_grad for p in lora_a)
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in module.model.named_parameters() if ".lora_B." in n)
    module.model.zero_grad()
    trainer(tmp_path, max_steps=6, limit_val_batches=0).fit(module, datamodule=TinyData())
    after = module.model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        assert any(torch.count_nonzero(p) for n, p in module.model.named_parameters() if ".lora_B." in n)
        # the floating-point view deq(W0) + ΔW, a plain transformers folder; fp32, so 1e-5 is rounding only
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert not any(isinstance(m, QuantLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        # the adapter folder beside the packed base reloads to the same logits (for MoSLoRA: the plain-LoRA
        # fold A' = M·A and the native form with the mixers)
        folders = [tmp_path / "adapter"] + ([tmp_path / "adapter" / "moslora"] if kind == "moslora" else [])
        for folder in folders:
            reloaded = load_adapter_on_packed(packed_base, folder).eval()
            torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_in_place_merge_into_packed_codes_is_refused(packed_base):
    model = get_peft_model(load_quantized(packed_base), with_quant_linear(ADAPTERS["lora"]()))
    with pytest.raises(ValueError, match="cannot be merged into packed integer codes"):
        model.merge_and_unload()


def test_e2e_keep_mask_export_refuses_changed_codes(chain, tmp_path):
    module = EfficientQATE2EQP(str(chain["kept"]), keep_mask=True)
    layer = module.quant_layers[0]
    pruned = module._zero_code_mask(layer).t()  # [in, out] positions whose code is the zero point
    codes = layer.codes()
    codes[pruned] = (codes[pruned] + 1) % 4  # a pruned weight's code no longer equals its zero point
    layer.qweight.copy_(pack_codes(codes, layer.bits))
    with pytest.raises(RuntimeError, match="A pruned weight became nonzero"):
        module.save_export(tmp_path / "out")
