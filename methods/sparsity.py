"""Unstructured weight sparsity: magnitude masks, UniPTS dynamic sparse training and sparsity search.

Xie et al., "UniPTS: A Unified Framework for Proficient Post-Training Sparsity", CVPR 2024 (official
code: xjjxmu/UniPTS). From a dense trained network and a small calibration set UniPTS reaches a high
global sparsity P in three parts; this file holds the two that touch weights (the loss is in
`methods/distillation.py`):

* Dynamic sparse training (Sec. 3.3; official `GetWeightSubnet`). On every forward a layer computes
  with W⊙m, m keeping its largest-|W| weights (⌊p_l·n_l⌋ zeroed). The backward is straight-through
  plus a decay that pulls pruned weights towards zero (SR-STE style):

      ∂L/∂W = ∂L/∂(W⊙m) + λ·(1 − m)⊙W,        λ = 5e-5

  Pruned weights keep their values and come back once their magnitude crosses the threshold.

* Reducing-regrowing search of the per-layer sparsity (Sec. 3.2; official `get_sparisity`,
  `genetic_algorithm`). Every layer is reduced to P + δ, then a budget Bud = δ·N of weights is
  regrown by a softmax over the genes s:

      p_l = max(0, P + δ − Bud·softmax(s)_l / n_l)

  Without clipping exactly N·(1 − P) weights are kept. The genes evolve (population 25 = the all-P
  vector + 24 uniform draws, 25 generations, top-10 parents, uniform crossover, mutation gene×(1+N(0,1))
  with probability 0.1); fitness is top-1 on the calibration set after magnitude masks and a
  BatchNorm recalibration on the same set.

The masks are `torch.nn.utils.parametrize` parametrizations of `weight`, so they work for any module
whose forward reads `self.weight` (Conv2d, Linear and their timm / transformers subclasses). A
sparsified layer's `state_dict` keeps the plain key `weight` with the *dense* W, so checkpoints load
into dense or sparsified models alike and masks (a function of W and p_l) survive a round trip.
`remove_sparsity` bakes the zeros in and leaves a plain dense model.

Use::

    sparsify(model, {"layer1.0.conv1": 0.9, "fc": 0.8})   # in place, per-forward masks + STE + decay
    current_masks(model)                                   # {"layer1.0.conv1": BoolTensor, ...}
    remove_sparsity(model)                                 # plain model, zeros baked in
"""

from __future__ import annotations

import fnmatch
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from effitrain.methods.topk_threshold import _SMALL_ROW, _next_down, topk_threshold
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "MagnitudeMask",
    "SearchResult",
    "calibrated_accuracy",
    "current_masks",
    "evolutionary_search",
    "global_sparsity",
    "layer_sparsities",
    "layerwise_sparsity",
    "magnitude_mask",
    "nm_mask",
    "prunable_layers",
    "remove_sparsity",
    "sparsify",
]

_ORIGINAL_KEY = "parametrizations.weight.original"


# ----------------------------------------------------------------------------------------------- masks
def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Boolean mask keeping the largest-|W| entries, with exactly ⌊sparsity·numel⌋ entries False."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    numel = weight.numel()
    num_zeros = math.floor(sparsity * numel)
    if num_zeros <= 0:
        return torch.ones_like(weight, dtype=torch.bool)
    if num_zeros >= numel:
        return torch.zeros_like(weight, dtype=torch.bool)
    # topk of the kept entries (unsorted) is a selection, not a sort: O(n) and exact under ties.
    keep = torch.topk(weight.detach().abs().flatten(), numel - num_zeros, sorted=False).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=weight.device)
    mask[keep] = True
    return mask.view_as(weight)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in each group of m consecutive input weights keep the n largest |W|.

    Groups run along the input dimension (dim 1, and for convs the flattened (I, kh, kw) block is
    regrouped channel-last, as NVIDIA ASP / LBC do), so a 2:4 Linear mask is the sparse-tensor-core
    layout.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got n={n}, m={m}")
    w = weight.detach().abs()
    w2 = w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1) if w.dim() > 2 else w
    if w2.shape[1] % m:
        raise ValueError(f"input size {w2.shape[1]} is not a multiple of m={m}; pick a layer or m that divides")
    groups = w2.reshape(-1, m)
    keep = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True).reshape(w2.shape)
    if w.dim() > 2:
        mask = mask.reshape(w.shape[0], *w.shape[2:], w.shape[1]).permute(0, w.dim() - 1, *range(1, w.dim() - 1))
    return mask.contiguous()


def _threshold_mask_forward(weight: Tensor, keep: int, owner: MagnitudeMask) -> Tensor | None:
    """W⊙m for the ``keep`` largest |W| by an exact counted threshold τ (``effitrain.methods.topk_threshold``),
    warm-started from the owner's previous τ: weights move little per step, so this costs a few passes
    instead of a ``topk``. ``hardshrink`` at the float just below τ keeps exactly |W| >= τ in one pass.
    Returns None when |W| is tied at τ (the mask would keep more than ``keep``: use the topk path)."""
    n = weight.numel()
    buf = _scratch(weight.device, 2 * n)
    absw, scratch = buf[:n].view(1, n), buf[n : 2 * n].view(1, n)
    torch.abs(weight.detach().reshape(-1), out=absw[0])
    counts: list[int] = []
    tau, owner._hint = topk_threshold(absw, keep, scratch, hint=owner._hint, counts=counts)
    if counts[0] != keep:
        return None
    return torch.ops.aten.hardshrink(weight.detach(), _next_down(tau[0]))


_SCRATCH = threading.local()  # per thread: {device: flat fp32 buffer}


def _scratch(device: torch.device, numel: int) -> Tensor:
    """One flat fp32 work buffer per device and thread, grown to twice the largest masked layer (|W| and the
    count flags; W − W⊙m in the backward)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(device)
    if buf is None or buf.numel() < numel:
        buf = buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


class _MaskedWeight(torch.autograd.Function):
    """W ↦ W⊙m with m the ⌊(1 − p)·n⌋ largest |W|; backward: straight-through + decay·(1 − m)⊙W."""

    @staticmethod
    def forward(ctx, weight: Tensor, owner: MagnitudeMask) -> Tensor:  # type: ignore[override]
        keep = weight.numel() - math.floor(owner.sparsity * weight.numel())
        out = None
        if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() > _SMALL_ROW
                and 0 < keep < weight.numel() and not torch.compiler.is_compiling()
                and not isinstance(weight, torch._subclasses.FakeTensor)):
            # CPU only: there topk costs several passes; on GPUs it is one fast kernel and the search's
            # host synchronisations would cost more than they save
            out = _threshold_mask_forward(weight, keep, owner)
        if out is None:  # small, low-precision or tied weights: the topk reference
            out = weight * magnitude_mask(weight, owner.sparsity)
        ctx.decay = owner.decay
        if ctx.decay:
            ctx.save_for_backward(weight, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if not ctx.decay:
            return grad, None
        weight, masked = ctx.saved_tensors
        # (1 − m)⊙W = W − W⊙m, exactly: 0 on kept entries (so their gradient is the upstream one, bit for
        # bit) and W on pruned ones; formed in the work buffer so only the result is a new tensor
        reuse = weight.dtype == torch.float32 and weight.is_contiguous() and not torch.is_grad_enabled()
        pruned = torch.sub(weight, masked, out=_scratch(weight.device, weight.numel())[: weight.numel()].view_as(weight)
                           ) if reuse else weight - masked  # (create_graph=True needs a differentiable result)
        return torch.add(grad, pruned, alpha=ctx.decay), None


class MagnitudeMask(nn.Module):
    """Parametrization of a layer's weight: its largest-magnitude weights, recomputed every forward.

    Args:
        sparsity: the fraction of weights zeroed (⌊sparsity·n⌋ of them).
        decay: λ of the straight-through gradient ∂L/∂W = g + λ(1 − m)⊙W (0 gives pure STE).
    """

    def __init__(self, sparsity: float, decay: float = 5e-5) -> None:
        super().__init__()
        self.sparsity = float(sparsity)
        self.decay = float(decay)
        self._hint: list | None = None  # the last threshold search, to start the next one from (speed only)

    def forward(self, weight: Tensor) -> Tensor:
        if self.sparsity <= 0.0:
            return weight
        return _MaskedWeight.apply(weight, self)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity:.4f}, decay={self.decay:g}"


# The state_dict of a sparsified layer keeps the plain key "weight" (dense W): checkpoints are
# interchangeable between dense and sparsified models, whatever order the masks and the load happen in.
def _save_plain_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + _ORIGINAL_KEY in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + _ORIGINAL_KEY)


def _load_plain_key(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if _mask_of(module) is not None and prefix + "weight" in state_dict:
        state_dict[prefix + _ORIGINAL_KEY] = state_dict.pop(prefix + "weight")


def _mask_of(module: nn.Module) -> MagnitudeMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, MagnitudeMask):
            return p
    return None


def _dense_weight(module: nn.Module) -> Tensor:
    return module.parametrizations.weight.original if _mask_of(module) is not None else module.weight


def prunable_layers(
    model: nn.Module, exclude: Sequence[str] = (), types: tuple[type, ...] = (nn.Conv2d, nn.Linear)
) -> dict[str, nn.Module]:
    """The Conv2d / Linear layers (subclasses included) of `model` by name, minus `exclude` globs."""
    layers = {}
    for name, module in model.named_modules():
        if name.endswith(".parametrizations") or ".parametrizations." in name:
            continue
        if isinstance(module, types) and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            layers[name] = module
    return layers


def sparsify(model: nn.Module, sparsities: Mapping[str, float], decay: float | None = 5e-5) -> nn.Module:
    """Make each named layer compute with its largest-magnitude weights on every forward (in place).

    The gradient is straight-through plus decay·(1 − m)⊙W (UniPTS / SR-STE). A layer already
    sparsified gets its sparsity (and decay, unless `decay` is None) updated in place, which keeps its
    parameters and any DDP wrapper valid. `decay=None` on a new layer means 5e-5. Returns `model`.

    Raises:
        KeyError: a name is not a submodule of `model`.
        ValueError: a sparsity outside [0, 1), or a module without a `weight` parameter.
    """
    for name, p in sparsities.items():
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"sparsity of {name!r} must be in [0, 1), got {p}")
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"{name!r} is not a submodule of {type(model).__name__}; "
                           f"list candidates with prunable_layers(model)") from err
        mask = _mask_of(module)
        if mask is not None:
            mask.sparsity = float(p)
            mask.decay = mask.decay if decay is None else float(decay)
            continue
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise ValueError(f"{name!r} ({type(module).__name__}) has no weight parameter to sparsify")
        parametrize.register_parametrization(module, "weight", MagnitudeMask(p, 5e-5 if decay is None else decay))
        if not getattr(module, "_sparsity_key_hooks", False):
            module.register_state_dict_post_hook(_save_plain_key)
            module.register_load_state_dict_pre_hook(_load_plain_key)
            module._sparsity_key_hooks = True
    return model


def layer_sparsities(model: nn.Module) -> dict[str, float]:
    """The sparsity set on each sparsified layer of `model`."""
    out = {}
    for name, module in model.named_modules():
        mask = _mask_of(module)
        if mask is not None:
            out[name] = mask.sparsity
    return out


@torch.no_grad()
def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """The boolean mask each sparsified layer of `model` computes with right now."""
    out = {}
    for name, module in model.named_modules():
        mask = _mask_of(module)
        if mask is not None:
            out[name] = magnitude_mask(_dense_weight(module), mask.sparsity)
    return out


@torch.no_grad()
def global_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros in the effective weights of the sparsified (or the named) layers."""
    names = list(layer_sparsities(model)) if names is None else list(names)
    zeros = total = 0
    for name in names:
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def remove_sparsity(model: nn.Module, bake: bool = True) -> nn.Module:
    """Remove the masks: `bake=True` writes the zeros into W (a plain dense model to export);
    `bake=False` restores the dense W, pruned values included. Returns `model`."""
    for module in list(model.modules()):
        if _mask_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
    return model


# ------------------------------------------------------------------------------------ sparsity search
def layerwise_sparsity(
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
            cache[key] = float(fitness(layerwise_sparsity(numels, genes, target, delta)))
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
    return SearchResult(genes.tolist(), layerwise_sparsity(numels, genes, target, delta), scores[best], len(cache))


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
        w = _dense_weight(module)
        mask = _mask_of(module)
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
            _dense_weight(module).copy_(w)
            if p is not None:
                _mask_of(module).sparsity = p
        for m, (momentum, buffers) in zip(norms, saved_norms, strict=True):
            m.momentum = momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        model.train(was_training)
    return correct / max(total, 1)
