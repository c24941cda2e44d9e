"""Dynamic sparse training (UniPTS Sec. 3.3): per-forward magnitude masks with a straight-through gradient.

Every forward, each sparsified layer computes with its largest-|W| weights (⌊p_l·n_l⌋ zeroed); the dense
gradient reaches all of W plus λ·(1 − m)⊙W, so pruned weights keep their values and return when their
magnitude crosses the threshold (official code: xjjxmu/UniPTS `utils/conv_type.py`). The mechanism is
`effitrain.methods.sparsity.sparsify`; this callback decides when it is applied, logs the realized sparsity, keeps
the per-layer sparsities in the checkpoint and bakes the zeros in at the end of fit (so an export written
in the LightningModule's `on_fit_end` is a plain dense model with zeros).

Under DDP every rank holds the same masks: the masks are a function of W (identical on all ranks) and of
the per-layer sparsities (a config value, the checkpoint's, or a `SparsitySearch` result broadcast from
rank 0). The masks are registered at `setup`, before the strategy wraps the model.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from effitrain.callbacks.strategy_checks import refuse_sharded
from effitrain.methods.sparsity import (
    global_sparsity,
    layer_sparsities,
    prunable_layers,
    remove_sparsity,
    sparsify,
)
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

SHARDED_WHY = (
    "it recomputes each layer's magnitude mask (the top-(1-p) of |W| over the whole weight) in every forward, "
    "and bakes the zeros into the weights at the end; a sharded strategy splits each weight across ranks (and "
    "DeepSpeed into flat partitions), so the masks would be chosen per shard. Use DDP (configs/trainer/ddp.yaml): "
    "each rank then holds whole weights and computes the same masks.")


class DynamicSparsity(L.Callback):
    """Keep the model's Conv2d / Linear layers sparse by magnitude, recomputed every forward.

    Args:
        sparsity: the sparsity of every layer when no per-layer values are given (0.9 = 90% zeros).
        layer_sparsities: per-layer sparsities by name (relative to ``module_attr``); overrides ``sparsity``.
            A ``SparsitySearch`` callback replaces the values (on the same layers) at the start of fit.
        decay: λ of the gradient of pruned weights, λ·(1 − m)⊙W (UniPTS: 5e-5; 0 gives pure STE).
        module_attr: the LightningModule attribute holding the network (``None``: the module itself).
        exclude: glob patterns of layer names left dense (e.g. ``["conv1", "fc"]``).
        bake_on_fit_end: at the end of fit, write the zeros into the weights and remove the masks.

    Raises:
        ValueError: a sparsity outside [0, 1), ``exclude`` leaving no layer, a checkpoint masking other layers, or
            a sharded strategy (FSDP2, FSDP, DeepSpeed), at ``setup``.
        AttributeError: ``module_attr`` is not an attribute of the LightningModule.
        KeyError: a ``layer_sparsities`` name that is not a layer of the network.
    """

    def __init__(self, sparsity: float = 0.9, layer_sparsities: dict[str, float] | None = None,
                 decay: float = 5e-5, module_attr: str | None = "model", exclude: list[str] | None = None,
                 bake_on_fit_end: bool = True):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}.")
        self.sparsity, self.decay, self.module_attr = sparsity, decay, module_attr
        self.exclude, self.bake_on_fit_end = list(exclude or []), bake_on_fit_end
        self.layer_sparsities = dict(layer_sparsities) if layer_sparsities else None
        self._restored: dict[str, float] | None = None
        self._network: nn.Module | None = None

    def network(self, pl_module: L.LightningModule) -> nn.Module:
        if self.module_attr is None:
            return pl_module
        net = getattr(pl_module, self.module_attr, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(f"DynamicSparsity: {type(pl_module).__name__} has no module attribute "
                                 f"{self.module_attr!r}; set `module_attr` to the attribute holding the network "
                                 "(or null for the LightningModule itself).")
        return net

    def planned(self, net: nn.Module) -> dict[str, float]:
        """The per-layer sparsities applied at setup (given > uniform over the Conv2d/Linear layers)."""
        if self.layer_sparsities is not None:
            return dict(self.layer_sparsities)
        layers = prunable_layers(net, self.exclude)
        if not layers:
            raise ValueError(f"DynamicSparsity: no Conv2d/Linear layer left after exclude={self.exclude}.")
        return {name: self.sparsity for name in layers}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The masks are registered here, before the strategy wraps the model (DDP hooks the parameters
        # as they are then); later changes (a search result, a checkpoint) only change p_l in place.
        refuse_sharded(trainer, "DynamicSparsity", SHARDED_WHY)
        net = self.network(pl_module)
        for name, p in (self.layer_sparsities or {}).items():  # fail before training on a wrong name or value
            if not 0.0 <= p < 1.0:
                raise ValueError(f"DynamicSparsity: sparsity of {name!r} must be in [0, 1), got {p}.")
            try:
                net.get_submodule(name)
            except AttributeError:
                raise KeyError(f"DynamicSparsity: {name!r} is not a layer of {type(net).__name__}; names are "
                               "relative to `module_attr` (see effitrain.methods.sparsity.prunable_layers).") from None
        plan = self.planned(net)
        sparsify(net, plan, decay=self.decay)
        self._network = net
        rank_zero_info(f"DynamicSparsity: {len(plan)} layers, weight sparsity {global_sparsity(net, plan):.4f}")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:  # resumed: the checkpoint's per-layer sparsities (e.g. a search result)
            unknown = set(self._restored) - set(layer_sparsities(self._network))
            if unknown:
                raise ValueError(f"DynamicSparsity: the checkpoint masks layers {sorted(unknown)} that this run "
                                 "does not; use the same `exclude` / `layer_sparsities` as the run that wrote it.")
            sparsify(self._network, self._restored, decay=self.decay)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("sparsity/weights", global_sparsity(self.network(pl_module)), rank_zero_only=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bake_on_fit_end:
            net = self.network(pl_module)
            reached = global_sparsity(net)
            remove_sparsity(net, bake=True)
            self._network = None
            rank_zero_info(f"DynamicSparsity: zeros baked into the weights, sparsity {reached:.4f}")

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._network is not None:
            return {"layer_sparsities": layer_sparsities(self._network)}
        return {"layer_sparsities": self._restored or self.layer_sparsities}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("layer_sparsities")
