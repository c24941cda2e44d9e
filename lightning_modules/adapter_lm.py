"""Adapter fine-tuning of a causal LM (LoRA, MoSLoRA, DoRA, ... from a peft config in YAML).

    python train.py fit --config configs/moslora/moslora.yaml     # MoSLoRA on the quickstart tiny LLaMA
    python train.py fit --config configs/moslora/lora.yaml        # the same with plain LoRA
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from effitrain.lightning_modules.adapter import AdapterMixin, merged_state_dict
from effitrain.lightning_modules.causal_lm import CausalLM, align_with_tokenizer
from peft import PeftConfig


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
        if isinstance(adapter, PeftConfig) and adapter.task_type is None:
            # saved in adapter_config.json: AutoPeftModelForCausalLM needs it to pick the model class
            adapter = copy.copy(adapter)
            adapter.task_type = "CAUSAL_LM"
        self._init_adapter(adapter, merged_dir)

    def save_merged(self, folder: Path) -> None:
        tokenizer = self.data_tokenizer()
        if tokenizer is not None:
            align_with_tokenizer(self.model.get_base_model(), tokenizer)
        self.model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(self.model))
        self.save_tokenizer(folder)
