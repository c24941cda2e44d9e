"""The base every recipe builds on: optimizer and scheduler from the config, trainable parameters only."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from effitrain.lightning_modules.sharding import check_optimizer_strategy, is_fsdp2, is_sharded, shard
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override


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

    #: Why the recipe cannot run under a sharded strategy (FSDP2 ``configs/trainer/fsdp2.yaml``, FSDP,
    #: DeepSpeed); ``None``: it can.
    sharding_refusal: str | None = None

    def shard_blocks(self) -> list[torch.nn.Module]:
        """The repeated blocks FSDP2 shards one by one before the root (e.g. the decoder layers)."""
        return []

    @override
    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``): shard each of ``shard_blocks()``, then the whole module.
        A recipe with a ``sharding_refusal`` stops here under any sharded strategy."""
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        if self.sharding_refusal is not None and is_sharded(strategy):
            raise ValueError(f"{type(self).__name__} cannot run under {type(strategy).__name__}: "
                             f"{self.sharding_refusal}")
        if is_fsdp2(strategy):
            exports = {k: v for k in ("export_dir", "merged_dir") if (v := getattr(self, k, None))}
            if exports:
                raise ValueError(
                    f"{type(self).__name__} under FSDP2 cannot write {exports} at the end of fit: the exports read "
                    "whole tensors, and FSDP2 holds a shard of each on every rank. Train with them null and "
                    "`--trainer.strategy.init_args.save_distributed_checkpoint=false` (rank 0 writes one consolidated "
                    "checkpoint), then write the exports in one process: the same command with `--trainer.devices=1 "
                    "--trainer.strategy=auto --ckpt_path <last.ckpt>` and the exports set (max_steps is reached, so "
                    "fit ends at once and exports).")
            shard(self, self.shard_blocks(), self.device_mesh)

    def param_groups(self) -> list[dict] | list[tuple[str, torch.nn.Parameter]]:
        """The optimizer's parameter groups, named (``(name, parameter)``, so that an optimizer with per-name
        rules, e.g. MoFO's dense norms, has them under any strategy); override to build your own."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameter: check what the recipe freezes.")
        return params

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        if self._trainer is not None:
            check_optimizer_strategy(optimizer, self.trainer.strategy)
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
