"""The frozen causal-LM teacher of every recipe that distils token distributions (``DistillLM``, E2E-QP with
``distill_loss``): loading it frozen, checking it speaks the student's vocabulary, and its logits.

The teacher is kept out of ``nn.Module``'s registry by the recipes (a plain list), so it is in neither
``parameters()``, ``state_dict()`` nor DDP's gradient buckets.
"""

from __future__ import annotations

import torch
from effitrain.datamodules.tokenizer import load_tokenizer
from effitrain.lightning_modules.causal_lm import load_causal_lm


def load_teacher(teacher: str | torch.nn.Module | None, trust_remote_code: bool = False,
                 dtype: str | None = None) -> torch.nn.Module | None:
    """A folder or hub name loaded frozen in eval mode; a module is cast to ``dtype`` (when given) and kept."""
    if isinstance(teacher, str):
        teacher = load_causal_lm(teacher, trust_remote_code=trust_remote_code, dtype=dtype)
        teacher.requires_grad_(False)
    elif teacher is not None and dtype is not None:
        teacher.to(getattr(torch, dtype))
    return teacher.eval() if teacher is not None else None


def check_teacher(teacher: torch.nn.Module | None, student: torch.nn.Module) -> None:
    """The teacher is frozen and has the student's output vocabulary (raises ValueError otherwise)."""
    if teacher is None:
        return
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"The teacher has {len(trainable)} trainable parameter tensors (e.g. {trainable[0]!r}): "
                         "KD treats it as fixed. Freeze it (`teacher.requires_grad_(False)`) or pass its "
                         "folder, which the recipe loads frozen.")
    student_vocab = student.get_output_embeddings().out_features
    teacher_vocab = teacher.get_output_embeddings().out_features
    if student_vocab != teacher_vocab:
        raise ValueError(f"Teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} logits): "
                         "token-level KD needs the same tokenizer. Use a student built on the teacher's "
                         "tokenizer (`config.vocab_size` = the teacher's).")


def check_teacher_tokenizer(teacher_name: str | None, tokenizer) -> None:
    """The data's tokenizer is the teacher folder's, when the folder has one (raises ValueError otherwise)."""
    if tokenizer is None or teacher_name is None:
        return
    try:
        teacher_tokenizer = load_tokenizer(teacher_name)
    except ValueError:  # a teacher folder without tokenizer files: the vocabulary size check is all we have
        return
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"The data's tokenizer is not the teacher's ({teacher_name!r}): token-level KD "
                         "compares the same token ids. Set `data.tokenizer` to the teacher's.")


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's logits on the batch, moving it to the batch's device on first use."""
    if next(teacher.parameters()).device != batch["input_ids"].device:
        teacher.to(batch["input_ids"].device)
    teacher.eval()
    return teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


__all__ = ["check_teacher", "check_teacher_tokenizer", "load_teacher", "teacher_logits"]
