"""Weight masks: magnitude, per-row and N:M masks, and the parametrizations that apply them to a layer.

The masks are `torch.nn.utils.parametrize` parametrizations of `weight`, so they work for any module whose
forward reads `self.weight` (Conv2d, Linear and their timm / transformers subclasses). A masked layer's
`state_dict` keeps the plain key `weight` with the *dense* W, so checkpoints load into dense or masked
models alike. `remove_sparsity` bakes the zeros in and leaves a plain dense model. Three parametrizations
share this machinery (`mask_of` finds any of them):

* `MagnitudeMask`: dynamic sparse training (UniPTS, Xie et al., CVPR 2024, Sec. 3.3; SR-STE, Zhou et al.,
  ICLR 2021, Eq. 4). On every forward the layer computes with W⊙m, m keeping its largest-|W| weights
  (⌊p·n⌋ zeroed, or N of every M inputs), and the backward is straight-through plus a decay that pulls
  pruned weights towards zero:

      ∂L/∂W = ∂L/∂(W⊙m) + λ·(1 − m)⊙W        (UniPTS λ = 5e-5; SR-STE λ = 2e-4)

  Pruned weights keep their values and come back once their magnitude crosses the threshold.
* `FixedMask`: a mask chosen once (magnitude N:M before fine-tuning, Wanda, DSnoT); W⊙m, whose gradient
  is g⊙m, so pruned weights stay pruned.
* `effitrain.methods.lbc.LearnableNMMask`: LBC's learnable N:M combinations.

N:M groups run along the input dimension (dim 1; for convs the (I, kh, kw) block is regrouped channel-last,
as NVIDIA ASP and LBC do): `to_groups` / `from_groups` convert between a weight and its [G, M] groups.

Use::

    sparsify(model, {"layer1.0.conv1": 0.9, "fc": 0.8})   # in place, per-forward masks + STE + decay
    sparsify(model, {"fc": 0.5}, pattern=(2, 4))           # SR-STE: per-forward 2:4 masks
    fix_masks(model, {"fc": nm_mask(model.fc.weight, 2, 4)})   # a fixed mask
    current_masks(model)                                   # {"layer1.0.conv1": BoolTensor, ...}
    remove_sparsity(model)                                 # plain model, zeros baked in
"""

from __future__ import annotations

import fnmatch
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

import torch
from effitrain.methods.topk_threshold import SEARCH_MIN_ROW, topk_strict_bound
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "FixedMask",
    "MagnitudeMask",
    "WeightMask",
    "current_masks",
    "dense_weight",
    "fix_masks",
    "from_groups",
    "global_sparsity",
    "magnitude_mask",
    "mask_of",
    "mask_sparsities",
    "network_of",
    "nm_mask",
    "parse_pattern",
    "prunable_layers",
    "remove_sparsity",
    "row_mask",
    "sparsify",
    "to_groups",
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


def parse_pattern(pattern: str | Sequence[int]) -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> (n, m), checked: 1 <= n < m (n = m would prune nothing)."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"an N:M pattern is written 'N:M' (e.g. '2:4'), got {pattern!r}")
        n, m = int(parts[0]), int(parts[1])
    else:
        n, m = (int(v) for v in pattern)
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= N < M (N kept of every M), got {n}:{m}")
    return n, m


def to_groups(weight: Tensor, m: int) -> Tensor:
    """The [G, m] groups of m consecutive inputs of each output row (convs regrouped channel-last: (O, kh, kw, I)).

    Raises:
        ValueError: the input width (I·kh·kw) is not a multiple of m.
    """
    w2 = weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1) if weight.dim() > 2 else weight
    if w2.dim() != 2 or w2.shape[1] % m:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has input width {w2.shape[-1]}, not a multiple of "
                         f"M={m}: pick an M that divides it, or exclude the layer")
    return w2.reshape(-1, m)


def from_groups(groups: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_groups`: the [G, m] groups back in a weight's ``shape``."""
    if len(shape) <= 2:
        return groups.reshape(shape)
    out = groups.reshape(shape[0], *shape[2:], shape[1])
    return out.permute(0, len(shape) - 1, *range(1, len(shape) - 1)).contiguous()


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in each group of m consecutive inputs keep the n largest |scores| (the weight itself for
    magnitude N:M, or a saliency such as Wanda's |W|·‖X‖). Groups as in :func:`to_groups`, so a 2:4 Linear
    mask is the sparse-tensor-core layout."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got n={n}, m={m}")
    groups = to_groups(scores.detach().abs(), m)
    keep = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return from_groups(mask, scores.shape)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row, keep the largest scores: exactly ⌊sparsity·d_in⌋ entries of every row are False
    (Wanda's per-output comparison group)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = scores.detach().reshape(scores.shape[0], -1)
    drop = math.floor(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        # a stable sort breaks ties by position, as the official Wanda code does
        mask.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :drop], False)
    return mask.view_as(scores)


def _threshold_mask_forward(weight: Tensor, keep: int, owner: MagnitudeMask) -> Tensor | None:
    """W⊙m for the ``keep`` largest |W| by an exact counted threshold τ (``effitrain.methods.topk_threshold``),
    warm-started from the owner's previous τ: weights move little per step, so this costs a few passes
    instead of a ``topk``. ``hardshrink`` at the float just below τ keeps exactly |W| >= τ in one pass.
    Returns None when |W| is tied at τ (the mask would keep more than ``keep``: use the topk path)."""
    n = weight.numel()
    buf = _scratch(weight.device, 2 * n)
    absw, scratch = buf[:n].view(1, n), buf[n : 2 * n].view(1, n)
    torch.abs(weight.detach().reshape(-1), out=absw[0])
    (bound,), owner._hint = topk_strict_bound(absw, keep, scratch, hint=owner._hint)
    if bound is None:
        return None
    return torch.ops.aten.hardshrink(weight.detach(), bound)


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
        if owner.pattern is not None:  # SR-STE: N of every M by magnitude
            out = weight * nm_mask(weight, *owner.pattern)
        elif (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() > SEARCH_MIN_ROW
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


class WeightMask(nn.Module):
    """Base of the parametrizations of ``weight`` that mask it (what :func:`mask_of` looks for)."""

    def mask(self, weight: Tensor) -> Tensor:
        """The boolean mask the layer computes with for the dense ``weight``."""
        raise NotImplementedError


class MagnitudeMask(WeightMask):
    """Parametrization of a layer's weight: its largest-magnitude weights, recomputed every forward.

    Args:
        sparsity: the fraction of weights zeroed (⌊sparsity·n⌋ of them); ignored when ``pattern`` is set.
        decay: λ of the straight-through gradient ∂L/∂W = g + λ(1 − m)⊙W (0 gives pure STE).
        pattern: ``(n, m)``: keep the n largest of every m inputs instead (SR-STE).
    """

    def __init__(self, sparsity: float, decay: float = 5e-5, pattern: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.sparsity = float(sparsity) if pattern is None else 1.0 - pattern[0] / pattern[1]
        self.decay = float(decay)
        self.pattern = None if pattern is None else tuple(pattern)
        self._hint: list | None = None  # the last threshold search, to start the next one from (speed only)

    def forward(self, weight: Tensor) -> Tensor:
        if self.sparsity <= 0.0:
            return weight
        return _MaskedWeight.apply(weight, self)

    def mask(self, weight: Tensor) -> Tensor:
        if self.pattern is not None:
            return nm_mask(weight, *self.pattern)
        return magnitude_mask(weight, self.sparsity)

    def extra_repr(self) -> str:
        what = f"pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"sparsity={self.sparsity:.4f}"
        return f"{what}, decay={self.decay:g}"


class FixedMask(WeightMask):
    """Parametrization W ↦ W⊙m with a fixed boolean mask (a buffer, saved in the state_dict); the weight
    gradient is g⊙m, so pruned weights get none."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", mask.detach().to(torch.bool).clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.keep

    def mask(self, weight: Tensor) -> Tensor:
        return self.keep.clone()

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.keep.float().mean())

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity:.4f}"


# The state_dict of a sparsified layer keeps the plain key "weight" (dense W): checkpoints are
# interchangeable between dense and sparsified models, whatever order the masks and the load happen in.
def _save_plain_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + _ORIGINAL_KEY in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + _ORIGINAL_KEY)


def _load_plain_key(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if mask_of(module) is not None and prefix + "weight" in state_dict:
        state_dict[prefix + _ORIGINAL_KEY] = state_dict.pop(prefix + "weight")


def mask_of(module: nn.Module) -> WeightMask | None:
    """The mask parametrization of ``module.weight`` (any :class:`WeightMask`), or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightMask):
            return p
    return None


def dense_weight(module: nn.Module) -> Tensor:
    """The dense W of a layer, masked or not (the parameter the optimizer updates)."""
    return module.parametrizations.weight.original if mask_of(module) is not None else module.weight


def register_mask(module: nn.Module, mask: WeightMask) -> None:
    """Attach ``mask`` to ``module.weight`` (with the plain-key state_dict hooks)."""
    parametrize.register_parametrization(module, "weight", mask)
    if not getattr(module, "_sparsity_key_hooks", False):
        module.register_state_dict_post_hook(_save_plain_key)
        module.register_load_state_dict_pre_hook(_load_plain_key)
        module._sparsity_key_hooks = True


def network_of(owner: nn.Module, attr: str | None, who: str) -> nn.Module:
    """``owner`` itself (``attr`` None) or its submodule attribute ``attr``: how callbacks find the network
    inside a LightningModule.

    Raises:
        AttributeError: ``attr`` is not a module attribute of ``owner``; names ``who`` (the caller) in the message.
    """
    if attr is None:
        return owner
    net = getattr(owner, attr, None)
    if not isinstance(net, nn.Module):
        raise AttributeError(f"{who}: {type(owner).__name__} has no module attribute {attr!r}; set `module_attr` "
                             "to the attribute holding the network (or null for the LightningModule itself).")
    return net


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


def sparsify(model: nn.Module, sparsities: Mapping[str, float], decay: float | None = 5e-5,
             pattern: tuple[int, int] | None = None) -> nn.Module:
    """Make each named layer compute with its largest-magnitude weights on every forward (in place).

    The gradient is straight-through plus decay·(1 − m)⊙W (UniPTS / SR-STE). A layer already
    sparsified gets its sparsity (and decay, unless `decay` is None) updated in place, which keeps its
    parameters and any DDP wrapper valid. `decay=None` on a new layer means 5e-5. With `pattern=(n, m)` the
    masks keep n of every m inputs instead (SR-STE; the sparsities are then ignored). Returns `model`.

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
        mask = mask_of(module)
        if isinstance(mask, MagnitudeMask):
            mask.sparsity = float(p)
            mask.decay = mask.decay if decay is None else float(decay)
            continue
        if mask is not None:
            raise ValueError(f"{name!r} already carries a {type(mask).__name__}; remove_sparsity first")
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise ValueError(f"{name!r} ({type(module).__name__}) has no weight parameter to sparsify")
        if pattern is not None:
            to_groups(module.weight, pattern[1])  # a width M does not divide fails here, before training
        register_mask(module, MagnitudeMask(p, 5e-5 if decay is None else decay, pattern))
    return model


def fix_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Make each named layer compute with W⊙m for a fixed boolean mask m (a :class:`FixedMask`), in place.

    Raises:
        KeyError: a name is not a submodule of `model`.
        ValueError: a mask whose shape differs from the layer's weight.
    """
    for name, m in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"{name!r} is not a submodule of {type(model).__name__}") from err
        if m.shape != dense_weight(module).shape:
            raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, the weight {tuple(module.weight.shape)}")
        existing = mask_of(module)
        if isinstance(existing, FixedMask):
            existing.keep.copy_(m)
            continue
        if existing is not None:
            raise ValueError(f"{name!r} already carries a {type(existing).__name__}; remove_sparsity first")
        register_mask(module, FixedMask(m.to(module.weight.device)))
    return model


def mask_sparsities(model: nn.Module) -> dict[str, float]:
    """The sparsity set on each masked layer of `model`, by name."""
    out = {}
    for name, module in model.named_modules():
        mask = mask_of(module)
        if mask is not None:
            out[name] = mask.sparsity
    return out


@torch.no_grad()
def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """The boolean mask each sparsified layer of `model` computes with right now."""
    out = {}
    for name, module in model.named_modules():
        mask = mask_of(module)
        if mask is not None:
            out[name] = mask.mask(dense_weight(module))
    return out


@torch.no_grad()
def global_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros in the effective weights of the sparsified (or the named) layers."""
    names = list(mask_sparsities(model)) if names is None else list(names)
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
        if mask_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
    return model
