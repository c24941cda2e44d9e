"""UIO-LLMs Fig. 9 analogue: prefill time and peak memory against context length, memory model vs the plain
model with full attention, in one run.

The memory model prefills by segments (encode every complete segment, decode the last one against
m·⌊n/l⌋ memory K/V: ``MemoryLM.generate(ids, 1)``); the plain model runs one forward over all n tokens
(transformers' default SDPA attention, K/V cache on). Each (model, length) runs in a fresh subprocess so its
peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS minus that of
the same process before the prefill on CPU. Times are the median of ``--repeats`` after one warm-up; ratios
are to the 1x length of the same model.

    python benchmarks/uio_scaling.py                          # tiny-LLaMA shape, l=256, m=32, up to 16x
    python benchmarks/uio_scaling.py --device cuda --hidden 2048 --layers 16 --segment-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from timing import peak_rss_mib, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
    from effitrain.models.memory_lm import MemoryLM
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=max(args.length, 4096))
    base = LlamaForCausalLM(config).to(args.device).eval()
    model = MemoryLM.from_base(base, args.segment_length, args.memory_tokens, encoder_rank=16, transfer_rank=16).to(args.device)
    ids = torch.randint(0, 4096, (1, args.length), device=args.device)
    run = (lambda: model.generate(ids, 1)) if args.model == "memory" else (lambda: base(ids, use_cache=True))
    before = peak_rss_mib()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    with torch.no_grad():
        times = [timed(run, args.device) for _ in range(args.repeats + 1)]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mib())
    kv = model.last_cache_length if args.model == "memory" else args.length
    print(json.dumps({"time_s": statistics.median(times[1:]), "peak_mib": peak - before, "kv": kv}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--segment-length", type=int, default=256)
    parser.add_argument("--memory-tokens", type=int, default=32)
    parser.add_argument("--train-context", type=int, default=512)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["memory", "plain"])
    parser.add_argument("--length", type=int)
    args = parser.parse_args()
    if args.worker:
        args.model = args.worker
        return worker(args)
    print(f"LLaMA d={args.hidden}, {args.layers} layers on {args.device}; memory model l={args.segment_length}, "
          f"m={args.memory_tokens}; training context {args.train_context} tokens\n")
    print("| context | tokens | memory: time (s) | memory: peak (MiB) | memory: KV | plain: time (s) "
          "| plain: peak (MiB) | plain: KV | time ratio plain/memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    common = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--segment-length", str(args.segment_length), "--memory-tokens",
              str(args.memory_tokens), "--repeats", str(args.repeats)]
    for multiple in args.multiples:
        length = multiple * args.train_context
        row = {}
        for kind in ("memory", "plain"):
            out = subprocess.run([*common, "--worker", kind, "--length", str(length)], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode:
                row[kind] = None
                print(f"# {kind} at {length} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            else:
                row[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        mem, plain = row["memory"], row["plain"]

        def cells(r):
            return ["-", "-", "-"] if r is None else [f"{r['time_s']:.3f}", f"{r['peak_mib']:.0f}", str(r["kv"])]

        ratio = f"{plain['time_s'] / mem['time_s']:.2f}" if mem and plain else "-"
        print(f"| {multiple}x | {length} | " + " | ".join(cells(mem) + cells(plain)) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
