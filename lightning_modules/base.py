"""The base every recipe builds on: optimizer and scheduler from the config, trainable parameters only, and
the end of a run written once for all recipes: checkpoints that carry the run's identity, its random states and
a checksum, and an export that never clobbers another run's model."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from effitrain.lightning_modules.export import check_target, publish
from effitrain.lightning_modules.integrity import CHECKPOINT_KEY, stamp_checkpoint, verify_checkpoint
from effitrain.lightning_modules.sharding import check_optimizer_strategy, is_fsdp2, is_sharded, shard
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


def adamw(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def rng_states() -> dict[str, Any]:
    """The global generators (torch CPU/CUDA, numpy, random) as tensors and plain values (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
              "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainModule(L.LightningModule):
    """A LightningModule whose optimizer and lr schedule are constructor arguments.

    Args:
        optimizer: called with ``self.param_groups()`` (only parameters that require grad).
        lr_scheduler: called with the optimizer and stepped every optimizer step. A scheduler with a
            ``total_steps`` of ``None`` (``WarmupCosine``) gets ``trainer.estimated_stepping_batches``.
        export_dir: where the recipe writes its final model when ``fit`` completes (``None``: nowhere). Nothing
            is written under ``fast_dev_run`` or after a failure; the folder is written beside and renamed into
            place, with ``effitrain_run.json`` naming the run and the checksum of every file.
        overwrite_export: replace an ``export_dir`` that holds another run's model (off: the run stops before
            training with a message naming both runs).

    A recipe says what it writes in :meth:`save_export`; :meth:`exports` lists its folders.
    """

    #: Init arguments that belong to the run, not to the model: a resume (``--ckpt_path``) may change them.
    run_args: tuple[str, ...] = ("export_dir", "overwrite_export", "merged_dir", "gradient_checkpointing",
                                 "cache_dir")
    #: Checkpoints keep only the tensors that require grad (the frozen rest is rebuilt from ``pretrained``).
    checkpoint_trainable_only: bool = False

    def __init__(self, optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory, self.export_dir = optimizer, lr_scheduler, export_dir
        self.overwrite_export = overwrite_export
        self.run_id = uuid.uuid4().hex[:12]  # a resumed run takes the id of its checkpoint
        self._resume_rng: dict[str, Any] | None = None
        if self.checkpoint_trainable_only:
            self.strict_loading = False

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

    #: What ``export_dir`` holds, as the run summary names it (``model``, ``adapter``, ``packed``, ...).
    export_kind = "model"

    def written_outputs(self) -> dict[str, str]:
        """The folders this recipe writes at the end of ``fit``, by kind; the run summary (``RunSummary``)
        lists those that exist after ``fit`` with their sizes. Override to add more (e.g. a merged model)."""
        return {self.export_kind: self.export_dir} if self.export_dir else {}

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

    # -------------------------------------------------------------------------------------- run identity
    def identity(self) -> dict[str, Any]:
        """What an export and a checkpoint record about the run that wrote them."""
        trainer = self._trainer
        return {"run_id": self.run_id, "recipe": f"{type(self).__module__}.{type(self).__qualname__}",
                "root_dir": str(Path(trainer.default_root_dir).resolve()) if trainer else None,
                "global_step": trainer.global_step if trainer else None,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    # ------------------------------------------------------------------------------------------ export
    def exports(self) -> list[tuple[str, Callable[[Path], None]]]:
        """The folders written when ``fit`` completes, each with the function that fills it."""
        return [(self.export_dir, self.save_export)] if self.export_dir else []

    def save_export(self, folder: Path) -> None:
        """Write the final model into ``folder`` (a fresh temporary folder, renamed into place afterwards)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what it exports: implement save_export().")

    def data_tokenizer(self) -> Any | None:
        """The data's tokenizer, if the recipe runs under a trainer with a datamodule that has one."""
        return getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)

    def save_tokenizer(self, folder: str | Path) -> None:
        """The data's tokenizer beside the model, when the data has one."""
        tokenizer = self.data_tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    def export(self, folder: str | Path) -> Path:
        """Write the final model to ``folder`` now (used at the end of ``fit``; also callable by hand)."""
        return publish(folder, self.save_export, self.identity(), overwrite=True)

    @override
    def on_fit_start(self) -> None:
        # Every rank checks, with rank 0's identity, so that a refused export stops all ranks before training.
        self.run_id = self.trainer.strategy.broadcast(self.run_id)
        for folder, _ in self.exports():
            check_target(folder, self.identity(), self.overwrite_export)

    @override
    def on_fit_end(self) -> None:
        self.publish_exports()

    def publish_exports(self) -> None:
        """Write every export of a completed run, each through a temporary folder renamed into place, never
        over another run's export unless ``overwrite_export``; nothing under ``fast_dev_run`` or after a stop."""
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.interrupted:
            if self.exports():
                rank_zero_info("The run did not complete (fast_dev_run or stopped): nothing is exported.")
            return
        if trainer.is_global_zero:
            for folder, write in self.exports():
                rank_zero_info(f"Exported to {publish(folder, write, self.identity(), self.overwrite_export)}")
        trainer.strategy.barrier("export")

    # ------------------------------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable tensors only (when the recipe says so), record identity and random states, and stamp
        the checksum. A recipe that adds its own state does so before calling this."""
        if self.checkpoint_trainable_only:
            keep = {name for name, param in self.named_parameters() if param.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng_states"] = rng_states()
        checkpoint[CHECKPOINT_KEY] = self.identity()
        # A sharded strategy saves each rank's shards through torch.distributed.checkpoint (a folder with its
        # own metadata), while this hook sees only this rank's part: a checksum of that part would not match
        # the tensors loaded back, so only whole (single-file) checkpoints are stamped.
        if self._trainer is None or not is_sharded(self.trainer.strategy):
            stamp_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        verify_checkpoint(checkpoint, getattr(self._trainer, "ckpt_path", None))
        self.run_id = checkpoint.get(CHECKPOINT_KEY, {}).get("run_id", self.run_id)
        self._resume_rng = checkpoint.get("rng_states")
        if self.checkpoint_trainable_only:
            missing = {n for n, p in self.named_parameters() if p.requires_grad} - checkpoint["state_dict"].keys()
            if missing:
                raise KeyError(f"The checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                               f"it was not written by {type(self).__name__} with the same arguments.")

    @override
    def on_train_start(self) -> None:
        # The random states of the interrupted run, set after everything that draws at start-up (dataloader
        # iterators, caches), so that dropout and augmentations continue as in an uninterrupted run.
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None


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
