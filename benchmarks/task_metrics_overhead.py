"""What the task metric (greedy answers to held-out prompts, exact match) adds to an instruction recipe.

Measured in one process on the MoSLoRA recipe's model and data (configs/moslora/moslora.yaml: r=8 on every
projection of the quickstart tiny LLaMA, batch 16, built-in arithmetic): the time of a training step, of a
validation pass, and of one task evaluation (``task_eval_size`` prompts, up to ``task_max_new_tokens`` tokens).
The three run interleaved, ``--rounds`` times, and the medians give the recipe's projected slowdown:

    (steps x step + V x (val + task)) / (steps x step + V x val),   V = validations in the run

and, with ``summary.baseline: true``, one more validation and task evaluation before training. The clock is
this process's CPU time (``--clock process``), which other processes' load on a shared machine barely moves.

    python benchmarks/task_metrics_overhead.py --pretrained artifacts/tiny_llama
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from effitrain.datamodules.instructions import InstructionDataModule
from effitrain.lightning_modules.causal_lm import load_causal_lm
from effitrain.methods.moslora import MoSLoraConfig
from effitrain.methods.task_metrics import generation_scores
from peft import get_peft_model

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default="artifacts/tiny_llama")
    parser.add_argument("--steps", type=int, default=200, help="the recipe's max_steps")
    parser.add_argument("--validations", type=int, default=4, help="validations in the run (every 50 of 200)")
    parser.add_argument("--task-eval-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)

    data = InstructionDataModule(tokenizer=args.pretrained, max_length=128, batch_size=16)
    data.setup("fit")
    model = get_peft_model(load_causal_lm(args.pretrained), MoSLoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    train_batches = list(iter(data.train_dataloader()))[: args.timed_steps]
    val_batches = list(iter(data.val_dataloader()))
    examples = data.generation_examples(args.task_eval_size)
    prompts, references = [p for p, _ in examples], [r for _, r in examples]

    def train_steps() -> float:
        model.train()
        start = clock()
        for batch in train_batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (clock() - start) / len(train_batches)

    def validation() -> float:
        model.eval()
        start = clock()
        with torch.no_grad():
            for batch in val_batches:
                model(**batch)
        return clock() - start

    def task_eval() -> float:
        start = clock()
        generation_scores(model, data.tokenizer, prompts, references, data.task_metric, args.max_new_tokens)
        return clock() - start

    step, val, task = [], [], []
    for _ in range(args.rounds):
        step.append(train_steps())
        val.append(validation())
        task.append(task_eval())
    step_s, val_s, task_s = (statistics.median(x) for x in (step, val, task))
    base = args.steps * step_s + args.validations * val_s
    with_task = base + args.validations * task_s
    with_baseline = with_task + val_s + task_s
    print(json.dumps({
        "clock": args.clock, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "step_s": round(step_s, 4), "validation_s": round(val_s, 3), "task_eval_s": round(task_s, 3),
        "val_batches": len(val_batches), "task_eval_size": args.task_eval_size,
        "slowdown_task_metric": round(with_task / base, 4),
        "slowdown_task_metric_and_baseline": round(with_baseline / base, 4),
    }, indent=2))


if __name__ == "__main__":
    main()
