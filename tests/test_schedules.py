"""The lr schedules equal their formulas and survive a state_dict round trip."""

import math

import pytest
import torch
from effitrain.lightning_modules.schedules import WarmupCosine, WarmupLinear


@pytest.mark.parametrize("schedule, shape", [(WarmupCosine, lambda p: 0.5 * (1 + math.cos(math.pi * p))),
                                             (WarmupLinear, lambda p: 1 - p)])
def test_warmup_then_decay_to_min_ratio(schedule, shape):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = schedule(optimizer, warmup_steps=4, total_steps=20, min_lr_ratio=0.05)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.0 * (s + 1) / 5 for s in range(4)])
    expected = [2.0 * (0.05 + 0.95 * shape((s - 4) / 16)) for s in range(4, 21)]
    assert lrs[4:] == pytest.approx(expected)
    resumed = schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), warmup_steps=4)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.total_steps == 20 and resumed.last_epoch == scheduler.last_epoch
