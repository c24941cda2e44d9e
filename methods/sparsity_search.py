"""UniPTS reducing-regrowing search of the per-layer sparsity (Xie et al., CVPR 2024, Sec. 3.2).

Official code: xjjxmu/UniPTS `get_sparisity`, `genetic_algorithm`. Every layer is reduced to P + δ, then a
budget Bud = δ·N of weights is regrown by a softmax over the genes s:

    p_l = max(0, P + δ − Bud·softmax(s)_l / n_l)

Without clipping exactly N·(1 − P) weights are kept. The genes evolve (population 25 = the all-P vector + 24
uniform draws, 25 generations, top-10 parents, uniform crossover, mutation gene×(1+N(0,1)) with probability
0.1); fitness is top-1 on the calibration set after magnitude masks and a BatchNorm recalibration on the
same set (:func:`calibrated_accuracy`). The masks themselves are in ``effitrain.methods.sparsity``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from effitrain.methods.sparsity import dense_weight, magnitude_mask, mask_of
from torch import Tensor, nn

__all__ = ["SearchResult", "calibrated_accuracy", "evolutionary_search", "reduce_regrow_sparsities"]


def reduce_regrow_sparsities(
    numels: Sequence[int], genes: Sequence[float] | Tensor, target: float, delta: float = 0.05
) -> list[float]:
    """The reducing-regrowing allocation p_l = max(0, P + δ − δ·N·softmax(s)_l / n_l) (UniPTS Sec. 3.2)."""
    if len(numels) != len(genes):
        raise ValueError(f"one gene per layer: got {len(genes)} genes for {len(numels)} layers")
    if not 0.0 < target + delta < 1.0:
        raise ValueError(f"target + delta must be in (0, 1), got {target} + {delta}")
    share = torch.softmax(torch.as_tensor(genes, dtype=torch.float64), dim=0)
    budget = delta * float(sum(numels))
    return [max(0.0, target + delta - budget * float(s) / n) for s, n in zip(share, numels, strict=True)]


@dataclass
class SearchResult:
    genes: list[float]
    sparsities: list[float]
    fitness: float
    evaluations: int


def evolutionary_search(
    numels: Sequence[int],
    fitness: Callable[[list[float]], float],
    target: float,
    delta: float = 0.05,
    population_size: int = 25,
    generations: int = 25,
    num_parents: int = 10,
    mutation_prob: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """UniPTS's evolution of the regrowing genes (official `genetic_algorithm`).

    Generation 0 is the all-P vector plus `population_size − 1` genes drawn from U(0, 1). Each
    generation keeps the `num_parents` fittest; the next population is the all-P vector, uniform
    crossovers of two distinct parents and mutations of random parents (each gene, with probability
    `mutation_prob`, multiplied by 1 + N(0, 1)), ⌊population_size/2⌋ of each family (12 + 12 for 25, as
    the official code). The fittest of the final population wins. `fitness` gets the per-layer
    sparsities of a candidate; identical candidates are scored once. Deterministic for a seed.
    """
    if num_parents < 2 or num_parents > population_size:
        raise ValueError(f"num_parents must be in [2, population_size={population_size}], got {num_parents}")
    if generations < 0:
        raise ValueError(f"generations must be >= 0, got {generations}")
    gen = torch.Generator().manual_seed(seed)
    size = len(numels)
    anchor = torch.full((size,), float(target), dtype=torch.float64)
    population = [anchor] + list(torch.rand(population_size - 1, size, generator=gen, dtype=torch.float64))
    cache: dict[bytes, float] = {}

    def score(genes: Tensor) -> float:
        key = genes.numpy().tobytes()
        if key not in cache:
            cache[key] = float(fitness(reduce_regrow_sparsities(numels, genes, target, delta)))
        return cache[key]

    half = population_size // 2
    for generation in range(generations):
        scores = [score(g) for g in population]
        order = sorted(range(len(population)), key=lambda i: -scores[i])
        parents = torch.stack([population[i] for i in order[:num_parents]])
        if log is not None:
            log(f"generation {generation}: best fitness {scores[order[0]]:.4f}")
        children = [anchor]
        while len(children) < half:
            i, j = torch.randperm(num_parents, generator=gen)[:2].tolist()
            pick = torch.rand(size, generator=gen) < 0.5
            children.append(torch.where(pick, parents[i], parents[j]))
        for k in torch.randint(num_parents, (half,), generator=gen).tolist():
            hit = torch.rand(size, generator=gen) < mutation_prob
            factor = 1.0 + torch.randn(size, generator=gen, dtype=torch.float64)
            children.append(torch.where(hit, parents[k] * factor, parents[k]))
        population = children
    scores = [score(g) for g in population]
    best = max(range(len(population)), key=lambda i: scores[i])
    genes = population[best]
    return SearchResult(genes.tolist(), reduce_regrow_sparsities(numels, genes, target, delta), scores[best], len(cache))


@torch.no_grad()
def calibrated_accuracy(
    model: nn.Module,
    sparsities: Mapping[str, float],
    batches: Iterable[tuple[Tensor, Tensor]],
    noise_std: float = 1e-6,
    bn_momentum: float | None = None,
) -> float:
    """UniPTS search fitness: top-1 of `model` under magnitude masks after a BatchNorm recalibration.

    Magnitude masks at `sparsities` (on the dense W of sparsified layers), BatchNorm statistics reset and
    re-estimated by one train-mode pass over `batches` (inputs + noise_std·N(0, 1)), then top-1 on the
    same `batches` in eval mode. Everything is restored afterwards (weights, masks, BatchNorm buffers,
    train/eval mode): done in place rather than on a copy, so it costs one copy of the masked weights.
    `bn_momentum=None` takes the cumulative average (the official code keeps momentum 0.1 over 160
    batches, which has converged; with a few batches the average is the faithful estimate). `batches`
    must be re-iterable (a DataLoader or a list).
    """
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved_norms = [(m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
    saved_weights = {}
    for name, p in sparsities.items():
        module = model.get_submodule(name)
        w = dense_weight(module)
        mask = mask_of(module)
        saved_weights[name] = (w.clone(), None if mask is None else mask.sparsity)
        if mask is not None:
            mask.sparsity = 0.0  # the dense W is masked in place below
        w.mul_(magnitude_mask(w, p))
    try:
        device = next(model.parameters()).device
        for m in norms:
            m.reset_running_stats()
            m.momentum = bn_momentum
        model.train()
        for x, _ in batches:
            x = x.to(device)
            model(x + noise_std * torch.randn_like(x))
        model.eval()
        correct = total = 0
        for x, y in batches:
            logits = model(x.to(device))
            correct += int((logits.argmax(-1) == y.to(device)).sum())
            total += y.numel()
    finally:
        for name, (w, p) in saved_weights.items():
            module = model.get_submodule(name)
            dense_weight(module).copy_(w)
            if p is not None:
                mask_of(module).sparsity = p
        for m, (momentum, buffers) in zip(norms, saved_norms, strict=True):
            m.momentum = momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        model.train(was_training)
    return correct / max(total, 1)
