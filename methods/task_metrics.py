"""Task metrics for instruction-tuned causal LMs: greedy answers to held-out prompts, scored against references.

``exact_match`` for tasks with one right answer (the built-in arithmetic: ``"37 + 58 = 95."``), ROUGE-L
F-measure (torchmetrics) for free text. ``generation_scores`` is the one entry point recipes use::

    from effitrain.methods.task_metrics import generation_scores

    scores = generation_scores(model, tokenizer, prompts, references, metric="exact_match")
    # {"exact_match": 0.41}

Plain PyTorch + transformers' ``generate`` (any ``PreTrainedModel`` or peft ``PeftModel``); nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics.functional.text import rouge_score

TaskMetric = Literal["exact_match", "rougeL"]


def normalize(text: str) -> str:
    """Whitespace-insensitive form of an answer (leading/trailing space dropped, inner runs collapsed)."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize` (0 for no example)."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references.")
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words; torchmetrics' ``rouge_score``)."""
    if not references:
        return 0.0
    return float(rouge_score(list(predictions), list(references), rouge_keys="rougeL")["rougeL_fmeasure"])


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int,
                         max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, left-padded into one batch so that every row continues
    from its last prompt token (the attention mask keeps the padding out), each cut at its first EOS."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids))
        mask[row, width - len(ids):] = 1
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    finally:
        model.train(was_training)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in out[:, width:].tolist()]


def greedy_generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24,
                    batch_size: int = 32) -> list[str]:
    """The greedy continuation of each prompt up to EOS or ``max_new_tokens``, decoded without the prompt.

    Prompts are tokenized as the instruction data tokenizes them (no special tokens).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        for row in greedy_continuations(model, encoded, pad, tokenizer.eos_token_id, max_new_tokens):
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def generation_scores(model: torch.nn.Module, tokenizer, prompts: Sequence[str], references: Sequence[str],
                      metric: TaskMetric = "exact_match", max_new_tokens: int = 24,
                      batch_size: int = 32) -> dict[str, float]:
    """Greedy answers to ``prompts`` scored against ``references`` with ``metric``; ``{metric: score}``."""
    if metric not in ("exact_match", "rougeL"):
        raise ValueError(f"Unknown task metric {metric!r}: use 'exact_match' or 'rougeL'.")
    predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    score = exact_match(predictions, references) if metric == "exact_match" else rouge_l(predictions, references)
    return {metric: score}
