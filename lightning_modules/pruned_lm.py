"""Training-free pruning of a causal LM (Wanda, DSnoT, magnitude), evaluated by perplexity and exported.

Nothing is trained, so the recipe runs under ``validate``: the model is pruned once, on its device, at the
start of validation (``on_validation_start``), from the first ``calibration_samples`` sequences of the
data's training loader; validation then gives the pruned model's perplexity (``val/ppl``); at the end the
model is written to ``export_dir`` as a ``from_pretrained`` folder with the zeros in its weights, the pattern
summarised in ``config.json`` (``sparsity`` field) and the per-layer sparsities in ``sparsity.json``.

Run::

    python train.py fit --config configs/pretrain/quickstart.yaml       # artifacts/tiny_llama
    python train.py validate --config configs/wanda/wanda.yaml          # Wanda at 50%
    python train.py validate --config configs/wanda/dsnot.yaml          # Wanda + DSnoT at 50%
    python train.py validate --config configs/wanda/dsnot.yaml --model.init_args.sparsity=null \\
        --model.init_args.pattern=2:4                                   # N:M
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from effitrain.lightning_modules.causal_lm import CausalLM
from effitrain.lightning_modules.export import check_target
from effitrain.methods.blockwise_pruning import DSnoTSettings, prune_causal_lm, realized_sparsity
from effitrain.methods.sparsity import parse_pattern
from effitrain.methods.wanda import check_sparsity_target
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class PrunedCausalLM(CausalLM):
    """A causal LM pruned without training, then evaluated (``validate``) and exported.

    Args:
        method: ``wanda`` (|W|·‖X‖ per output row) or ``magnitude`` (|W|).
        sparsity: unstructured sparsity in [0, 1) (``null`` with a ``pattern``).
        pattern: N:M as ``"2:4"`` (``null``: unstructured).
        dsnot: refine the initial masks with DSnoT.
        max_cycle_time, update_threshold, dsnot_skip: DSnoT's settings (official: 50, 0.1, ``["mlp.*"]``).
        calibration_samples: sequences from the training loader for the statistics (official: 128).
        exclude: glob patterns of Linear names left dense.
        **kwargs: ``CausalLM`` arguments (``pretrained``, ``dtype``, ``export_dir``, ...).

    Raises:
        ValueError: a bad sparsity / pattern / method, ``calibration_samples < 1`` (at construction); an
            empty calibration set or a model with nothing to prune (before any weight changes); ``fit``.
    """

    #: nothing is trained: no optimizer, gradients or optimizer state (``benchmarks/paper_scale_plan.py``)
    training_free = True


    def __init__(self, method: Literal["wanda", "magnitude"] = "wanda", sparsity: float | None = 0.5,
                 pattern: str | None = None, dsnot: bool = False, max_cycle_time: int = 50,
                 update_threshold: float = 0.1, dsnot_skip: list[str] | None = None, calibration_samples: int = 128,
                 exclude: list[str] | None = None, **kwargs: Any):
        if method not in ("wanda", "magnitude"):
            raise ValueError(f"method must be 'wanda' or 'magnitude', got {method!r}.")
        self.pattern = parse_pattern(pattern) if pattern is not None else None
        check_sparsity_target(sparsity, self.pattern)
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}.")
        if max_cycle_time < 0 or update_threshold < 0:
            raise ValueError(f"max_cycle_time and update_threshold must be >= 0, got {max_cycle_time}, "
                             f"{update_threshold}.")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.method, self.sparsity, self.calibration_samples = method, sparsity, calibration_samples
        self.dsnot = DSnoTSettings(max_cycle_time, update_threshold,
                                   skip=tuple(["mlp.*"] if dsnot_skip is None else dsnot_skip)) if dsnot else None
        self.exclude = list(exclude or [])
        self.masks: dict[str, torch.Tensor] | None = None

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ValueError("PrunedCausalLM prunes without training: run `python train.py validate --config ...` "
                             "(fit would train the pruned weights away).")
        super().setup(stage)

    def calibration(self) -> list[torch.Tensor]:
        """The first ``calibration_samples`` sequences of the training loader (shuffled under the config's seed)."""
        if self.method == "magnitude" and self.dsnot is None:
            return []
        loader = self.trainer.datamodule.train_dataloader()
        batches, count = [], 0
        for batch in loader:
            ids = batch["input_ids"][: self.calibration_samples - count]
            batches.append(ids)
            count += ids.shape[0]
            if count >= self.calibration_samples:
                break
        return batches

    def prune(self, calibration: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            self.masks = prune_causal_lm(self.model, calibration, self.method, self.sparsity, self.pattern,
                                         self.dsnot, self.exclude)
        finally:
            self.model.train(was_training)
        rank_zero_info(f"PrunedCausalLM: {self.describe()} on {len(self.masks)} layers, "
                       f"sparsity {realized_sparsity(self.masks):.4f}")
        return self.masks

    def describe(self) -> str:
        target = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.sparsity:.0%}"
        return f"{self.method}{' + DSnoT' if self.dsnot else ''} at {target}"

    @override
    def on_validation_start(self) -> None:
        if self.masks is None:
            for folder, _ in self.exports():  # refuse another run's export before the pruning work
                check_target(folder, self.identity(), self.overwrite_export)
            self.prune(self.calibration())

    @override
    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.publish_exports()

    @override
    def save_export(self, folder: Path) -> None:
        """The pruned model as a ``from_pretrained`` folder (zeros in the weights), with the pattern recorded in
        ``config.json`` (``sparsity``) and per layer in ``sparsity.json``."""
        summary = {"method": self.method, "dsnot": self.dsnot is not None, "sparsity": self.sparsity,
                   "pattern": None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}",
                   "realized": realized_sparsity(self.masks or {})}
        self.model.config.sparsity = summary
        super().save_export(folder)
        layers = {name: 1.0 - float(m.float().mean()) for name, m in (self.masks or {}).items()}
        Path(folder, "sparsity.json").write_text(json.dumps({**summary, "layers": layers}, indent=1))
