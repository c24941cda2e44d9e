"""The soft causal mask schedule (callbacks/soft_causal_mask.py) inside a small LightningModule."""

from __future__ import annotations

import effitrain.models  # noqa: F401  (registers test_illama)
import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from effitrain.callbacks.soft_causal_mask import SoftCausalMask, soft_mask_rate_at
from torch.utils.data import DataLoader, TensorDataset


def official_schedule(cutoff_steps: int, total: int, schedule: str, start: float = 1.0) -> np.ndarray:
    """The official ``mask_scheduler`` array: linspace(start, 0, K) or K × start, then zeros."""
    early = np.linspace(start, 0, cutoff_steps) if schedule == "linear" else np.full(cutoff_steps, start)
    return np.concatenate([early, np.zeros(total - cutoff_steps)])


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_schedule_values_equal_the_official_array(schedule: str) -> None:
    ours = [soft_mask_rate_at(t, 37, schedule) for t in range(100)]
    np.testing.assert_allclose(ours, official_schedule(37, 100, schedule), atol=1e-12)
    assert soft_mask_rate_at(0, 0, schedule) == 0.0  # cutoff 0: causal from the first step


def test_linear_epoch_means_match_the_released_logs() -> None:
    # iLLaMA-S: linear over 50 epochs, logs show per-epoch mean r 0.990, 0.970, ...; -B: 25 epochs, 0.980, 0.940
    for cutoff, expected in ((50, [0.990, 0.970]), (25, [0.980, 0.940])):
        per_epoch = 312  # 1.28M images / 4096
        rates = np.array([soft_mask_rate_at(t, cutoff * per_epoch) for t in range(2 * per_epoch)])
        np.testing.assert_allclose(rates.reshape(2, per_epoch).mean(1), expected, atol=5e-4)


class Recorder(L.LightningModule):
    """test_illama on random 32 px images; records the model's rate seen by every training forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("test_illama", depth=1)
        self.seen: list[float] = []
        self.val_seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.net.soft_mask_rate)
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_seen.append(self.net.soft_mask_rate)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=2)


def trainer(tmp_path, callback: SoftCausalMask, **kwargs) -> L.Trainer:
    kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=[callback], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_one_rate_per_optimizer_step_with_accumulation_and_epoch_cutoff(tmp_path) -> None:
    module, callback = Recorder(), SoftCausalMask("linear", cutoff_epochs=2)
    # 6 batches / epoch, accumulation 2 -> 3 optimizer steps per epoch -> K = 2 * 3 = 6 steps
    trainer(tmp_path, callback, max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0,
            enable_checkpointing=False).fit(module, loader())
    assert callback.cutoff_steps == 6
    expected = np.repeat(official_schedule(6, 9, "linear"), 2)  # the same rate for both micro-batches
    np.testing.assert_allclose(module.seen, expected, atol=1e-12)


def test_resume_restores_the_rate_and_continues_the_same_schedule(tmp_path) -> None:
    first = Recorder()
    t = trainer(tmp_path / "a", SoftCausalMask("constant", cutoff_epochs=2), max_steps=4, accumulate_grad_batches=2,
                limit_val_batches=0)  # 3 steps per epoch: K = 6
    t.fit(first, loader())
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)

    class Resumed(Recorder):
        def on_fit_start(self):  # runs after the callbacks' on_fit_start
            self.rate_at_fit_start = self.net.soft_mask_rate

    resumed, callback = Resumed(), SoftCausalMask("constant", cutoff_epochs=2)
    resumed.net.soft_mask_rate = 0.0  # a fresh model starts causal; the callback must put back the saved rate
    # now 6 steps per epoch (K would be 12 if recomputed): the saved K = 6 must be kept
    trainer(tmp_path / "b", callback, max_steps=9, limit_val_batches=0).fit(resumed, loader(), ckpt_path=ckpt)
    assert resumed.rate_at_fit_start == 1.0 and callback.cutoff_steps == 6
    np.testing.assert_allclose(first.seen[::2] + resumed.seen, official_schedule(6, 9, "constant"))


def test_bad_settings_fail_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        SoftCausalMask("linear", cutoff_epochs=1, cutoff_steps=3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        SoftCausalMask("cosine", cutoff_steps=3)

    class NoMask(Recorder):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 10)

    with pytest.raises(ValueError, match="no module of NoMask with a float `soft_mask_rate`"):
        trainer(tmp_path, SoftCausalMask(cutoff_steps=3), max_steps=1).fit(NoMask(), loader())
