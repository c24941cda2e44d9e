"""Measure forgetting while fine-tuning: held-out loss / perplexity on the *pretraining* domain and the
relative distance of the weights from where fine-tuning started, ‖θ − θ0‖ / ‖θ0‖.

MoFO (arXiv 2407.20999, Sec. 1 and 4) argues that fine-tuning forgets less when θ stays close to the
pretrained θ0; this callback logs both sides of that claim during any fine-tuning run:

    trainer:
      callbacks:
        - class_path: effitrain.callbacks.forgetting_monitor.ForgettingMonitor
          init_args:
            reference_data:            # any LightningDataModule; its val_dataloader() is used
              class_path: effitrain.datamodules.text.TextDataModule
              init_args: {source: builtin, tokenizer: artifacts/tiny_llama, block_size: 128}
            every_n_steps: 50
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from effitrain.callbacks.strategy_checks import refuse_sharded
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity
from typing_extensions import override


def _lora_deltas(module: nn.Module) -> dict[str, torch.Tensor]:
    """ΔW of every peft LoRA-style layer (anything with ``get_delta_weight`` and ``active_adapters``), keyed
    by the name of the base weight it adds to, so adapters count as the merged weights they stand for."""
    deltas = {}
    for name, sub in module.named_modules():
        if hasattr(sub, "get_delta_weight") and hasattr(sub, "active_adapters") and hasattr(sub, "base_layer"):
            delta = None
            for adapter in sub.active_adapters:
                if adapter in getattr(sub, "lora_A", {}):
                    d = sub.get_delta_weight(adapter).float()
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{name}.base_layer.weight"] = delta
    return deltas


class ForgettingMonitor(Callback):
    """Logs ``forgetting/loss``, ``forgetting/ppl`` (held-out pretraining-domain data) and
    ``forgetting/rel_dist`` (‖θ − θ0‖ / ‖θ0‖ over the model's weights, LoRA adapters counted as their
    merged ΔW) at the start of training, every ``every_n_steps`` optimizer steps, and at the end.

    Works with any LightningModule: a batch is fed as ``pl_module(**batch)`` (dict batches) or
    ``pl_module(batch)``; when the output has ``logits`` and the batch ``labels``, token-level
    perplexity comes from ``torchmetrics.text.Perplexity`` (next-token, ``-100`` ignored); otherwise
    the output's ``loss`` (or the output itself, a scalar) is averaged and ppl = exp(loss). Every rank
    evaluates the same batches (no collectives). The results are also kept in ``history``.

    θ0 (an fp32 copy of the weights that can move) is written once to a safetensors file and read back one
    tensor at a time when measuring, so it costs no memory between measurements and checkpoints hold only
    its path (at 7B the copy is ~28 GB: every checkpoint would otherwise carry it). A resumed run finds it
    there and keeps measuring from the original θ0.

    Args:
        reference_data: held-out data of the pretraining domain: a LightningDataModule (its
            ``val_dataloader()``) or a DataLoader.
        every_n_steps: evaluation interval in optimizer steps (0: only at start and end).
        max_batches: batches per evaluation (``None``: the whole loader).
        track_distance: keep θ0 (one fp32 copy of the trainable weights, on disk) and log the relative distance.
        reference_path: the safetensors file of θ0 (``None``: ``<default_root_dir>/forgetting_theta0.safetensors``).

    Raises:
        ValueError: on a negative interval or a non-positive ``max_batches``; when the data gives no batch;
            with ``track_distance`` under a sharded strategy (FSDP2, FSDP, DeepSpeed), at ``setup``.
        FileNotFoundError: a resumed run whose θ0 file is gone.
    """

    def __init__(self, reference_data: L.LightningDataModule | DataLoader, every_n_steps: int = 50,
                 max_batches: int | None = 16, track_distance: bool = True,
                 reference_path: str | None = None) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at start and end), got {every_n_steps}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None (all batches), got {max_batches}")
        self.reference_data, self.every_n_steps = reference_data, every_n_steps
        self.max_batches, self.track_distance, self.reference_path = max_batches, track_distance, reference_path
        self.history: list[dict[str, float]] = []
        self._theta0: dict[str, torch.Tensor] | str | None = None  # in memory, or the path of its file
        self._theta0_norm: float | None = None
        self._loader: DataLoader | None = None
        self._last_step = -1

    # ------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.track_distance:
            refuse_sharded(trainer, "ForgettingMonitor(track_distance=True)",
                           "θ0 is copied from whole weights on each rank, and a sharded strategy splits them. Set "
                           "`track_distance: false` to log the reference loss only, or use DDP.")
        if stage != "fit" or self._loader is not None:
            return
        data = self.reference_data
        if isinstance(data, L.LightningDataModule):
            data.prepare_data()
            data.setup("validate")
            self._loader = data.val_dataloader()
        else:
            self._loader = data

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.track_distance and self._theta0 is None:  # not restored from a checkpoint
            theta0, self._theta0_norm = self._snapshot(pl_module)
            path = self.reference_path or os.path.join(trainer.default_root_dir, "forgetting_theta0.safetensors")
            if trainer.is_global_zero:  # every rank holds the same weights: one writer
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                save_file({n: t.cpu().contiguous() for n, t in theta0.items()}, path)
            trainer.strategy.barrier("forgetting_theta0")
            self._theta0 = path
        elif isinstance(self._theta0, str) and not os.path.exists(self._theta0):
            raise FileNotFoundError(f"ForgettingMonitor: the θ0 file {self._theta0} of the resumed run is gone; it "
                                    "is written once at the start of the original run (see `reference_path`).")
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)
        if self.history:
            last = self.history[-1]
            rank_zero_info("ForgettingMonitor: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()))

    # ---------------------------------------------------------------------------------------- measure
    @staticmethod
    def _weights(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The weights θ stands for: every parameter that is not itself an adapter factor."""
        return {n: p for n, p in pl_module.named_parameters() if "lora_" not in n}

    def _snapshot(self, pl_module: L.LightningModule) -> tuple[dict[str, torch.Tensor], float]:
        weights = self._weights(pl_module)
        norm = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in weights.values()))
        lora = _lora_deltas(pl_module)
        # only weights that can move need a copy; LoRA-wrapped weights move by their ΔW
        theta0 = {n: p.detach().float().clone() for n, p in weights.items() if p.requires_grad and n not in lora}
        return theta0, norm

    @torch.no_grad()
    def relative_distance(self, pl_module: L.LightningModule) -> float:
        """‖θ − θ0‖ / ‖θ0‖ with θ the current (merged) weights."""
        if self._theta0 is None or not self._theta0_norm:
            return float("nan")
        weights = self._weights(pl_module)
        sq = 0.0
        for n, p0 in self._reference_tensors():
            sq += float((weights[n].detach().float() - p0.to(weights[n].device)).pow(2).sum())
        for delta in _lora_deltas(pl_module).values():
            sq += float(delta.pow(2).sum())
        return math.sqrt(sq) / self._theta0_norm

    def _reference_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """θ0 one tensor at a time (from its file, memory-mapped by safetensors)."""
        if isinstance(self._theta0, dict):
            yield from self._theta0.items()
            return
        with safe_open(self._theta0, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is no dict
                yield name, f.get_tensor(name)

    @torch.no_grad()
    def reference_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, float]:
        """(mean token loss, perplexity) on the reference data."""
        if self._loader is None:
            raise RuntimeError("ForgettingMonitor has no reference data yet: it is set up at the start of fit.")
        ppl = Perplexity(ignore_index=-100, sync_on_compute=False).to(pl_module.device)
        mean = MeanMetric(sync_on_compute=False).to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        seen = 0
        try:
            for i, batch in enumerate(self._loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                with trainer.precision_plugin.forward_context():
                    out = pl_module(**batch) if isinstance(batch, dict) else pl_module(batch)
                logits = getattr(out, "logits", None)
                if logits is not None and isinstance(batch, dict) and "labels" in batch:
                    ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])
                else:
                    loss = getattr(out, "loss", out)
                    mean.update(loss.float())
                seen += 1
        finally:
            pl_module.train(was_training)
        if seen == 0:
            raise ValueError("ForgettingMonitor's reference data gave no batch: check `reference_data`.")
        if ppl.update_count:
            value = float(ppl.compute())
            return math.log(value), value
        loss = float(mean.compute())
        return loss, math.exp(loss)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss, ppl = self.reference_loss(trainer, pl_module)
        record = {"step": float(trainer.global_step), "forgetting/loss": loss, "forgetting/ppl": ppl}
        if self.track_distance:
            record["forgetting/rel_dist"] = self.relative_distance(pl_module)
        self.history.append(record)
        self._last_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=trainer.global_step)

    # ----------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        # the path of θ0's file, not the tensors (a copy of the model in every checkpoint)
        theta0 = self._theta0 if isinstance(self._theta0, str) or self._theta0 is None else dict(self._theta0)
        return {"history": list(self.history), "theta0": theta0, "theta0_norm": self._theta0_norm,
                "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._theta0, self._theta0_norm = state_dict["theta0"], state_dict["theta0_norm"]
        self._last_step = state_dict["last_step"]
