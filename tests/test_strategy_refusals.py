"""Refusals that need no second process: an optimizer or recipe that a strategy would silently change stops
before training with a message naming the strategy and the reason."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from effitrain.lightning_modules.base import TrainModule
from effitrain.lightning_modules.efficientqat_block_ap import EfficientQATBlockAP
from effitrain.lightning_modules.efficientqat_e2e_qp import EfficientQATE2EQP
from effitrain.lightning_modules.sharding import FSDP2Strategy, check_optimizer_strategy
from effitrain.methods.mofo import MoFO
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy


def test_mofo_refuses_flattening_strategies_and_accepts_ddp_and_fsdp2():
    optimizer = MoFO(torch.nn.Linear(4, 4).parameters())
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed here
    for strategy in (FSDPStrategy(), deepspeed):
        with pytest.raises(ValueError, match=f"MoFO cannot run under {type(strategy).__name__}.*per flat shard"):
            check_optimizer_strategy(optimizer, strategy)
    check_optimizer_strategy(optimizer, DDPStrategy())
    check_optimizer_strategy(optimizer, FSDP2Strategy())
    check_optimizer_strategy(torch.optim.AdamW(torch.nn.Linear(4, 4).parameters()), FSDPStrategy())


@pytest.mark.parametrize("recipe", [EfficientQATBlockAP, EfficientQATE2EQP])
def test_efficientqat_recipes_refuse_sharding_in_configure_model(recipe):
    module = recipe.__new__(recipe)
    TrainModule.__init__(module)  # the refusal comes before any model is needed
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), logger=False)
    with pytest.raises(ValueError, match=f"{recipe.__name__} cannot run under FSDP2Strategy"):
        module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    module.configure_model()  # single device: nothing to refuse


def test_fsdp2_strategy_shards_over_every_process():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        FSDP2Strategy(tensor_parallel_size=2)
