"""UniPTS reducing-regrowing search of the per-layer sparsity, run once at the start of fit.

Xie et al., CVPR 2024, Sec. 3.2 (official code: xjjxmu/UniPTS `main.py`, `genetic_algorithm`). Every
layer is reduced to P + δ and δ·N weights are regrown by a softmax over genes; the genes evolve with
fitness = calibration top-1 after magnitude masks and a BatchNorm recalibration (`effitrain.methods.sparsity`).

One rank searches (rank 0) and the result is broadcast, so every rank applies the same sparsities. The
result is kept in the checkpoint: a resumed run does not search again. The search covers the layers that
``DynamicSparsity`` masks (registered at setup) and replaces their sparsities in place, so the model that
the strategy wrapped keeps its parameters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch
from effitrain.callbacks.progress import StageProgress
from effitrain.callbacks.strategy_checks import refuse_sharded
from effitrain.methods.sparsity import calibrated_accuracy, evolutionary_search, layer_sparsities, sparsify
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override


class _FirstBatches:
    """A re-iterable view of the first ``limit`` (images, targets) batches of a loader."""

    def __init__(self, loader: Any, limit: int | None):
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Iterator:
        for batch in islice(iter(self.loader), self.limit):
            yield batch[0], batch[1]


class SparsitySearch(L.Callback):
    """Search UniPTS per-layer sparsities on the calibration (training) data at the start of fit.

    Args:
        target: the global sparsity P (0.9 = 90% of the searched layers' weights are zero).
        delta: the reduce step δ and the regrow budget δ·N (UniPTS: 0.05).
        population_size, generations, num_parents, mutation_prob: the evolution (UniPTS: 25, 25, 10, 0.1).
        seed: seed of the evolution and of the fitness noise; a seed gives one result.
        calibration_batches: use the first this many batches of the training loader (``None``: all).
        cache_batches: hold the calibration batches in memory for the whole search (the loader's random
            augmentation is then drawn once); turn off when they do not fit (ImageNet-size calibration).
        noise_std: std of the Gaussian noise added to the inputs of the BatchNorm recalibration (1e-6).
        bn_momentum: BatchNorm momentum of the recalibration; ``None`` is the cumulative average.
        module_attr: the LightningModule attribute holding the network (``None``: the module itself).

    Raises:
        ValueError: bad search settings; no masked layer at the start of fit (add ``DynamicSparsity``, which
            says which layers are sparse); SyncBatchNorm (the recalibration runs on one rank and must not
            reach a collective); a sharded strategy (FSDP2, FSDP, DeepSpeed), at ``setup``.
    """

    def __init__(self, target: float = 0.9, delta: float = 0.05, population_size: int = 25, generations: int = 25,
                 num_parents: int = 10, mutation_prob: float = 0.1, seed: int = 0,
                 calibration_batches: int | None = None, cache_batches: bool = True, noise_std: float = 1e-6,
                 bn_momentum: float | None = None, module_attr: str | None = "model"):
        if not 0.0 < target + delta < 1.0 or target <= 0 or delta < 0:
            raise ValueError(f"need 0 < target and 0 <= delta with target + delta < 1; got {target}, {delta}.")
        if population_size < 2 or not 2 <= num_parents <= population_size:
            raise ValueError(f"need population_size >= 2 and 2 <= num_parents <= population_size; got "
                             f"{population_size}, {num_parents}.")
        if generations < 0 or not 0.0 <= mutation_prob <= 1.0:
            raise ValueError(f"need generations >= 0 and mutation_prob in [0, 1]; got {generations}, {mutation_prob}.")
        if calibration_batches is not None and calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1 or null, got {calibration_batches}.")
        self.target, self.delta, self.seed = target, delta, seed
        self.population_size, self.generations, self.num_parents = population_size, generations, num_parents
        self.mutation_prob, self.calibration_batches, self.cache_batches = mutation_prob, calibration_batches, cache_batches
        self.noise_std, self.bn_momentum = noise_std, bn_momentum
        self.module_attr = module_attr
        self.result: dict[str, float] | None = None
        self.fitness: float | None = None

    def _network(self, pl_module: L.LightningModule) -> nn.Module:
        net = pl_module if self.module_attr is None else getattr(pl_module, self.module_attr, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(f"SparsitySearch: {type(pl_module).__name__} has no module attribute "
                                 f"{self.module_attr!r}; set `module_attr` to the attribute holding the network.")
        return net

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "SparsitySearch", "it evaluates candidate sparsity plans on rank 0 with whole weights "
                       "(masks by magnitude over each full layer, BatchNorm recalibration) and broadcasts the result; "
                       "a sharded strategy splits the weights across ranks. Use DDP (configs/trainer/ddp.yaml).")
        net = self._network(pl_module)
        if stage == "fit" and any(isinstance(m, nn.SyncBatchNorm) for m in net.modules()):
            raise ValueError("SparsitySearch recalibrates BatchNorm on rank 0 only, which SyncBatchNorm would turn "
                             "into a collective: set `trainer.sync_batchnorm: false`.")

    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule, limit: int | None):
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        batches = _FirstBatches(source.train_dataloader(), limit)
        return list(batches) if self.cache_batches else batches

    def search(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, float], float]:
        """Run the evolution on this process (no collective inside)."""
        net = self._network(pl_module)
        names = list(layer_sparsities(net))
        numels = [net.get_submodule(n).weight.numel() for n in names]
        population, generations, limit = self.population_size, self.generations, self.calibration_batches
        if trainer.fast_dev_run:  # exercise the path, not the budget: 2 candidates on one batch
            population, generations, limit = 2, 0, 1
            rank_zero_info("SparsitySearch: fast_dev_run, searching 2 candidates on 1 batch")
        batches = self._calibration(trainer, pl_module, limit)
        noise = torch.Generator().manual_seed(self.seed)
        was_training = net.training

        def fitness(sparsities: list[float]) -> float:
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=noise)))
            with trainer.precision_plugin.forward_context():
                return calibrated_accuracy(net, dict(zip(names, sparsities, strict=True)), batches,
                                           self.noise_std, self.bn_momentum)

        start = time.perf_counter()
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), \
                StageProgress("SparsitySearch generations", total=generations, trainer=trainer) as progress:
            # the fork keeps the fitness noise out of the training RNG
            def log(message: str) -> None:
                progress.advance(note=message.split(": ", 1)[-1])

            found = evolutionary_search(numels, fitness, self.target, self.delta, population, generations,
                                        min(self.num_parents, population), self.mutation_prob, self.seed, log=log)
        net.train(was_training)
        rank_zero_info(f"SparsitySearch: {found.evaluations} candidates in {time.perf_counter() - start:.1f}s, "
                       f"best calibration top-1 {found.fitness:.4f}")
        return dict(zip(names, found.sparsities, strict=True)), found.fitness

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = self._network(pl_module)
        if not layer_sparsities(net):  # the same on every rank: no rank reaches the broadcast alone
            raise ValueError("SparsitySearch searches the sparsities of the masked layers, and none is masked: add "
                             "`effitrain.callbacks.dynamic_sparsity.DynamicSparsity` to trainer.callbacks.")
        if self.result is None:
            found = self.search(trainer, pl_module) if trainer.is_global_zero else None
            self.result, self.fitness = trainer.strategy.broadcast(found, src=0)
        sparsify(net, self.result, decay=None)  # in place: p_l only

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"layer_sparsities": self.result, "fitness": self.fitness}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result, self.fitness = state_dict.get("layer_sparsities"), state_dict.get("fitness")
