"""Image classification with any timm model: top-1 via torchmetrics, timm mixup/cutmix and label smoothing.

Models of this project (iLLaMA, Mamba-R) are registered with timm when ``models`` is imported, so they are
created by name like timm's own. EMA is Lightning's ``EMAWeightAveraging`` callback, added in a recipe's
``trainer.callbacks`` when wanted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import effitrain.models  # noqa: F401  (registers this project's architectures with timm)
import timm
import torch
import torch.nn.functional as F
from effitrain.lightning_modules.artifacts import is_local_reference, require_local_model
from effitrain.lightning_modules.base import TrainModule, adamw, no_decay_groups
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override


def create_timm_model(model_name: str, num_classes: int, pretrained: str | None = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` by name; ``pretrained`` is a local ``save_for_hf`` folder or a timm/hub name."""
    if model_name not in timm.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"Unknown timm model {model_name!r}. See `timm.list_models('<pattern>')` for names; "
                         "this project's own models are registered by `import models`.")
    if pretrained is None:
        return timm.create_model(model_name, num_classes=num_classes, **kwargs)
    if is_local_reference(pretrained):
        require_local_model(pretrained)
        return timm.create_model(f"local-dir:{pretrained}", pretrained=True, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(pretrained, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as err:
        raise ValueError(f"Could not load pretrained weights {pretrained!r} (no network, or no such model): "
                         f"{type(err).__name__}: {err}") from None


class ClassifierEvaluation:
    """Validation and test of a LightningModule whose forward maps images to logits: top-1 (``val/acc``) and
    cross-entropy (``val/loss``) accumulated over the epoch. Call ``init_eval_metrics`` in ``__init__``."""

    def init_eval_metrics(self, num_classes: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.val_acc.update(logits, targets)
        self.val_loss.update(F.cross_entropy(logits, targets), weight=len(targets))
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/loss", self.val_loss, prog_bar=True)

    test_step = validation_step


class ImageClassifier(ClassifierEvaluation, TrainModule):
    """Train a timm classifier on ``(images, targets)`` batches.

    Args:
        model_name: a ``timm.create_model`` name (timm's or this project's).
        model_kwargs: extra constructor kwargs (``img_size``, ``patch_size``, ``drop_path_rate``, ...).
        pretrained: start from a folder written by ``export_dir`` (``save_for_hf``) or a timm/hub name.
        num_classes: must match the data (checked at setup).
        mixup, cutmix: timm ``Mixup`` alphas (0 = off); ``label_smoothing`` is used by both paths.
        weight_decay_1d: when ``False`` (default), biases, 1-D tensors and the model's ``no_weight_decay()``
            names go in a group with weight decay 0.
    """

    def __init__(self, model_name: str = "resnet18", model_kwargs: dict[str, Any] | None = None,
                 pretrained: str | None = None, num_classes: int = 10, mixup: float = 0.0, cutmix: float = 0.0,
                 label_smoothing: float = 0.0, weight_decay_1d: bool = False,
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False):
        super().__init__(optimizer, lr_scheduler, export_dir, overwrite_export)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = create_timm_model(model_name, num_classes, pretrained, **(model_kwargs or {}))
        self.num_classes, self.label_smoothing, self.weight_decay_1d = num_classes, label_smoothing, weight_decay_1d
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                            num_classes=num_classes) if mixup > 0 or cutmix > 0 else None)
        self.soft_loss = SoftTargetCrossEntropy()
        self.init_eval_metrics(num_classes)

    def setup(self, stage: str) -> None:
        data_classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"The data has {data_classes} classes but the model was built for {self.num_classes}: "
                             f"set `model.init_args.num_classes: {data_classes}`.")

    def param_groups(self) -> list:
        if self.weight_decay_1d:
            return super().param_groups()
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return no_decay_groups(self, skip)

    @override
    def shard_blocks(self) -> list[torch.nn.Module]:
        """The repeated blocks of the network: timm's ``blocks`` / ``layers`` / ``stages`` children."""
        for attr in ("blocks", "layers", "stages"):
            blocks = getattr(self.model, attr, None)
            if isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList):
                return list(blocks)
        return []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # mixed soft targets
            return self.soft_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None and len(images) % 2 == 0:  # timm mixes pairs: needs an even batch
            images, targets = self.mixup(images, targets)
        loss = self.loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def save_export(self, folder: Path) -> None:
        """A timm ``save_for_hf`` folder (``config.json`` + ``model.safetensors``): ``pretrained: <folder>``
        here, or ``timm.create_model("local-dir:<folder>", pretrained=True)`` anywhere."""
        from timm.models import save_for_hf

        save_for_hf(self.model, folder, model_args=dict(self.hparams.get("model_kwargs") or {}),
                    safe_serialization=True)
