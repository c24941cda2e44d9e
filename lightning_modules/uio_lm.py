"""UIO-LLMs recipe: train a memory-enhanced LM with unbiased incremental TBPTT (arXiv 2406.18173, §3.3, App. B).

Manual optimisation, one optimiser step per batch of sequences:

1. per segment t: decoder on x_t with the memory leaves m̃_1..m̃_{t-1} → J_t; backward J_t (fresh leaf gradients
   scaled by max(1, (t-1)/S) when ``compensate``); encode x_t → m_t; reservoir insert, flushing the graph it
   evicts (``effitrain.methods.incremental_tbptt``);
2. flush the graphs still alive; one all-reduce (mean) of the trainable gradients across ranks;
3. clip the global norm, optimiser step, scheduler step.

No backward ever triggers a DDP gradient sync (``require_backward_grad_sync`` stays off), so ranks whose
sequences have different numbers of segments make the same single collective per step and cannot hang.

Run: ``python train.py fit --config configs/uio/uio_passkey.yaml`` (the tiny quickstart LM, minutes on CPU);
``configs/uio/full/uio_llama2_7b_32x.yaml`` has the paper's settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from effitrain.lightning_modules.base import TrainModule, adamw
from effitrain.lightning_modules.causal_lm import load_causal_lm
from effitrain.methods.incremental_tbptt import IncrementalTBPTT
from effitrain.methods.reservoir import RecencyWindow, ReservoirSampler
from effitrain.models.memory_lm import MemoryLM, MemoryMode
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override


class UIOLM(TrainModule):
    """Memory LM (``effitrain.models.memory_lm.MemoryLM``) trained with (unbiased) incremental TBPTT.

    Args:
        pretrained: the frozen base (a local folder or hub name); ``None`` builds one from ``config``.
        config: config kwargs for a fresh base (tests); ``dtype``: load dtype of ``pretrained`` (e.g. bfloat16).
        segment_length, num_memory_tokens: l and m (compression l/m: 1024/32 = 32x in the paper).
        encoder_rank, encoder_alpha, transfer_rank, transfer_alpha, lora_dropout: the two LoRAs (r=128, α=512).
        window: S, encoder graphs kept alive (2 in the paper).
        sampler: ``reservoir`` (UIO, unbiased with ``compensate``) or ``recency`` (plain TBPTT, Eq. 6).
        compensate: scale fresh memory gradients by max(1, (t-1)/S) (App. B; the released code omits it).
        clip_grad_norm: global gradient-norm clip (1.0); ``None`` turns it off.
        eval_memory: memory modes evaluated in validation: ``on``, ``zero`` (zeroed states), ``off``.
        seed: the reservoir generator's seed (offset by the rank); its state is saved in checkpoints.

    Raises:
        ValueError: on an unknown ``sampler``/``eval_memory``, on fp16 precision (the loss scaler would scale the
            encoder flush twice), or when the data's longest sequence exceeds the model's context budget.
    """

    sharding_refusal = (
        "incremental TBPTT runs one backward per segment plus one per flushed encoder graph, and FSDP2 "
        "reduce-scatters gradients in every backward, so ranks whose sequences have different numbers of "
        "segments would make different numbers of collectives (a hang). The trainable tensors are LoRAs and one "
        "embedding (2% of the model): use DDP (configs/trainer/ddp.yaml), whose single all-reduce per step the "
        "recipe controls.")
    checkpoint_trainable_only = True  # the frozen base comes from `pretrained`

    def __init__(self, pretrained: str | None = "artifacts/tiny_llama", config: dict[str, Any] | None = None,
                 dtype: str | None = None, segment_length: int = 1024, num_memory_tokens: int = 32,
                 encoder_rank: int = 128, encoder_alpha: float = 512, transfer_rank: int = 128,
                 transfer_alpha: float = 512, lora_dropout: float = 0.0, window: int = 2,
                 sampler: Literal["reservoir", "recency"] = "reservoir", compensate: bool = True,
                 clip_grad_norm: float | None = 1.0, eval_memory: list[MemoryMode] | None = None, seed: int = 0,
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False):
        super().__init__(optimizer, lr_scheduler, export_dir, overwrite_export)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if sampler not in ("reservoir", "recency"):
            raise ValueError(f"sampler must be 'reservoir' (UIO) or 'recency' (plain TBPTT), got {sampler!r}.")
        self.eval_memory = list(eval_memory or ["on", "zero"])
        if not set(self.eval_memory) <= {"on", "zero", "off"}:
            raise ValueError(f"eval_memory entries must be 'on', 'zero' or 'off', got {self.eval_memory}.")
        self.automatic_optimization = False
        base = load_causal_lm(pretrained, config, dtype=dtype)
        self.model = MemoryLM.from_base(base, segment_length, num_memory_tokens, encoder_rank, encoder_alpha,
                                        transfer_rank, transfer_alpha, lora_dropout)
        self.sampler_name, self.window, self.seed, self.clip_grad_norm = sampler, window, seed, clip_grad_norm
        self.tbptt = IncrementalTBPTT(self._policy(0), compensate=compensate, backward=self.manual_backward)

    def _policy(self, rank: int) -> RecencyWindow:
        if self.sampler_name == "recency":
            return RecencyWindow(self.window)
        return ReservoirSampler(self.window, seed=self.seed + rank)

    def param_groups(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every trainable tensor (the LoRAs and the memory embedding) with the optimizer's weight decay, as the
        official run's single AdamW group (wd 0.1 on the memory embedding too)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        if self.trainer.global_rank:  # independent reservoir draws per rank
            self.tbptt.policy = self._policy(self.trainer.global_rank)
        datamodule = getattr(self.trainer, "datamodule", None)
        longest = getattr(datamodule, "max_length", None)
        if longest:
            self.model.check_context(longest)
        tokenizer = getattr(datamodule, "tokenizer", None)
        vocab = self.model.base.get_input_embeddings().num_embeddings
        if tokenizer is not None and not isinstance(tokenizer, str) and len(tokenizer) > vocab:
            raise ValueError(f"The data's tokenizer has {len(tokenizer)} tokens but the base model's embedding only "
                             f"{vocab}: give the base model's own tokenizer (`data.init_args.tokenizer: "
                             f"{self.hparams.get('pretrained')}`).")
        train_length = getattr(datamodule, "train_length", None) or getattr(datamodule, "seq_length", None)
        if stage == "fit" and train_length and train_length <= self.model.segment_length:
            raise ValueError(f"segment_length={self.model.segment_length} is not shorter than the training sequences "
                             f"({train_length} tokens): every sequence is one segment and the memory is never used. "
                             "Lower `model.init_args.segment_length` or raise the data's training length.")

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # fp32 master weights for the trainable tensors whatever the precision (`bf16-true` casts the whole
        # module): a bf16 LoRA would round lr·update ≈ 1e-4·|w| away, and AdamW's state follows the parameter's
        # dtype. The model casts LoRA inputs and the memory embedding to the compute dtype itself, so the
        # frozen base stays bf16. The optimizer holds these same Parameter objects; its state starts at step 1.
        for param in self.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if str(self.trainer.precision).startswith("16"):
            raise ValueError("UIOLM does not support fp16 (`16-mixed`): the loss scaler would scale the encoder "
                             "flush twice. Use `precision: bf16-mixed`/`bf16-true` (as the paper) or `32-true`.")

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._disable_ddp_sync()

    def _disable_ddp_sync(self) -> None:
        # Every backward stays local; gradients are averaged once in `_all_reduce_gradients`.
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        self._disable_ddp_sync()
        optimizer = self.optimizers()
        loss = self.model.incremental_backward(batch["input_ids"], batch["labels"], self.tbptt)
        self._all_reduce_gradients()
        if self.clip_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens_per_s", batch["input_ids"].numel() / (time.perf_counter() - start))
        return loss

    def _all_reduce_gradients(self) -> None:
        """Average the trainable gradients over ranks with one collective (missing gradients count as zero)."""
        if self.trainer.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        for param, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = grad.view_as(param).to(param.dtype)

    # ---------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        ids = batch["input_ids"]
        targets = MemoryLM.shifted_targets(batch["labels"])
        labelled = targets != -100
        length = ids.shape[1]
        for mode in self.eval_memory:
            logits = self.model(ids, memory=mode)
            loss = torch.nn.functional.cross_entropy(logits[labelled].float(), targets[labelled])
            hits = logits.argmax(-1) == targets
            exact = (hits | ~labelled).all(dim=1).float().mean()
            kwargs = dict(batch_size=ids.shape[0], add_dataloader_idx=False)
            self.log(f"val/acc_{mode}@{length}", exact, **kwargs)
            self.log(f"val/token_acc_{mode}@{length}", hits[labelled].float().mean(), **kwargs)
            self.log(f"val/loss_{mode}@{length}", loss, **kwargs)
            if mode == self.eval_memory[0] and dataloader_idx == 0:
                self.log("val/loss", loss, prog_bar=True, **kwargs)

    # ------------------------------------------------------------------------------- checkpoints, export
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["uio_policy"] = self._gather_policy_states()
        super().on_save_checkpoint(checkpoint)  # trainable tensors only, identity, checksum

    def _gather_policy_states(self) -> list[dict[str, Any]]:
        state = self.tbptt.policy.state_dict()
        if "rng_state" not in state or self._trainer is None or self.trainer.world_size == 1:
            return [state]
        gathered = self.all_gather(state["rng_state"].to(self.device))  # [world, n]: every rank's generator
        return [{"rng_state": s.cpu()} for s in gathered]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("uio_policy")
        if states:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self.tbptt.policy.load_state_dict(states[rank % len(states)])

    @override
    def save_export(self, folder: Path) -> None:
        """The memory model as a transformers folder (``MemoryLM.save_pretrained``: config.json with the base's
        config, the weights) plus the data's tokenizer; ``AutoModel.from_pretrained`` loads it after
        ``import effitrain.models``."""
        self.model.save_pretrained(folder)
        self.save_tokenizer(folder)
