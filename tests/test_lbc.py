"""LBC (learnable N:M), SR-STE and magnitude N:M: dense start, the α gradient, the removal schedule, permanent
removal, exactly N of M with α frozen after t_f, exact resume mid-schedule, and bad input before training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from effitrain.callbacks.nm_sparsity import NMSparsity, timm_dense_layers
from effitrain.methods.lbc import LearnableNMMask, alive_count, candidate_table
from effitrain.methods.sparsity import from_groups, mask_of, nm_mask, register_mask, sparsify, to_groups
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader


def lbc_layer(layer: nn.Module, n: int = 2, m: int = 4) -> LearnableNMMask:
    mask = LearnableNMMask(tuple(layer.weight.shape), n, m)
    register_mask(layer, mask)
    return mask


@pytest.mark.parametrize("layer", [nn.Linear(16, 6), nn.Conv2d(8, 4, 3, padding=1)])
def test_mask_is_all_ones_at_init_and_the_layer_is_dense(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 16) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5)
    dense = layer(x)
    mask = lbc_layer(layer, 2, 4)
    assert mask.mask().all() and torch.equal(mask.scores(), torch.ones_like(mask.scores()))
    assert torch.equal(layer(x), dense)
    assert candidate_table(2, 4).shape == (6, 4) and (candidate_table(2, 4).sum(1) == 2).all()


@pytest.mark.parametrize("layer", [nn.Linear(8, 3), nn.Conv2d(8, 3, 3, padding=1)])
def test_alpha_gradient_is_the_sum_of_g_times_w_over_the_combination(layer):
    torch.manual_seed(0)
    mask = lbc_layer(layer, 2, 4)
    mask.keep_best(6)
    with torch.no_grad():  # some removed candidates, distinct scores: a mask that is not all ones
        mask.alpha.copy_(torch.rand_like(mask.alpha))
        mask.alive[:, :3] = False
    conv = isinstance(layer, nn.Conv2d)
    x = torch.randn(5, 8, 4, 4) if conv else torch.randn(5, 8)
    w = layer.parametrizations.weight.original

    def plain(weight):  # reference: the same layer computing with a given weight
        if conv:
            return torch.nn.functional.conv2d(x, weight, layer.bias, padding=1)
        return torch.nn.functional.linear(x, weight, layer.bias)

    target = torch.randn_like(plain(w.detach()))
    keep = from_groups(mask.scores() != 0, w.shape).float()
    masked = (w.detach() * keep).requires_grad_()
    torch.nn.functional.mse_loss(plain(masked), target).backward()
    g = masked.grad
    torch.nn.functional.mse_loss(layer(x), target).backward()
    gw = to_groups(g * w.detach(), 4)  # [G, M]: g_j·W_j
    expected = (gw @ candidate_table(2, 4).T) * mask.alive  # Σ_{j∈c} g_j W_j, alive candidates only
    torch.testing.assert_close(mask.alpha.grad, expected)
    torch.testing.assert_close(w.grad, g * keep)


def test_scores_rank_updates_far_below_the_resolution_of_one_third():
    """On a trained network a step moves a score by ~1e-9, below float32's spacing at α0 = 1/3 (3e-8).
    Those updates must still order the candidates (α is held as α − α0), not round away into ties that
    the removal would then break arbitrarily."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    mask = lbc_layer(layer, 2, 4)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    opt = torch.optim.SGD(mask.parameters(), lr=1e-4)
    summed = torch.zeros_like(mask.alpha, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        (1e-4 * torch.nn.functional.mse_loss(layer(x), target)).backward()
        summed -= mask.alpha.grad.double()
        opt.step()
    assert mask.alpha.abs().max() < 1.5e-8  # stored as α itself, 1/3 + alpha would round back to 1/3
    assert torch.equal(torch.full((1,), mask.alpha_start) + mask.alpha.abs().max(), torch.full((1,), mask.alpha_start))
    assert (mask.alpha.max(1).values > mask.alpha.min(1).values).all()  # yet no group is tied
    assert torch.equal(mask.alpha.argsort(1), summed.argsort(1))  # the order of -Σ_t Σ_{j∈c} g_j·W_j
    mask.keep_best(1)
    assert torch.equal(mask.alive.float().argmax(1), summed.argmax(1))


def test_removal_schedule_runs_from_all_candidates_to_one_and_never_rises():
    for (n, m), exponent in (((2, 4), 3), ((4, 8), 4), ((1, 16), 3)):
        c = math.comb(m, n)
        counts = [alive_count(t, 5, 25, c, exponent) for t in range(0, 31)]
        assert counts[:6] == [c] * 6 and counts[25:] == [1] * 6
        assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert [alive_count(t, 0, 10, 6) for t in range(11)] == [6, 5, 4, 3, 3, 2, 2, 2, 2, 2, 1]  # 1 + ⌈5(1 − t/10)³⌉


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(96, 16, generator=gen), torch.randint(0, 8, (96,), generator=gen))
        return StatefulDataLoader(data, batch_size=8)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", deterministic=True, **kwargs)


class Recorder(L.Callback):
    """The alive sets and α of the first layer after every step, before the masks are baked at fit end."""

    def __init__(self):
        self.alive, self.alpha, self.weights = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = mask_of(pl_module.model[0])
        self.alive.append(mask.alive.clone())
        self.alpha.append(mask.alpha.detach().clone())
        self.weights.append(pl_module.model[0].weight.detach().clone())


def test_lbc_removes_for_good_then_keeps_exactly_n_of_m_with_alpha_frozen(tmp_path):
    net, rec = Net(), Recorder()
    cb = NMSparsity("2:4", "lbc", t_i=0, t_f=6, unit="step", exclude=[])
    trainer(tmp_path, [cb, rec], max_steps=10, enable_checkpointing=False).fit(net)
    for before, after in zip(rec.alive, rec.alive[1:], strict=False):
        assert not (after & ~before).any()  # a removed combination never returns
    assert [int(a.sum(1).max()) for a in rec.alive] == [alive_count(t, 0, 6, 6) for t in range(10)]
    for step in range(6, 10):
        assert (rec.alive[step].sum(1) == 1).all()
        w = rec.weights[step]
        assert (to_groups(w != 0, 4).sum(1) == 2).all()  # exactly N nonzeros in every M-group
        assert torch.equal(rec.alpha[step], rec.alpha[6])  # α frozen from t_f on
    assert not torch.equal(rec.weights[9], rec.weights[6])  # ... while the weights keep training
    w = net.model[0].weight  # baked at fit end: a plain layer with the zeros
    assert not hasattr(net.model[0], "parametrizations") and (to_groups(w != 0, 4).sum(1) == 2).all()


def test_lbc_resumes_exactly_mid_schedule(tmp_path):
    full = Net()
    trainer(tmp_path / "a", [NMSparsity("2:4", "lbc", t_i=0, t_f=6, unit="step", exclude=[])], max_steps=9,
            enable_checkpointing=False).fit(full)
    ckpt = tmp_path / "mid.ckpt"
    # the step-4 checkpoint is written mid-fit (as ModelCheckpoint does), while the masks are still registered
    saver = _SaveAt(4, ckpt)
    trainer(tmp_path / "c", [NMSparsity("2:4", "lbc", t_i=0, t_f=6, unit="step", exclude=[]), saver], max_steps=4,
            enable_checkpointing=False).fit(Net())
    resumed = Net()
    trainer(tmp_path / "d", [NMSparsity("2:4", "lbc", t_i=0, t_f=6, unit="step", exclude=[])], max_steps=9,
            enable_checkpointing=False).fit(resumed, ckpt_path=ckpt)
    assert resumed.losses == full.losses[4:]
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


class _SaveAt(L.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_sr_ste_forward_is_nm_masked_and_gradient_is_upstream_plus_decay():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    w = layer.weight.detach().clone()
    sparsify(layer, {"": 0.5}, decay=2e-4, pattern=(2, 4))
    keep = nm_mask(w, 2, 4)
    x = torch.randn(3, 8)
    out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w * keep, layer.bias))
    out.sum().backward()
    upstream = torch.ones(3, 4).T @ x  # ∂(Σ out)/∂(W⊙m)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, upstream + 2e-4 * (~keep) * w)


def test_magnitude_nm_mask_is_fixed_while_fine_tuning(tmp_path):
    net = Net()
    start = nm_mask(net.model[2].weight, 1, 4)
    trainer(tmp_path, [NMSparsity("1:4", "magnitude", exclude=[])], max_steps=6, enable_checkpointing=False).fit(net)
    assert torch.equal(net.model[2].weight != 0, start)  # the same 1 of 4, baked in


def test_timm_models_keep_first_conv_and_classifier_dense():
    import timm

    assert timm_dense_layers(timm.create_model("resnet18", num_classes=10)) == ["conv1", "fc"]
    assert timm_dense_layers(timm.create_model("vit_tiny_patch16_224", num_classes=10)) == ["patch_embed.proj", "head"]


def test_bad_input_fails_before_training(tmp_path):
    for kwargs, message in ((dict(pattern="4:4"), "1 <= N < M"), (dict(pattern="0:4"), "1 <= N < M"),
                            (dict(pattern="2-4"), "'N:M'"), (dict(method="rigl"), "method must be"),
                            (dict(t_i=5, t_f=5), "t_i < t_f")):
        with pytest.raises(ValueError, match=message):
            NMSparsity(**kwargs)
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="not a multiple of M=32"):
        trainer(tmp_path, [NMSparsity("2:32", exclude=[])], max_steps=2, enable_checkpointing=False).fit(net)
    with pytest.raises(ValueError, match="no Conv2d/Linear layer"):
        trainer(tmp_path, [NMSparsity("2:4", exclude=["*"])], max_steps=2, enable_checkpointing=False).fit(Net())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert not net.losses
