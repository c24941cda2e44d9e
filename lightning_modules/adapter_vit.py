"""Adapter fine-tuning of a timm image classifier (LoRA, MoSLoRA, DoRA, ... from a peft config in YAML).

    python train.py fit --config configs/moslora/moslora_vit.yaml   # MoSLoRA on the digits ViT
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from effitrain.lightning_modules.adapter import AdapterMixin, merged_state_dict
from effitrain.lightning_modules.image_classifier import ImageClassifier
from peft import PeftConfig


class AdapterImageClassifier(AdapterMixin, ImageClassifier):
    """`ImageClassifier` with a frozen base and a trainable peft adapter.

    Args:
        adapter: a peft config; for a new head list it in `modules_to_save` (e.g. `[head]` on a timm ViT).
            On a ViT target `attn.qkv`/`qkv`, `attn.proj`, `fc1`, `fc2` (a bare `proj` also hits the patch
            embedding's Conv2d).
        merged_dir: also write the merged model here at the end of `fit`, a timm `save_for_hf` folder
            (`timm.create_model("local-dir:<folder>", pretrained=True)` or `pretrained: <folder>`).
        **kwargs: `ImageClassifier`'s arguments; `export_dir` receives the peft adapter folder.
    """

    def __init__(self, adapter: PeftConfig, merged_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._init_adapter(adapter, merged_dir)

    def save_merged(self, folder: Path) -> None:
        from timm.models import save_for_hf

        model_kwargs = self.hparams.get("model_kwargs") or {}
        plain = timm.create_model(self.hparams.model_name, num_classes=self.num_classes, **model_kwargs)
        plain.load_state_dict(merged_state_dict(self.model))
        save_for_hf(plain, folder, model_config={"model_kwargs": model_kwargs}, safe_serialization=True)
