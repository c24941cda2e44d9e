"""The soft mask schedule of iLLaMA (Wang et al., arXiv 2404.06773, §3.3 and Fig. 3a; official
``mask_scheduler.py`` and ``engine_soft.py``): the attention mask moves from bidirectional (r = 1) to causal
(r = 0) during training, set before every optimizer step.

* ``linear``: r_t = start · (1 - t / (K - 1)) for t < K, i.e. ``linspace(start, 0, K)``, then 0;
* ``constant``: r_t = start for t < K, then 0 (a hard switch);

with t the optimizer step and K = ``cutoff_steps`` (or ``cutoff_epochs`` × optimizer steps per epoch).
Paper recipes: iLLaMA-T constant 50 epochs, -S linear 50, -B linear 25 (of 300).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

SCHEDULES = ("linear", "constant")


def soft_mask_rate_at(step: int, cutoff_steps: int, schedule: str = "linear", start: float = 1.0) -> float:
    """r before optimizer step ``step`` (0-based); identical to indexing the official schedule array."""
    if step >= cutoff_steps:
        return 0.0
    if schedule == "constant" or cutoff_steps == 1:
        return start
    return start * (1.0 - step / (cutoff_steps - 1))


class SoftCausalMask(Callback):
    """Drive every ``soft_mask_rate`` attribute of the trained model with iLLaMA's soft mask schedule.

    Works with any model that has modules exposing a float ``attribute`` (``soft_mask_rate`` by default,
    1 = bidirectional, 0 = causal), e.g. ``timm.create_model('illama_tiny_patch16_224')`` after
    ``import effitrain.models``. The rate is a deterministic function of ``trainer.global_step``, so every DDP rank
    agrees without communication, and gradient accumulation keeps one rate per optimizer step. Validation
    uses the rate of the last step, as the official code does. The resolved schedule length is saved in the
    checkpoint, so a resumed run continues the same schedule (even with another number of devices).

    Args:
        schedule: ``'linear'`` or ``'constant'`` (see the module docstring).
        cutoff_epochs: length K of the bidirectional phase in epochs (may be fractional), converted with the
            number of optimizer steps per epoch when training starts.
        cutoff_steps: K in optimizer steps instead; give exactly one of the two. 0 = causal from step 0.
        start: r at step 0 (1.0 in every paper recipe).
        attribute: the attribute name to set on the model's modules.
        log: log the rate as ``train/soft_mask_rate`` every step.

    Raises:
        ValueError: an unknown schedule, both or neither cutoff, negative cutoff, ``start`` outside [0, 1];
            at setup, a model with no module exposing ``attribute``; at train start, ``cutoff_epochs`` with a
            training set of unknown length.
    """

    def __init__(self, schedule: str = "linear", cutoff_epochs: float | None = None, cutoff_steps: int | None = None,
                 start: float = 1.0, attribute: str = "soft_mask_rate", log: bool = True):
        if schedule not in SCHEDULES:
            raise ValueError(f"SoftCausalMask schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if (cutoff_epochs is None) == (cutoff_steps is None):
            raise ValueError("SoftCausalMask needs exactly one of `cutoff_epochs` and `cutoff_steps` "
                             f"(got cutoff_epochs={cutoff_epochs}, cutoff_steps={cutoff_steps}).")
        cutoff = cutoff_epochs if cutoff_epochs is not None else cutoff_steps
        if cutoff < 0:
            raise ValueError(f"SoftCausalMask cutoff must be >= 0 (0 = causal from the first step), got {cutoff}.")
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"SoftCausalMask start must be in [0, 1] (1 = bidirectional), got {start}.")
        self.schedule, self.cutoff_epochs, self.start = schedule, cutoff_epochs, float(start)
        self.cutoff_steps = int(cutoff_steps) if cutoff_steps is not None else None
        self.attribute, self.log = attribute, log
        self.rate: float | None = None
        self._targets: list[nn.Module] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._targets = [m for m in pl_module.modules() if isinstance(getattr(m, self.attribute, None), (int, float))
                         and not isinstance(getattr(m, self.attribute), bool)]
        if not self._targets:
            raise ValueError(f"SoftCausalMask found no module of {type(pl_module).__name__} with a float "
                             f"`{self.attribute}` attribute. Use a model that exposes it (e.g. "
                             "`illama_tiny_patch16_224` after `import effitrain.models`) or set `attribute`.")

    def _apply(self, rate: float) -> None:
        self.rate = rate
        for module in self._targets:
            setattr(module, self.attribute, rate)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the sanity check: the restored rate on resume, else the rate of step 0
        if self.rate is not None:
            self._apply(self.rate)
        elif self.cutoff_steps is not None:
            self._apply(soft_mask_rate_at(trainer.global_step, self.cutoff_steps, self.schedule, self.start))
        else:
            self._apply(self.start if self.cutoff_epochs > 0 else 0.0)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cutoff_steps is None:
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                raise ValueError("SoftCausalMask(cutoff_epochs=...) needs the number of batches per epoch, but "
                                 "the training set has no length: give `cutoff_steps` instead.")
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            self.cutoff_steps = round(self.cutoff_epochs * steps_per_epoch)
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.cutoff_steps > total:
            rank_zero_warn(f"SoftCausalMask: the schedule lasts {self.cutoff_steps} steps but training stops after "
                           f"{int(total)}, so it ends with {self.attribute} > 0 while a reloaded model starts at 0. "
                           "Shorten the cutoff or train longer.")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(soft_mask_rate_at(trainer.global_step, self.cutoff_steps, self.schedule, self.start))
        if self.log:
            pl_module.log(f"train/{self.attribute}", self.rate, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cutoff_steps": self.cutoff_steps, "rate": self.rate}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cutoff_steps, self.rate = state_dict["cutoff_steps"], state_dict["rate"]
