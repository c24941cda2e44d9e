"""Adapter fine-tuning of a causal LM (LoRA, MoSLoRA, DoRA, ... from a peft config in YAML).

    python train.py fit --config configs/moslora/moslora.yaml     # MoSLoRA on the quickstart tiny LLaMA
    python train.py fit --config configs/moslora/lora.yaml        # the same with plain LoRA

A packed low-bit ``pretrained`` (written by Block-AP / E2E-QP) is loaded with its ``QuantLinear`` layers frozen
and the adapter wraps them (Q-PEFT, ``effitrain.methods.quant_peft``); ``merged_dir`` then receives the
floating-point model deq(W0) + ΔW.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from effitrain.lightning_modules.adapter import AdapterMixin, merged_state_dict
from effitrain.lightning_modules.artifacts import require_local_model
from effitrain.lightning_modules.causal_lm import CausalLM, align_with_tokenizer
from effitrain.methods.composition import packed_quantization
from effitrain.methods.gptq_format import load_quantized
from effitrain.methods.quant_peft import has_quant_linear, merge_dequantized, with_quant_linear
from peft import LoraConfig, PeftConfig


class AdapterCausalLM(AdapterMixin, CausalLM):
    """`CausalLM` with a frozen base and a trainable peft adapter.

    Args:
        adapter: a peft config, e.g. `class_path: effitrain.methods.moslora.MoSLoraConfig` with its `init_args`.
        merged_dir: also write the merged model here at the end of `fit` (`AutoModelForCausalLM` loads it).
        **kwargs: `CausalLM`'s arguments (`pretrained`, `optimizer`, `lr_scheduler`, `export_dir`, ...).
            `export_dir` receives the peft adapter folder and the tokenizer.
    """

    def __init__(self, adapter: PeftConfig, merged_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(adapter, LoraConfig) and has_quant_linear(self.model):
            adapter = with_quant_linear(adapter)  # Q-PEFT: LoRA layers around the frozen QuantLinears
        if isinstance(adapter, PeftConfig) and adapter.task_type is None:
            # saved in adapter_config.json: AutoPeftModelForCausalLM needs it to pick the model class
            adapter = copy.copy(adapter)
            adapter.task_type = "CAUSAL_LM"
        self._init_adapter(adapter, merged_dir)

    def load_model(self, pretrained: str | None, config: dict[str, Any] | None, trust_remote_code: bool,
                   dtype: str | None) -> torch.nn.Module:
        """A packed low-bit folder loads with ``load_quantized`` (frozen QuantLinear blocks), others as usual."""
        if pretrained is not None and packed_quantization(Path(pretrained).expanduser()) is not None:
            require_local_model(pretrained, "packed base")
            return load_quantized(pretrained)
        return super().load_model(pretrained, config, trust_remote_code, dtype)

    def save_merged(self, folder: Path) -> None:
        if has_quant_linear(self.model):  # the floating-point view deq(W0) + ΔW; packed codes cannot hold it
            merged = merge_dequantized(self.model)
            merged.save_pretrained(folder)
            self.save_tokenizer(folder)
            return
        tokenizer = self.data_tokenizer()
        if tokenizer is not None:
            align_with_tokenizer(self.model.get_base_model(), tokenizer)
        self.model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(self.model))
        self.save_tokenizer(folder)
