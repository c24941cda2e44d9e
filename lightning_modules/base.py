"""The base every recipe builds on: optimizer and scheduler from the config, trainable parameters only."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def adamw(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class TrainModule(L.LightningModule):
    """A LightningModule whose optimizer and lr schedule are constructor arguments.

    Args:
        optimizer: called with ``self.param_groups()`` (only parameters that require grad).
        lr_scheduler: called with the optimizer and stepped every optimizer step. A scheduler with a
            ``total_steps`` of ``None`` (``WarmupCosine``) gets ``trainer.estimated_stepping_batches``.
        export_dir: where the recipe writes its final model at the end of ``fit`` (``None``: nowhere).
    """

    def __init__(self, optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory, self.export_dir = optimizer, lr_scheduler, export_dir

    #: What ``export_dir`` holds, as the run summary names it (``model``, ``adapter``, ``packed``, ...).
    export_kind = "model"

    def written_outputs(self) -> dict[str, str]:
        """The folders this recipe writes at the end of ``fit``, by kind; the run summary (``RunSummary``)
        lists those that exist after ``fit`` with their sizes. Override to add more (e.g. a merged model)."""
        return {self.export_kind: self.export_dir} if self.export_dir else {}

    def param_groups(self) -> list[dict] | list[torch.nn.Parameter]:
        """The optimizer's parameter groups; override to build your own (e.g. no decay on 1-D tensors)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameter: check what the recipe freezes.")
        return params

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def no_decay_groups(model: torch.nn.Module, skip: Iterable[str] = ()) -> list[dict]:
    """Two groups: decay on weights of rank >= 2; none on biases, 1-D tensors (norms) and names in ``skip``
    (e.g. a timm model's ``no_weight_decay()``: position embeddings, class token)."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.removeprefix("model.")
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or plain in skip else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
