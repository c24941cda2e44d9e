"""Strategy checks shared by the callbacks: refuse a strategy a callback cannot run under, at ``setup``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

SHARDED_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)


def refuse_sharded(trainer: L.Trainer, who: str, why: str) -> None:
    """Raise before training when ``trainer`` splits parameters across ranks (FSDP2, FSDP, DeepSpeed).

    Raises:
        ValueError: naming the callback, the strategy, the reason and what to use instead.
    """
    strategy = trainer.strategy
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise ValueError(f"{who} cannot run under {type(strategy).__name__}: {why}")
