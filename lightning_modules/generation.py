"""Answer quality of an instruction-tuned causal LM: greedy answers to held-out prompts, scored against the
reference responses with ROUGE-L (torchmetrics) and exact match.

A batch from ``InstructionDataModule`` holds prompt + response tokens with labels −100 on the prompt; the
prompt is every token before the first labelled one, and the reference is the labelled tokens (without the
end-of-sequence token). Any recipe that trains on those batches can share ``AnswerQuality``; the greedy
decoding is ``effitrain.methods.task_metrics.greedy_continuations``, shared with the instruction recipes'
task metric.
"""

from __future__ import annotations

import torch
from effitrain.methods.task_metrics import greedy_continuations as greedy_answers
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import ROUGEScore

IGNORE_INDEX = -100


def split_prompts(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) per row: the prompt ends where the first labelled token starts."""
    pairs = []
    for row in range(input_ids.shape[0]):
        labelled = (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        if labelled.numel() == 0:
            continue
        start = int(labelled[0])
        length = int(attention_mask[row].sum()) if attention_mask is not None else input_ids.shape[1]
        pairs.append((input_ids[row, :start].tolist(), input_ids[row, start:length].tolist()))
    return pairs


class AnswerQuality(nn.Module):
    """ROUGE-L F1 and exact match (after stripping whitespace) of greedy answers; DDP-synced torchmetrics.

    Args:
        max_new_tokens: generation budget per answer.
        max_examples: answers generated per validation run (the first held-out batches), to bound its cost.
    """

    def __init__(self, max_new_tokens: int = 32, max_examples: int = 64):
        super().__init__()
        if max_new_tokens < 1 or max_examples < 0:
            raise ValueError(f"need max_new_tokens >= 1 and max_examples >= 0, got {max_new_tokens}, {max_examples}.")
        self.max_new_tokens, self.max_examples = max_new_tokens, max_examples
        self.rouge = ROUGEScore(rouge_keys="rougeL")
        self.exact = MeanMetric()
        self.seen = 0

    def reset(self) -> None:
        self.rouge.reset()
        self.exact.reset()
        self.seen = 0

    def update(self, model: nn.Module, batch: dict[str, torch.Tensor], tokenizer) -> None:
        """Generate for this batch's prompts until ``max_examples`` answers were scored in this run."""
        pairs = split_prompts(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        pairs = pairs[: max(self.max_examples - self.seen, 0)]
        if not pairs:
            return
        eos = tokenizer.eos_token_id
        answers = greedy_answers(model, [p for p, _ in pairs], tokenizer.pad_token_id, eos, self.max_new_tokens)
        refs = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for _, r in pairs]
        preds = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        self.rouge.update(preds, refs)
        self.exact.update(torch.tensor([float(p == r) for p, r in zip(preds, refs, strict=True)]))
        self.seen += len(pairs)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"rougeL": self.rouge.compute()["rougeL_fmeasure"], "exact_match": self.exact.compute()}
