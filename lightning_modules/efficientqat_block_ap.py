"""EfficientQAT phase 1, Block-AP (Chen et al., arXiv 2407.11062, Sec. 3.2): block-wise training of all
parameters of each decoder block, then packing to low-bit ``QuantLinear`` layers.

    python train.py fit --config configs/efficientqat/efficientqat_block_ap.yaml      # then configs/efficientqat/efficientqat_e2e_qp.yaml

How the Lightning loop maps onto the method:

* At the start of training the first ``trainer.limit_train_batches`` batches of the datamodule's training
  loader (the calibration set, ``n`` samples) are embedded once into two CPU caches (``methods/block_ap.py``).
* Each block trains for ``epochs_per_block`` Lightning epochs; one epoch is one pass over the caches in a
  fixed order (batch ``i`` of an epoch is cache rows ``i*B .. i*B+B-1``; the tokens of the loader's batch are
  not used again). ``max_epochs`` is set to ``num_blocks * epochs_per_block``.
* Each block gets a fresh AdamW with two groups (``quant_lr`` for s and z, ``weight_lr`` for the weights) and a
  cosine decay to lr / ``min_lr_factor`` over its steps; the block is packed when its epochs end and the
  quantized cache is pushed through it.
* Only the current block sits on the accelerator; the rest of the model stays on CPU.

Block-AP is single-device (the official code is too); the written folder holds packed weights, the tokenizer
and ``block_ap_stats.json`` (per block: MSE at min/max init, i.e. round-to-nearest, and after training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from effitrain.callbacks.progress import stage_progress
from effitrain.lightning_modules.base import TrainModule
from effitrain.lightning_modules.causal_lm import load_causal_lm
from effitrain.lightning_modules.schedules import WarmupCosine
from effitrain.methods.block_ap import (
    ActivationCache,
    block_mse,
    block_output,
    capture_block_inputs,
    finalize_block,
    move_kwargs,
    propagate,
    trainable_groups,
    wrap_block,
)
from effitrain.methods.composition import (
    SPARSITY_FILE,
    check_pattern_fits_groups,
    refuse_packed_base,
    sparsity_summary,
    zero_fraction,
)
from effitrain.methods.gptq_format import save_quantized
from effitrain.methods.quant_surgery import decoder_blocks, named_linears, quantize_block_rtn
from effitrain.methods.quantization import SUPPORTED_BITS, QuantLinear, resolve_group_size
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


def adamw_no_decay(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, weight_decay=0.0)


class EfficientQATBlockAP(TrainModule):
    """Block-AP on a causal LM, exporting a packed low-bit model.

    Args:
        pretrained: the full-precision model folder (or hub name).
        bits: code width N in {2, 3, 4, 8}.
        group_size: input channels per quantization group (-1: whole rows).
        epochs_per_block: passes over the calibration set per block (paper: 2).
        quant_lr: learning rate of step sizes and zero points (paper: 1e-4).
        weight_lr: learning rate of the block's weights; ``None`` gives the paper's 2e-5 at 2-bit, 1e-5 else.
        min_lr_factor: each block's cosine schedule ends at lr / min_lr_factor (paper: 20).
        cache_dtype: storage dtype of the activation caches (``float16`` as the official code).
        cache_dir: memory-map the caches to files in this folder instead of RAM (for large models).
        optimizer: called with the two parameter groups of each block (default AdamW, weight decay 0).
        export_dir: where the packed model is written.
        keep_mask: the pretrained model is pruned (Wanda / DSnoT): keep its zeros exactly zero through training
            and packing (each pruned code is its group's zero point, ``effitrain.methods.composition``); the
            written folder gets the ``sparsity.json`` of the pruned model with the sparsity after packing.
    """

    sharding_refusal = (
        "Block-AP trains one decoder block at a time with its own optimizer swapped into the strategy and keeps "
        "the block inputs in memory; a sharded root would all-gather the whole model for every block. It needs "
        "one block and its calibration activations on one device: run it on a single device.")
    export_kind = "packed"  # the run summary's name for export_dir

    def __init__(self, pretrained: str, bits: int = 2, group_size: int = 64, epochs_per_block: int = 2,
                 quant_lr: float = 1e-4, weight_lr: float | None = None, min_lr_factor: float = 20.0,
                 cache_dtype: str = "float16", cache_dir: str | None = None,
                 optimizer: OptimizerCallable = adamw_no_decay, export_dir: str | None = None,
                 overwrite_export: bool = False, keep_mask: bool = False):
        super().__init__(optimizer, None, export_dir, overwrite_export)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}.")
        if epochs_per_block < 1:
            raise ValueError(f"epochs_per_block must be >= 1 (got {epochs_per_block}); for round-to-nearest use "
                             "effitrain.methods.quant_surgery.quantize_model_rtn.")
        if min_lr_factor < 1:
            raise ValueError(f"min_lr_factor must be >= 1, got {min_lr_factor}.")
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.bits, self.group_size, self.epochs_per_block = bits, group_size, epochs_per_block
        self.quant_lr = quant_lr
        self.weight_lr = weight_lr if weight_lr is not None else (2e-5 if bits == 2 else 1e-5)
        self.min_lr_factor = min_lr_factor
        self.cache_dtype = getattr(torch, cache_dtype)
        self.cache_dir = cache_dir
        # The model is kept out of the module's children so that Lightning does not move it to the
        # accelerator: only the block being trained goes there.
        refuse_packed_base(pretrained, "Block-AP")
        self.__dict__["lm"] = load_causal_lm(pretrained).float().eval()
        self.lm.requires_grad_(False)
        self.__dict__["blocks"] = decoder_blocks(self.lm)
        hidden = self.lm.config.hidden_size
        for name, module in named_linears(self.blocks):
            if module.in_features % resolve_group_size(group_size, module.in_features):
                raise ValueError(f"group_size={group_size} does not divide in_features={module.in_features} "
                                 f"of {name}: choose a divisor of the hidden ({hidden}) and MLP widths.")
        self.keep_mask = keep_mask
        self.sparsity = self._check_mask(pretrained) if keep_mask else None
        self.block_stats: list[dict[str, Any]] = []
        self.current = -1  # index of the block being trained
        self._done = 0     # number of blocks packed
        self.block_optimizer = self.block_scheduler = None
        self._resume_blocks: dict[str, Any] | None = None

    def _check_mask(self, pretrained: str) -> dict[str, Any]:
        """The pruned model's summary; fails when there is no mask to keep or its N:M blocks straddle groups."""
        layers = dict(named_linears(self.blocks))
        zeros = zero_fraction([m.weight for m in layers.values()])
        summary = sparsity_summary(pretrained) or {}
        if zeros == 0:
            raise ValueError(f"keep_mask=True but the Linear weights of {pretrained} have no zeros: prune it first "
                             "(configs/compose/sparse_wanda50.yaml) or set keep_mask=False.")
        check_pattern_fits_groups(summary.get("pattern"), self.group_size,
                                  {name: m.in_features for name, m in layers.items()})
        return {**summary, "pruned_block_sparsity": zeros}

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.trainer.world_size > 1:
            raise ValueError("Block-AP trains one block at a time on one device: run it with devices: 1.")
        if self.trainer.precision == "16-mixed":
            raise ValueError("Block-AP supports 32-true and bf16-mixed precision, not 16-mixed (no GradScaler "
                             "across per-block optimizers).")
        datamodule = self.trainer.datamodule
        context = self.lm.config.max_position_embeddings
        if getattr(datamodule, "block_size", 0) > context:
            raise ValueError(f"data.block_size ({datamodule.block_size}) exceeds the model's context ({context}).")
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.lm.get_input_embeddings().num_embeddings:
            raise ValueError("The data's tokenizer is larger than the model's vocabulary: give the model's own "
                             "tokenizer (data.tokenizer: <the pretrained folder>).")
        self.trainer.fit_loop.max_epochs = len(self.blocks) * self.epochs_per_block

    def configure_optimizers(self):
        # Each block gets its own optimizer (_start_block), handed to the strategy so that Lightning counts
        # its steps; this one, with the same two groups, only stands in until block 0 starts.
        placeholders = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
        return self.optimizer_factory([{"params": [placeholders[0]], "lr": self.quant_lr},
                                       {"params": [placeholders[1]], "lr": self.weight_lr}])

    @override
    def on_train_start(self) -> None:
        """Embed the calibration set into the two caches (equal at block 0); on resume, rebuild them up to the
        block of the checkpoint and continue that block where it stopped."""
        batches = self.trainer.num_training_batches
        loader = self.trainer.datamodule.train_dataloader()
        first = next(iter(loader))["input_ids"]
        self.batch_size, seq_len = first.shape
        n = batches * self.batch_size
        hidden = self.lm.config.hidden_size
        paths = [None, None]
        if self.cache_dir:
            paths = [Path(self.cache_dir) / "fp_inputs.bin", Path(self.cache_dir) / "quant_inputs.bin"]
        self.fp_cache = ActivationCache(n, seq_len, hidden, self.cache_dtype, paths[0])
        self.quant_cache = ActivationCache(n, seq_len, hidden, self.cache_dtype, paths[1])

        def calibration():
            for i, batch in enumerate(stage_progress(loader, "Block-AP calibration", total=batches, trainer=self.trainer)):
                if i == batches:
                    return
                yield batch["input_ids"]

        self.block_kwargs = capture_block_inputs(self.lm, calibration(), self.fp_cache)
        self.quant_cache.copy_from(self.fp_cache)
        if self._resume_blocks is not None:
            self._replay(self._resume_blocks)
            self._resume_blocks = None
        super().on_train_start()  # the random states of a resumed run
        rank_zero_info(f"Block-AP: {n} calibration samples x {seq_len} tokens, {len(self.blocks)} blocks, "
                       f"w{self.bits}g{self.group_size}; caches {2 * self.fp_cache.nbytes() / 2**20:.1f} MiB "
                       f"({'disk: ' + str(self.cache_dir) if self.cache_dir else 'CPU memory'}).")

    # -- per-block state ----------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32

    def _kwargs(self) -> dict:
        return move_kwargs(self.block_kwargs, self.device, self.compute_dtype)

    def _start_block(self, index: int) -> None:
        self.current = index
        block = self.blocks[index].to(self.device)
        # Target: the FP block's output on the FP chain (the fp cache becomes block index+1's FP input).
        propagate(block, self.fp_cache, self._kwargs(), self.batch_size, self.device, self.compute_dtype)
        wrap_block(block, self.bits, self.group_size, keep_zeros=self.keep_mask)
        rtn = block_mse(block, self.quant_cache, self.fp_cache, self._kwargs(), self.batch_size, self.device,
                        self.compute_dtype)
        quant, weights = trainable_groups(block)
        self.block_optimizer = self.optimizer_factory([
            {"params": quant, "lr": self.quant_lr},
            {"params": weights, "lr": self.weight_lr},
        ])
        total = max(1, self.epochs_per_block * self.trainer.num_training_batches)
        self.block_scheduler = WarmupCosine(self.block_optimizer, total_steps=total,
                                            min_lr_ratio=1.0 / self.min_lr_factor)
        self.trainer.strategy.optimizers = [self.block_optimizer]
        self.block_stats.append({"block": index, "rtn_mse": rtn, "train_steps": 0})

    def _finish_block(self) -> None:
        block = self.blocks[self.current]
        finalize_block(block)
        stats = self.block_stats[-1]
        stats["block_ap_mse"] = block_mse(block, self.quant_cache, self.fp_cache, self._kwargs(), self.batch_size,
                                          self.device, self.compute_dtype)
        # The next block's input on the quantized chain.
        propagate(block, self.quant_cache, self._kwargs(), self.batch_size, self.device, self.compute_dtype)
        self.blocks[self.current] = block.to("cpu")
        self.block_optimizer = self.block_scheduler = None
        self._done = self.current + 1
        self.log_dict({"block/rtn_mse": stats["rtn_mse"], "block/block_ap_mse": stats["block_ap_mse"]})
        rank_zero_info(f"Block-AP block {self.current + 1}/{len(self.blocks)}: MSE {stats['rtn_mse']:.4g} (RTN) -> "
                       f"{stats['block_ap_mse']:.4g} after {stats['train_steps']} steps")

    # -- checkpoints --------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The model is no child of the module (state_dict is empty): the blocks trained so far, packed or
        still training, and the block's own optimizer and schedule go under ``block_ap``."""
        checkpoint["block_ap"] = {
            "current": self.current, "done": self._done, "stats": self.block_stats,
            "blocks": {str(i): {k: v.detach().cpu().clone() for k, v in self.blocks[i].state_dict().items()}
                       for i in range(max(self.current + 1, self._done))},
            "optimizer": self.block_optimizer.state_dict() if self.block_optimizer is not None else None,
            "scheduler": self.block_scheduler.state_dict() if self.block_scheduler is not None else None,
        }
        checkpoint["optimizer_states"] = []  # the placeholder of configure_optimizers holds nothing to restore
        super().on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resume_blocks = checkpoint.get("block_ap")

    def _replay(self, state: dict[str, Any]) -> None:
        """Bring the caches and blocks to the checkpoint's point as the uninterrupted run had them: the packed
        blocks before ``current`` are loaded and pushed through (FP chain with the original weights, quantized
        chain with the packed ones); ``current`` restarts and takes its trained tensors, optimizer and schedule."""
        self.block_stats = list(state["stats"])
        for index in range(state["done"]):
            block = self.blocks[index].to(self.device)
            propagate(block, self.fp_cache, self._kwargs(), self.batch_size, self.device, self.compute_dtype)
            wrap_block(block, self.bits, self.group_size, keep_zeros=self.keep_mask)
            finalize_block(block)
            block.load_state_dict(state["blocks"][str(index)])
            propagate(block, self.quant_cache, self._kwargs(), self.batch_size, self.device, self.compute_dtype)
            self.blocks[index] = block.to("cpu")
        self._done = state["done"]
        if state["current"] >= state["done"]:
            stats = self.block_stats.pop()
            self._start_block(state["current"])
            self.blocks[self.current].load_state_dict(state["blocks"][str(self.current)])
            self.block_optimizer.load_state_dict(state["optimizer"])
            self.block_scheduler.load_state_dict(state["scheduler"])
            self.block_stats[-1] = stats
        self.current = state["current"]

    # -- the loop -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        index = self.current_epoch // self.epochs_per_block
        if index != self.current:
            self._start_block(index)
        rows = slice(batch_idx * self.batch_size, (batch_idx + 1) * self.batch_size)
        block = self.blocks[index]
        inputs = self.quant_cache.get(rows, self.device, self.compute_dtype)
        target = self.fp_cache.get(rows, self.device, self.compute_dtype)
        loss = torch.nn.functional.mse_loss(block_output(block(inputs, **self._kwargs())), target)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.block_scheduler.step()
        self.block_stats[-1]["train_steps"] += 1
        self.log("train/loss", loss, prog_bar=True)
        self.log("block", float(index + 1), prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if (self.current_epoch + 1) % self.epochs_per_block == 0 and self.current >= self._done:
            self._finish_block()

    def on_train_end(self) -> None:
        """Pack a block left unfinished and fall back to round-to-nearest for blocks never reached (a run
        stopped early by ``max_steps``), so that the written model is always complete."""
        if self.current >= self._done:
            self._finish_block()
        for index in range(self._done, len(self.blocks)):
            quantize_block_rtn(self.blocks[index], self.bits, self.group_size)
            self.block_stats.append({"block": index, "rtn_only": True})
        self._done = len(self.blocks)

    @override
    def save_export(self, folder: Path) -> None:
        """The packed model (``save_quantized``), the data's tokenizer and the per-block statistics."""
        save_quantized(self.lm, folder, self.bits, self.group_size)
        self.save_tokenizer(folder)
        (Path(folder) / "block_ap_stats.json").write_text(json.dumps(self.block_stats, indent=1))
        if self.keep_mask:
            kept = zero_fraction([m.dequantize(torch.float32) for m in self.lm.modules() if isinstance(m, QuantLinear)])
            (Path(folder) / SPARSITY_FILE).write_text(json.dumps(
                {**self.sparsity, "quantized_block_sparsity": kept, "kept_through": ["block_ap"]}, indent=1))
