"""UniPTS callbacks and recipe: search at fit start, resumable masks, DDP-identical masks, frozen teacher."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from effitrain.callbacks.dynamic_sparsity import DynamicSparsity
from effitrain.callbacks.sparsity_search import SparsitySearch
from effitrain.methods.distillation import base_decayed_kd_loss
from effitrain.methods.sparsity import current_masks, layer_sparsities
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TinyClassifier(L.LightningModule):
    def __init__(self, rank_dependent_data: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.model, self.rank_dependent_data = TinyNet(), rank_dependent_data

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        # rank-dependent data: a search run on each rank separately would disagree across ranks
        seed = self.global_rank if self.rank_dependent_data else 0
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 3, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=16)


def search_callbacks(**kw):
    return [SparsitySearch(target=0.8, population_size=6, generations=2, num_parents=3, seed=0, **kw),
            DynamicSparsity(sparsity=0.5, bake_on_fit_end=False)]


def trainer(tmp_path, callbacks, steps=3, **kw):
    return L.Trainer(default_root_dir=tmp_path, max_steps=steps, callbacks=callbacks, accelerator="cpu",
                     logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def assert_exact_zeros(net: nn.Module, sparsities: dict[str, float]):
    for name, p in sparsities.items():
        w = net.get_submodule(name).weight
        assert int((w == 0).sum()) == math.floor(p * w.numel()), name


def test_search_then_dynamic_sparsity_resumes_from_the_checkpoint_without_searching(tmp_path, monkeypatch):
    module = TinyClassifier()
    search, dynamic = search_callbacks()
    t = trainer(tmp_path, [search, dynamic], enable_checkpointing=True)
    t.fit(module)
    found = search.result
    assert set(found) == {"conv1", "conv2", "fc"} and found != {n: 0.8 for n in found}
    assert layer_sparsities(module.model) == pytest.approx(found)  # the search result is what trains
    assert_exact_zeros(module.model, found)
    masks = current_masks(module.model)
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert any(v.get("layer_sparsities") == found for v in saved["callbacks"].values())
    assert not any("parametrizations" in k for k in saved["state_dict"])  # plain keys, dense W

    # resume into a fresh dense module: no new search, same per-layer sparsities and masks
    monkeypatch.setattr(SparsitySearch, "search", lambda *a: pytest.fail("searched again on resume"))
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("masks", current_masks(pl_module.model))
            seen.setdefault("sparsities", layer_sparsities(pl_module.model))

    resumed = TinyClassifier()
    trainer(tmp_path, [*search_callbacks(), Probe()], steps=4).fit(resumed, ckpt_path=ckpt)
    assert seen["sparsities"] == pytest.approx(found)
    assert all(torch.equal(seen["masks"][k], masks[k]) for k in masks)


def test_dynamic_sparsity_alone_bakes_zeros_at_fit_end(tmp_path):
    module = TinyClassifier()
    dynamic = DynamicSparsity(sparsity=0.75, exclude=["fc"])
    trainer(tmp_path, [dynamic], enable_checkpointing=False).fit(module)
    assert not layer_sparsities(module.model)  # plain layers again ...
    assert_exact_zeros(module.model, {"conv1": 0.75, "conv2": 0.75})  # ... with the zeros baked in
    assert int((module.model.fc.weight == 0).sum()) == 0


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="sparsity must be in"):
        DynamicSparsity(sparsity=1.2)
    with pytest.raises(ValueError, match="num_parents"):
        SparsitySearch(population_size=4, num_parents=6)
    with pytest.raises(ValueError, match="none is masked"):
        trainer(tmp_path, [SparsitySearch()], enable_checkpointing=False).fit(TinyClassifier())
    with pytest.raises(KeyError, match="not a layer"):
        trainer(tmp_path, [DynamicSparsity(layer_sparsities={"nope": 0.5})], enable_checkpointing=False).fit(
            TinyClassifier())


class MaskRecorder(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save({"masks": current_masks(pl_module.model), "sparsities": layer_sparsities(pl_module.model)},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


def test_two_process_ddp_ranks_hold_identical_masks(tmp_path):
    module = TinyClassifier(rank_dependent_data=True)
    t = trainer(tmp_path, [*search_callbacks(), MaskRecorder(tmp_path)], strategy="ddp_spawn", devices=2,
                enable_checkpointing=False)
    t.fit(module)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["sparsities"] == r1["sparsities"] and set(r0["sparsities"]) == {"conv1", "conv2", "fc"}
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])


def test_distillation_recipe_keeps_the_teacher_out_of_optimizer_and_checkpoint():
    from effitrain.lightning_modules.unipts import SparseDistillClassifier

    with pytest.warns(UserWarning, match="teacher"):
        module = SparseDistillClassifier(model_name="test_resnet", num_classes=4)
    teacher = module.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    params = {id(p) for p in module.parameters()}
    assert not params & {id(p) for p in teacher.parameters()}
    assert all(id(p) in params for group in module.param_groups() for p in group["params"])
    assert all(k.startswith(("model.", "val_")) for k in module.state_dict())

    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    module.log = lambda *a, **k: None
    loss = module.training_step((images, targets), 0)  # teacher in train mode: batch statistics
    with torch.no_grad():
        expected = base_decayed_kd_loss(module(images), teacher.train()(images), epoch=0)
    torch.testing.assert_close(loss, expected)
