"""Task metrics: exact match and ROUGE-L against hand-computed values; batched greedy generation against a
one-prompt-at-a-time argmax loop on a tiny fixed model."""

from __future__ import annotations

import pytest
import torch
from effitrain.datamodules.instructions import InstructionDataModule
from effitrain.methods.task_metrics import exact_match, generation_scores, greedy_generate, rouge_l


def test_exact_match_by_hand():
    predictions = ["37 + 58 = 95.", " 3 * 4 = 12. ", "1 - 1 = 0", "2 + 2 = 5."]
    references = ["37 + 58 = 95.", "3 * 4 = 12.", "1 - 1 = 0.", "2 + 2 = 4."]
    assert exact_match(predictions, references) == 2 / 4  # whitespace differs in the 2nd; the 3rd lacks "."


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 words each way
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6, abs=1e-6)
    with pytest.raises(ValueError, match="rougeL"):
        generation_scores(None, None, [], [], metric="bleu")


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Argmax decoding of one prompt, the whole sequence re-run at every step (no cache, no padding)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_exact_match_on_a_tiny_fixed_model(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompts = ["What is 3 + 4?", "What is 12 * 11 and then some more words?", "Hi", "def f(x): return"]
    expected = [reference_greedy(model, tokenizer, p, 6) for p in prompts]
    # batches of 3 and 1: left padding in the first batch must not change any answer
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == expected
    references = [expected[0], expected[1] + " wrong", "not the answer", expected[3]]
    scores = generation_scores(model, tokenizer, prompts, references, "exact_match", max_new_tokens=6, batch_size=3)
    assert scores == {"exact_match": 0.5}  # rows 0 and 3 match, by construction


def test_instruction_data_gives_a_fixed_held_out_set(tiny_lm_dir):
    data = InstructionDataModule(tokenizer=str(tiny_lm_dir), num_examples=100, batch_size=4)
    examples = data.generation_examples(5)
    assert data.task_metric == "exact_match" and len(examples) == 5
    assert examples == InstructionDataModule(tokenizer=str(tiny_lm_dir), num_examples=100).generation_examples(5)
    prompt, answer = examples[0]
    a, op, b = prompt.split("What is ")[1].split("?")[0].split()
    assert answer == f"{a} {op} {b} = {eval(f'{a} {op} {b}')}."  # the held-out reference is the true result
    held_out = {r["instruction"] for r in data.val_records}
    assert all(p.split("### Instruction:\n")[1].split("\n")[0] in held_out for p, _ in examples)
