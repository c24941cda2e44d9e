"""N:M sparse training of a network's Conv2d / Linear layers: LBC, SR-STE, or magnitude N:M + fine-tuning.

* ``lbc`` (Zhang et al., NeurIPS 2022): learnable candidate scores α per group of M
  (``effitrain.methods.lbc.LearnableNMMask``); before every training batch the schedule K(t) of alive
  candidates is applied; from ``t_f`` on one candidate a group is left and α is frozen (``requires_grad``
  off, so the optimizer neither moves nor decays it).
* ``sr_ste`` (Zhou et al., ICLR 2021): the N largest |W| of every M recomputed every forward, straight-through
  gradient plus ``decay``·(1 − m)⊙W on the pruned weights (the path UniPTS uses, with an N:M mask).
* ``magnitude``: the N largest |W| of every M of the starting weights, fixed; the pruned weights get no
  gradient (the one-shot baseline followed by fine-tuning).

The masks are registered at ``setup``, before the strategy wraps the model and before the optimizer is
built (α is a parameter of the model). Their state (α, ``alive``, fixed masks) is in the model's state_dict,
so a run resumed mid-schedule continues exactly. At the end of fit the zeros are baked into the weights and
the masks removed, so an export written in the LightningModule's ``on_fit_end`` is a plain model.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from effitrain.methods.lbc import LearnableNMMask, alive_count
from effitrain.methods.sparsity import (
    dense_weight,
    fix_masks,
    global_sparsity,
    mask_of,
    network_of,
    nm_mask,
    parse_pattern,
    prunable_layers,
    register_mask,
    remove_sparsity,
    sparsify,
    to_groups,
)
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

Method = Literal["lbc", "sr_ste", "magnitude"]


def timm_dense_layers(net: nn.Module) -> list[str]:
    """The first conv and the classifier of a timm model (``pretrained_cfg``), left dense as NVIDIA ASP and
    LBC's official code do; none for other networks."""
    cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {}
    names = [cfg.get("first_conv"), cfg.get("classifier")]
    return [n for name in names if name for n in ([name] if isinstance(name, str) else name)]


class NMSparsity(L.Callback):
    """Train the network with N:M sparse Conv2d / Linear layers (LBC, SR-STE or a fixed magnitude mask).

    Args:
        pattern: ``"N:M"``, N of every M consecutive inputs kept (``"2:4"``, ``"1:4"``, ``"1:8"``).
        method: ``lbc``, ``sr_ste`` or ``magnitude`` (see the module docstring).
        t_i, t_f: LBC's removal schedule runs from ``t_i`` (all C(M, N) candidates alive) to ``t_f`` (one
            left, α frozen), in units of ``unit`` (official ResNet: 0 and 60 of 120 epochs).
        exponent: LBC's schedule exponent (official: 3 for ResNet, 4 for DeiT).
        unit: ``epoch`` (official) or ``step`` (global steps, for short runs).
        decay: SR-STE's λ on the pruned weights (SR-STE: 2e-4).
        module_attr: the LightningModule attribute holding the network (``None``: the module itself).
        exclude: glob patterns of layers left dense; ``None``: a timm model's first conv and classifier.

    Raises:
        ValueError: a bad pattern / method / schedule (at construction); no layer to sparsify or a layer width
            that M does not divide (at setup, before training).
        AttributeError: ``module_attr`` is not an attribute of the LightningModule.
    """

    def __init__(self, pattern: str = "2:4", method: Method = "lbc", t_i: float = 0, t_f: float = 60,
                 exponent: float = 3.0, unit: Literal["epoch", "step"] = "epoch", decay: float = 2e-4,
                 module_attr: str | None = "model", exclude: list[str] | None = None):
        self.n, self.m = parse_pattern(pattern)
        if method not in ("lbc", "sr_ste", "magnitude"):
            raise ValueError(f"method must be 'lbc', 'sr_ste' or 'magnitude', got {method!r}.")
        if method == "lbc" and not 0 <= t_i < t_f:
            raise ValueError(f"LBC's schedule needs 0 <= t_i < t_f, got t_i={t_i}, t_f={t_f}.")
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}.")
        if decay < 0 or exponent <= 0:
            raise ValueError(f"need decay >= 0 and exponent > 0, got {decay}, {exponent}.")
        self.method, self.t_i, self.t_f, self.exponent, self.unit = method, t_i, t_f, exponent, unit
        self.decay, self.module_attr, self.exclude = decay, module_attr, exclude
        self.layers: list[str] = []
        self._net: nn.Module | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._net is not None:
            return
        net = network_of(pl_module, self.module_attr, type(self).__name__)
        exclude = timm_dense_layers(net) if self.exclude is None else list(self.exclude)
        layers = prunable_layers(net, exclude)
        if not layers:
            raise ValueError(f"NMSparsity: no Conv2d/Linear layer left to sparsify after exclude={exclude}.")
        for name, layer in layers.items():  # every width checked before any mask is registered
            try:
                to_groups(dense_weight(layer), self.m)
            except ValueError as err:
                raise ValueError(f"NMSparsity: layer {name!r}: {err}") from None
        if self.method == "lbc":
            for layer in layers.values():
                register_mask(layer, LearnableNMMask(tuple(layer.weight.shape), self.n, self.m).to(layer.weight.device))
        elif self.method == "sr_ste":
            sparsify(net, dict.fromkeys(layers, 1.0 - self.n / self.m), self.decay, pattern=(self.n, self.m))
        else:
            fix_masks(net, {name: nm_mask(layer.weight, self.n, self.m) for name, layer in layers.items()})
        self.layers, self._net = list(layers), net
        rank_zero_info(f"NMSparsity: {self.method} {self.n}:{self.m} on {len(layers)} layers (dense: {exclude})")

    def masks(self) -> list[LearnableNMMask]:
        return [mask_of(self._net.get_submodule(name)) for name in self.layers]

    def time(self, trainer: L.Trainer) -> float:
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def apply_schedule(self, t: float) -> int:
        """Remove candidates down to K(t) per group; from ``t_f`` on, freeze α. Returns K(t)."""
        masks = self.masks()
        k = alive_count(t, self.t_i, self.t_f, masks[0].table.shape[0], self.exponent)
        for mask in masks:
            mask.keep_best(k)
            if t >= self.t_f and mask.alpha.requires_grad:
                mask.alpha.requires_grad_(False)
                mask.alpha.grad = None
        return k

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.method == "lbc":
            self.apply_schedule(self.time(trainer))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("sparsity/weights", global_sparsity(self._net, self.layers), rank_zero_only=True)
        if self.method == "lbc":
            alive = sum(int(m.alive.sum()) for m in self.masks()) / sum(m.alive.shape[0] for m in self.masks())
            pl_module.log("sparsity/alive_candidates", alive, rank_zero_only=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._net is not None:
            reached = global_sparsity(self._net, self.layers)
            remove_sparsity(self._net, bake=True)
            self._net = None
            rank_zero_info(f"NMSparsity: zeros baked into the weights, sparsity {reached:.4f}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pattern": f"{self.n}:{self.m}", "method": self.method, "layers": self.layers}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("pattern") != f"{self.n}:{self.m}" or state_dict.get("method") != self.method:
            raise ValueError(f"NMSparsity: the checkpoint was written by {state_dict.get('method')} "
                             f"{state_dict.get('pattern')}, this run is {self.method} {self.n}:{self.m}.")
