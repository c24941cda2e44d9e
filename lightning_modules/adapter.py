"""The adapter fine-tuning path shared by `AdapterCausalLM` and `AdapterImageClassifier`.

Any peft config given in YAML (`peft.LoraConfig`, `effitrain.methods.moslora.MoSLoraConfig`, LoRA with
`use_dora: true`, ...) is applied with `get_peft_model`, so only the adapter's parameters require grad and
reach the optimizer (`TrainModule.param_groups`). Lightning checkpoints keep only those trainable tensors
(`TrainModule.checkpoint_trainable_only`: the frozen base is rebuilt from `pretrained` at resume). At the end of
`fit` the recipe writes a peft adapter folder to `export_dir` and, with `merged_dir`, a plain model folder
with every adapter merged (W0 + ΔW) that transformers / timm load without peft.

A MoSLoRA adapter is exported as its exact plain-LoRA fold (A' = M·A, B·M·A = B·A'), which every LoRA loader
reads (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, transformers' `from_pretrained`), and, to train
on, in its native form under `<export_dir>/moslora`, marked so that those loaders refuse it
(`effitrain.methods.moslora.load_moslora` reads it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from effitrain.methods.moslora import is_moslora_model, save_as_plain_lora
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

#: Sub-folder of `export_dir` with the native MoSLoRA adapter (mixers kept, for further training)
NATIVE_MOSLORA_DIR = "moslora"


def attach_adapter(model: nn.Module, adapter: PeftConfig) -> PeftModel:
    """Wrap `model` with `adapter`; fails early on a config that is no peft config or trains nothing."""
    if not isinstance(adapter, PeftConfig):
        raise TypeError(
            f"`adapter` must be a peft config (e.g. class_path: peft.LoraConfig or effitrain.methods.moslora.MoSLoraConfig), "
            f"got {type(adapter).__name__}."
        )
    peft_model = get_peft_model(model, adapter)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"The adapter {type(adapter).__name__} matched no layer: check `target_modules`.")
    return peft_model


def adapter_hparams(adapter: PeftConfig) -> dict[str, Any]:
    """The config as plain JSON data (class_path + init_args), so that checkpoints load with weights_only=True."""
    init_args = json.loads(json.dumps(adapter.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    init_args.pop("peft_type", None)
    return {"class_path": f"{type(adapter).__module__}.{type(adapter).__qualname__}", "init_args": init_args}


@torch.no_grad()
def merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict (on CPU) with the active adapters merged, W0 + ΔW, for a model without peft.

    The model itself is left as it is (no in-place merge, so bf16 weights are not rounded by merge/unmerge).
    Each adapter's own merge rule is used (`LoraVariant.merge_safe` for MoSLoRA and DoRA).
    """
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if any(module.lora_bias.values()):
            raise ValueError("Merged export does not support `lora_bias=True`; export the adapter only.")
        weight = module.get_base_layer().weight.detach().clone()
        if not module.merged:
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                variant = module.lora_variant.get(adapter)
                if variant is not None:
                    weight = variant.merge_safe(module, adapter, weight)
                else:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        merged[f"{name}.weight"] = weight.cpu()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{model.active_adapter}.", ".")
        state[key] = merged.get(key, tensor.detach().cpu())
    return state


class AdapterMixin:
    """Lightning hooks for adapter fine-tuning; put it before the base recipe in the class bases.

    Args (of the recipes that use it):
        adapter: any peft config.
        merged_dir: where to also write the merged model at the end of `fit` (`None`: adapter only).
    """

    model: PeftModel
    checkpoint_trainable_only = True  # the frozen base is rebuilt from `pretrained` at resume
    export_kind = "adapter"
    checkpoint_trainable_only = True  # the frozen base is rebuilt from `pretrained` at resume

    def written_outputs(self) -> dict[str, str]:
        outputs = super().written_outputs()  # the adapter folder (export_dir)
        return {**outputs, "merged": self.merged_dir} if self.merged_dir else outputs

    def _init_adapter(self, adapter: PeftConfig, merged_dir: str | None) -> None:
        self.model = attach_adapter(self.model, adapter)
        if "adapter" in self.hparams:  # save_hyperparameters of the base recipe collected the config object
            self.hparams["adapter"] = adapter_hparams(adapter)
        self.merged_dir = merged_dir

    def exports(self) -> list[tuple[str, Callable[[Path], None]]]:
        merged = [(self.merged_dir, self.save_merged)] if self.merged_dir else []
        return [*super().exports(), *merged]

    def save_export(self, folder: Path) -> None:
        """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that plain LoRA loaders read,
        and the data's tokenizer; for MoSLoRA the exact plain-LoRA fold, plus the native form in
        `<folder>/moslora` (to resume training)."""
        if is_moslora_model(self.model):
            save_as_plain_lora(self.model, folder)
            self.model.save_pretrained(str(Path(folder) / NATIVE_MOSLORA_DIR))
        else:
            self.model.save_pretrained(folder)
        self.save_tokenizer(folder)

    def save_merged(self, folder: Path) -> None:
        """A folder of the merged model that its library loads without peft (recipe-specific)."""
        raise NotImplementedError
