"""Adapters on a frozen packed low-bit base (the Q-PEFT setting of EfficientQAT, arXiv 2407.11062, Sec. 4.3):
LoRA or MoSLoRA (``effitrain.methods.moslora``) on the ``QuantLinear`` layers of a model written by Block-AP /
E2E-QP, with the integer codes, zero points and step sizes all frozen.

peft knows no ``QuantLinear``; ``with_quant_linear(config)`` registers ``QuantLoraLinear`` for it through
peft's custom-module mapping (the hook ``MoSLoraConfig`` uses for ``nn.Linear``), ahead of any other entry.
``QuantLoraLinear`` is peft's LoRA ``Linear`` (with the MoSLoRA variant), whose base forward dequantizes the
packed weight: ``y = deq(W0)·x + s·B·A·x`` (``QuantMoSLoraLinear``: ``+ s·B·M·A·x``).

The packed codes cannot hold ``deq(W0) + ΔW``, so peft's in-place ``merge`` is refused; instead:

* ``merge_dequantized(model)``: a plain transformers model (no peft, no ``QuantLinear``) whose Linears are
  ``deq(W0) + ΔW`` in floating point: the floating-point view of the fine-tuned model;
* the adapter folder (``PeftModel.save_pretrained``) beside the packed base folder, read back by
  ``load_adapter_on_packed(base_folder, adapter_folder)``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from effitrain.methods.gptq_format import load_quantized
from effitrain.methods.moslora import MoSLoraConfig, MoSLoraLinear, is_moslora_adapter
from effitrain.methods.quant_surgery import replace_module
from effitrain.methods.quantization import QuantLinear
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils import CONFIG_NAME
from torch import nn


class QuantLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a frozen ``QuantLinear``."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("A LoRA update cannot be merged into packed integer codes: use "
                         "effitrain.methods.quant_peft.merge_dequantized for a floating-point model, or keep the "
                         "adapter beside the packed base (load_adapter_on_packed).")

    def dequantized_merged(self) -> torch.Tensor:
        """deq(W0) + Σ ΔW of the active adapters, in float32, [out, in]."""
        weight = self.get_base_layer().dequantize(torch.float32)
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                weight = weight + self.get_delta_weight(adapter).float()
        return weight


class QuantMoSLoraLinear(QuantLoraLinear, MoSLoraLinear):
    """The same with MoSLoRA's mixer (``MoSLoraLinear``'s variant mapping and ΔW = s·B·M·A)."""


def with_quant_linear(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` whose adapters also wrap ``QuantLinear`` layers (checked before other mappings)."""
    config = copy.copy(config)
    layer = QuantMoSLoraLinear if isinstance(config, MoSLoraConfig) else QuantLoraLinear
    config._custom_modules = {QuantLinear: layer, **(config._custom_modules or {})}
    return config


def has_quant_linear(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


@torch.no_grad()
def merge_dequantized(model: PeftModel) -> nn.Module:
    """A copy of the base model with every adapted ``QuantLinear`` replaced by an ``nn.Linear`` holding
    deq(W0) + ΔW, and every other ``QuantLinear`` by its dequantized weight: a plain float model that
    ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` handle without peft."""
    base = model.get_base_model()
    merged = {name: m.dequantized_merged() for name, m in base.named_modules() if isinstance(m, QuantLoraLinear)}
    plain = copy.deepcopy(base)
    for name, module in list(plain.named_modules()):
        if isinstance(module, QuantLoraLinear):
            layer, weight = module.get_base_layer(), merged[name]
        elif isinstance(module, QuantLinear) and not name.endswith("base_layer"):
            layer, weight = module, module.dequantize(torch.float32)
        else:
            continue
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.float())
        replace_module(plain, name, linear)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    return plain


def load_adapter_on_packed(base_folder: str | os.PathLike, adapter_folder: str | os.PathLike,
                           is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """The packed base (``load_quantized``) with a LoRA or native MoSLoRA adapter folder on its QuantLinears."""
    base = load_quantized(base_folder)
    saved = json.loads((Path(adapter_folder) / CONFIG_NAME).read_text())
    if is_moslora_adapter(adapter_folder):
        config = MoSLoraConfig.from_peft_type(**saved)
    else:
        config = LoraConfig.from_pretrained(str(adapter_folder))
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(base, str(adapter_folder), config=with_quant_linear(config),
                                     is_trainable=is_trainable, **kwargs)
