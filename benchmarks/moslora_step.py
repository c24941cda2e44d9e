"""MoSLoRA's cost, as ratios measured in one process (targets: <= 1.05 and <= 1.01).

1. training step (forward + backward + AdamW) of MoSLoRA / LoRA at the same r on the same model;
2. inference of the merged MoSLoRA model (merge_and_unload) / the base model.

The two sides of each ratio run interleaved (A, B, A, B, ...) on the same inputs, and the ratio reported is the
median of the per-round ratios, so that load from other processes hits both sides alike. On CPU the clock is
this process's CPU time (`--clock process`), which other processes' load on a shared machine barely moves;
on CUDA it is wall time after a synchronize.

    python benchmarks/moslora_step.py                      # a LLaMA of width 512 x 4 layers on CPU
    python benchmarks/moslora_step.py --hidden 2048 --layers 8 --seq 1024 --batch 8 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable

import torch
from effitrain.methods.moslora import MoSLoraConfig
from peft import LoraConfig, get_peft_model
from timing import CLOCKS, interleaved_ratio
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's commonsense setting


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="default: process CPU time on CPU, wall time on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    clock_name = args.clock or ("wall" if args.device.startswith("cuda") else "process")
    clock = CLOCKS[clock_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq)
    base = LlamaForCausalLM(config).to(args.device, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids}
    adapter = dict(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=TARGETS)

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**adapter)).train()
    mos = get_peft_model(copy.deepcopy(base), MoSLoraConfig(**adapter)).train()
    opt_lora = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    opt_mos = torch.optim.AdamW([p for p in mos.parameters() if p.requires_grad], lr=1e-4)
    step = interleaved_ratio(train_step(mos, batch, opt_mos), train_step(lora, batch, opt_lora),
                             args.rounds, args.warmup, args.device, clock)
    del lora, opt_lora, opt_mos

    merged = mos.merge_and_unload().eval()
    base.eval()

    @torch.no_grad()
    def infer(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: model(input_ids=ids)

    infer_ratio = interleaved_ratio(infer(merged), infer(base), args.rounds, args.warmup, args.device, clock)
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype, "clock": clock_name, "threads": torch.get_num_threads(), "model": f"LLaMA hidden={args.hidden} layers={args.layers}",
        "batch": [args.batch, args.seq], "r": args.r, "targets": TARGETS,
        "train_step_moslora_over_lora": round(step["ratio"], 4),
        "train_step_ms": {"moslora": round(step["ms_a"], 2), "lora": round(step["ms_b"], 2)},
        "merged_inference_over_base": round(infer_ratio["ratio"], 4),
        "inference_ms": {"merged_moslora": round(infer_ratio["ms_a"], 2), "base": round(infer_ratio["ms_b"], 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
