"""Perplexity of training-free pruning on a causal LM: magnitude, Wanda, Wanda + DSnoT, magnitude + DSnoT at
several sparsities, in one process (the table of docs/wanda_dsnot.md).

The model is loaded once; the calibration set is the first ``--samples`` sequences of the shuffled training
loader under ``--seed`` (as ``configs/wanda/*.yaml`` under the default seed 42), the perplexity is over the
whole validation split, as ``python train.py validate --config configs/wanda/wanda.yaml`` reports it.

    python benchmarks/wanda_dsnot_table.py --model artifacts/tiny_llama --targets 0.5,0.6,0.7,2:4,4:8
"""

from __future__ import annotations

import argparse
import copy
import time

import lightning as L
import torch
from effitrain.datamodules.text import TextDataModule
from effitrain.methods.blockwise_pruning import DSnoTSettings, prune_causal_lm
from effitrain.methods.sparsity import parse_pattern
from torchmetrics.text import Perplexity
from transformers import AutoModelForCausalLM

ROWS = (("magnitude", "magnitude", False), ("Wanda", "wanda", False), ("Wanda + DSnoT", "wanda", True),
        ("magnitude + DSnoT", "magnitude", True))


@torch.no_grad()
def perplexity(model: torch.nn.Module, loader) -> float:
    model.eval()
    ppl = Perplexity(ignore_index=-100)
    for batch in loader:
        ppl.update(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), batch["labels"][:, 1:])
    return ppl.compute().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/tiny_llama")
    parser.add_argument("--targets", default="0.5,0.6,0.7,2:4,4:8")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip", default="mlp.*", help="DSnoT skips these Linear names ('' = none)")
    parser.add_argument("--max-cycle-time", type=int, default=50)
    parser.add_argument("--update-threshold", type=float, default=0.1)
    parser.add_argument("--shrink-only", action="store_true", help="DSnoT stops a row at a swap that does not "
                        "shrink |eps| (not official)")
    parser.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    parser.add_argument("--rows", default="0,1,2,3", help="which rows (0 magnitude, 1 Wanda, 2 Wanda + DSnoT, "
                        "3 magnitude + DSnoT); separate processes can share the work")
    args = parser.parse_args()
    L.seed_everything(args.seed)
    data = TextDataModule(source="builtin", tokenizer=args.model, block_size=128, batch_size=16)
    data.setup()
    calibration, count = [], 0
    for batch in data.train_dataloader():
        calibration.append(batch["input_ids"][: args.samples - count])
        count += calibration[-1].shape[0]
        if count >= args.samples:
            break
    val = data.val_dataloader()
    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
    settings = DSnoTSettings(args.max_cycle_time, args.update_threshold, skip=tuple(s for s in [args.skip] if s),
                             shrink_only=args.shrink_only)
    if not args.skip_dense:
        print(f"dense perplexity {perplexity(dense, val):.2f} ({count} calibration sequences, seed {args.seed}, "
              f"DSnoT skip {list(settings.skip)}, shrink-only {args.shrink_only})", flush=True)
    targets = args.targets.split(",")
    print("| method | " + " | ".join(t if ":" in t else f"{float(t):.0%}" for t in targets) + " |")
    print("|---|" + "---|" * len(targets))
    for label, method, refine in (ROWS[int(i)] for i in args.rows.split(",")):
        cells = []
        for target in targets:
            pattern = parse_pattern(target) if ":" in target else None
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_causal_lm(model, calibration, method, None if pattern else float(target), pattern,
                            settings if refine else None)
            seconds = time.perf_counter() - start
            cells.append(f"{perplexity(model, val):.2f}")
            print(f"  {label} @ {target}: perplexity {cells[-1]} (pruned in {seconds:.1f} s)", flush=True)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
