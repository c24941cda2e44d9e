"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``, on GPUs (NCCL) and on CPU (gloo):

    python train.py fit --config configs/pretrain/quickstart.yaml --config configs/trainer/fsdp2.yaml \
        --trainer.accelerator=cpu --trainer.devices=2

Each recipe names its repeated blocks (``TrainModule.shard_blocks``: the decoder layers of a causal LM, the
transformer / Mamba blocks of an image model); every block is sharded on its own, then the root, so a
block's parameters are gathered just before it runs and freed after. Parameters become ``DTensor``s whose
first dimension is split across ranks; optimizers see whole-tensor shapes (``MoFO`` selects its top-α over
the whole tensor across shards). Recipes that cannot run sharded say why before training
(``TrainModule.sharding_refusal``), and so do optimizers whose per-tensor rule cannot survive a strategy that
flattens tensors (FSDP1 with flat parameters, DeepSpeed ZeRO).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn
from typing_extensions import override


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure data-parallel FSDP2: ``data_parallel_size="auto"`` means every
    process of the job (nodes × devices), tensor parallelism off. (Lightning's own "auto" gives the number
    of nodes, meant for 2-D parallelism with tensor parallelism inside a node.)

    Args:
        data_parallel_size: ranks that shard the model ("auto": all of them).
        tensor_parallel_size: kept at 1: no recipe here applies tensor parallelism.
        save_distributed_checkpoint: ``True``: each rank writes its shard (a checkpoint folder);
            ``False``: rank 0 writes one consolidated file.
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: the recipes shard data-parallel only "
                             "(FSDP2); use Lightning's ModelParallelStrategy with your own configure_model for TP.")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self._auto_data_parallel = data_parallel_size == "auto"

    @override
    def setup_environment(self) -> None:
        if self._auto_data_parallel:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_fsdp2(strategy: Strategy) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def is_sharded(strategy: Strategy) -> bool:
    """FSDP2, FSDP (FSDP1) or DeepSpeed: strategies that split parameters across ranks."""
    return isinstance(strategy, ModelParallelStrategy | FSDPStrategy | DeepSpeedStrategy)


def refuse_sharded(strategy: Strategy, who: str, why: str) -> None:
    """For callbacks and recipes: a clear error before training under a sharded strategy."""
    if is_sharded(strategy):
        raise ValueError(f"{who} cannot run under {type(strategy).__name__}: {why}")


def shard(root: nn.Module, blocks: Iterable[nn.Module], mesh, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each block, then the root (which takes every parameter left outside the blocks).
    Idempotent: a module already sharded (``configure_model`` runs again for ``test`` after ``fit``) is kept."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(root, FSDPModule):
        return
    if mesh.ndim != 1:  # keep only the data-parallel dimension
        mesh = mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)


def check_optimizer_strategy(optimizer: torch.optim.Optimizer, strategy: Strategy) -> None:
    """Refuse an optimizer whose per-tensor rule a flattening strategy would silently change.

    MoFO filters the top-α of each original tensor. DeepSpeed ZeRO hands the optimizer one flat fp32
    partition per param group and rank, and Lightning's FSDP (FSDP1) flat parameters are 1-D views: the
    per-tensor selection would become a per-shard one (and every 1-D shard would take the dense step).
    FSDP2 keeps each tensor a ``DTensor`` with its global shape, and MoFO's threshold search all-reduces
    its counts over the shards, so it is exact there.
    """
    from effitrain.methods.mofo import MoFO

    if isinstance(optimizer, MoFO) and isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
        raise ValueError(
            f"MoFO cannot run under {type(strategy).__name__}: it flattens parameters into per-rank partitions, "
            "so MoFO's top-α filter would select per flat shard instead of per tensor (and 1-D shards would take "
            "the full Adam step). Use FSDP2 (--config configs/trainer/fsdp2.yaml), where MoFO selects over "
            "each whole tensor across shards, or DDP (configs/trainer/ddp.yaml).")
