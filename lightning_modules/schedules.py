"""Learning-rate schedules that recipes name in YAML as ``lr_scheduler``."""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` × the base lr, stepped every optimizer step.

    Args:
        warmup_steps: steps of warmup; a float in (0, 1) is a fraction of ``total_steps``.
        total_steps: the length of the schedule; ``None`` lets the recipe fill it from
            ``trainer.estimated_stepping_batches`` before the first step.
        min_lr_ratio: the final lr as a fraction of the base lr (e.g. 0.05 for "cosine to lr/20").
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int | float = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"Need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}.")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        total = self.total_steps or 1
        warmup = self.warmup_steps * total if isinstance(self.warmup_steps, float) else self.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * self.decay(progress)

    @staticmethod
    def decay(progress: float) -> float:
        """The decay shape from 1 (end of warmup) to 0 (end of schedule)."""
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; everything it needs is in these fields
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position in the schedule. A length already planned for this run (the recipe fills
        ``total_steps`` from the Trainer's ``max_steps``/``max_epochs`` before the checkpoint is restored) is
        kept, so a run resumed with a longer or shorter budget re-plans its decay from where it is."""
        planned = self.total_steps
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})
        if planned is not None and planned != self.total_steps:
            rank_zero_info(f"{type(self).__name__}: the run's length changed from {self.total_steps} to {planned} "
                           f"steps; the schedule decays over the new length from step {self.last_epoch}.")
            self.total_steps = planned


class WarmupLinear(WarmupCosine):
    """Linear warmup, then linear decay to ``min_lr_ratio`` × the base lr (transformers' ``linear`` schedule)."""

    @staticmethod
    def decay(progress: float) -> float:
        return 1.0 - progress
