"""Causal language modelling with any transformers ``AutoModelForCausalLM``: pretraining or full fine-tuning.

The quickstart pretrains a tiny LLaMA on the built-in corpus and writes it with ``save_pretrained`` so that
method recipes can start from it (``pretrained: artifacts/tiny_llama``). The written ``config.json`` and
``generation_config.json`` name the tokenizer's BOS/EOS/pad ids and the tokenizer's ``model_max_length`` is the
model's context, so that ``generate()`` and ``pipeline("text-generation")`` stop at the tokenizer's EOS.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from effitrain.lightning_modules.artifacts import is_local_reference, require_local_model
from effitrain.lightning_modules.base import TrainModule, adamw
from effitrain.methods.composition import refuse_packed_base
from effitrain.methods.task_metrics import generation_scores
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from typing_extensions import override

#: The quickstart's tiny LLaMA (5.5M parameters): widths are multiples of 128 so that group-wise
#: quantization with g = 64 or 128 divides every Linear.
TINY_LLAMA = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)


def load_causal_lm(pretrained: str | None, config: dict | None = None, trust_remote_code: bool = False,
                   dtype: str | None = None) -> PreTrainedModel:
    """A causal LM from a local folder or hub name (``from_pretrained``), or freshly initialised from a config
    dict (``model_type`` picks the architecture, LLaMA by default)."""
    if pretrained is None:
        config = dict(config or TINY_LLAMA)
        model_type = config.pop("model_type", "llama")
        cfg = LlamaConfig(**config) if model_type == "llama" else AutoConfig.for_model(model_type, **config)
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    if is_local_reference(pretrained):
        require_local_model(pretrained)
    try:
        return AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=trust_remote_code,
                                                    dtype=getattr(torch, dtype) if dtype else None)
    except OSError as err:
        raise ValueError(f"Could not load the model {pretrained!r}: it is not a local model folder and could not "
                         f"be fetched from the hub (no network, or no such model). ({err})") from None


def align_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's config and generation config name the tokenizer's BOS/EOS/pad ids (a fresh
    ``LlamaConfig`` says bos=1, eos=2, which are other tokens of a tokenizer trained here), and set the
    tokenizer's ``model_max_length`` to the model's context (``max_position_embeddings``)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a transformers model (also inside a peft wrapper) whose class it lists in
    ``_no_split_modules``: the decoder layers (``LlamaDecoderLayer``, ...)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class CausalLM(TrainModule):
    """Train a causal LM on batches of ``input_ids``/``labels`` (-100 = ignored).

    Args:
        pretrained: a local folder or hub name; ``None`` builds a fresh model from ``config``.
        config: config kwargs for a fresh model (``model_type`` + fields; default: the tiny LLaMA above).
        trust_remote_code: passed to transformers; off unless a config turns it on.
        dtype: load dtype for ``pretrained`` (e.g. ``bfloat16``); ``None`` keeps the checkpoint's default.
        gradient_checkpointing: trade compute for activation memory on large models.
        task_eval_size: with instruction data (a datamodule with ``generation_examples``), answer this many
            fixed held-out prompts greedily at every validation and log the data's task metric
            (``val/exact_match`` on the built-in arithmetic, ``val/rougeL`` on free text); 0 turns it off.
        task_max_new_tokens: the longest generated answer.
    """

    #: the task metric's settings change what is logged, not the model: a resume may change them
    run_args = TrainModule.run_args + ("task_eval_size", "task_max_new_tokens")

    def __init__(self, pretrained: str | None = None, config: dict[str, Any] | None = None,
                 trust_remote_code: bool = False, dtype: str | None = None, gradient_checkpointing: bool = False,
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None, overwrite_export: bool = False, task_eval_size: int = 32,
                 task_max_new_tokens: int = 24):
        super().__init__(optimizer, lr_scheduler, export_dir, overwrite_export)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = self.load_model(pretrained, config, trust_remote_code, dtype).train()  # from_pretrained gives eval()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.val_ppl = Perplexity(ignore_index=-100)
        self.val_loss = MeanMetric()
        self._batch_start = None
        if task_eval_size < 0 or task_max_new_tokens < 1:
            raise ValueError(f"task_eval_size must be >= 0 and task_max_new_tokens >= 1, got {task_eval_size} "
                             f"and {task_max_new_tokens}.")
        self.task_eval_size, self.task_max_new_tokens = task_eval_size, task_max_new_tokens

    def load_model(self, pretrained: str | None, config: dict[str, Any] | None, trust_remote_code: bool,
                   dtype: str | None) -> PreTrainedModel:
        """The model to train; a subclass that reads another format overrides this."""
        refuse_packed_base(pretrained, type(self).__name__)
        return load_causal_lm(pretrained, config, trust_remote_code, dtype)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        block_size = getattr(datamodule, "block_size", None) or getattr(datamodule, "max_length", None)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if block_size and context and block_size > context:
            raise ValueError(f"The data's sequence length ({block_size}) exceeds the model's context "
                             f"(max_position_embeddings={context}): lower `data.block_size`/`max_length`.")
        tokenizer = getattr(datamodule, "tokenizer", None)
        vocab = self.model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
                             "use the model's own tokenizer, or a matching `vocab_size`.")
        if tokenizer is not None:
            align_with_tokenizer(self.model, tokenizer)

    @override
    def shard_blocks(self) -> list[torch.nn.Module]:
        """The decoder layers: the classes transformers itself keeps whole (``_no_split_modules``)."""
        return decoder_blocks(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/tokens_per_s", tokens / (time.perf_counter() - self._batch_start))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(**batch)
        # Perplexity compares the prediction at t with the token at t+1, as the model's own loss does
        self.val_ppl.update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.val_loss.update(out.loss, weight=(batch["labels"][:, 1:] != -100).sum())
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        """The task metric on the fixed held-out prompts (every rank computes the same greedy answers)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(self, "task_eval_size", 0)  # 0 for subclasses that skip CausalLM.__init__
        if self.trainer.sanity_checking or not size or not hasattr(datamodule, "generation_examples"):
            return
        examples = datamodule.generation_examples(size)
        prompts, references = [p for p, _ in examples], [r for _, r in examples]
        scores = generation_scores(self.model, datamodule.tokenizer, prompts, references, datamodule.task_metric,
                                   self.task_max_new_tokens)
        self.log_dict({f"val/{name}": value for name, value in scores.items()}, prog_bar=True)

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir:
            self.save_tokenizer(f"{log_dir}/tokenizer")

    @override
    def save_export(self, folder: Path) -> None:
        """The model (safetensors) and the data's tokenizer, as a folder ``from_pretrained`` loads, with the
        model's BOS/EOS/pad ids and the tokenizer's context aligned (:func:`align_with_tokenizer`)."""
        tokenizer = self.data_tokenizer()
        if tokenizer is not None:
            align_with_tokenizer(self.model, tokenizer)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.save_tokenizer(folder)
