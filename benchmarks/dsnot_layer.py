"""Time of DSnoT's mask refinement against Wanda's mask on one LLaMA-7B-shaped layer, in one process.

The layer is ``down_proj``'s shape (4096 × 11008) and the statistics are those of 128 × 2048 calibration
tokens, already collected (as both methods share them): ‖X_j‖², the per-sequence sum and the variance of
every input feature, drawn here from a seeded heavy-tailed distribution like LLM activations. Timed:
Wanda = scores |W|·‖X‖ + the per-row mask; DSnoT = the same + ``max_cycle_time`` prune-and-grow cycles.
Runs alternate so that load on a shared machine hits both alike; medians and their ratio are printed,
with the mean |ε| (the expected output gap) before and after DSnoT.

    python benchmarks/dsnot_layer.py                          # 4096 x 11008, 50% unstructured, CPU
    python benchmarks/dsnot_layer.py --pattern 2:4 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from effitrain.methods.dsnot import dsnot
from effitrain.methods.sparsity import parse_pattern
from effitrain.methods.wanda import score_mask, wanda_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default=None, help="N:M instead of unstructured, e.g. 2:4")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    pattern = parse_pattern(args.pattern) if args.pattern else None
    sparsity = None if pattern else args.sparsity
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(device)
    scale = torch.distributions.Exponential(1.0).sample((args.cols,)).clamp_min(0.05)  # a few outlier features
    mean = 0.05 * torch.randn(args.cols, generator=gen) * scale
    var = scale**2
    sq_norm = (args.tokens * (var + mean**2)).to(device)
    input_sum, var = (args.tokens * mean).to(device), var.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def wanda() -> torch.Tensor:
        return score_mask(wanda_scores(w, sq_norm), sparsity, pattern)

    def wanda_dsnot():
        metric = wanda_scores(w, sq_norm)
        return dsnot(w, score_mask(metric, sparsity, pattern), input_sum, var, metric, args.cycles, 0.1, pattern)

    times = {"wanda": [], "dsnot": []}
    result = None
    for _ in range(args.repeats):
        for name, fn in (("wanda", wanda), ("dsnot", wanda_dsnot)):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            result = out if name == "dsnot" else result
    med = {k: statistics.median(v) for k, v in times.items()}
    target = args.pattern or f"{args.sparsity:.0%}"
    print(f"layer {args.rows}x{args.cols}, {target}, {args.cycles} cycles, {device.type}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"wanda mask        {med['wanda'] * 1e3:9.1f} ms")
    print(f"wanda + DSnoT     {med['dsnot'] * 1e3:9.1f} ms   ratio {med['dsnot'] / med['wanda']:.2f}")
    print(f"mean |eps| per row: wanda {result.gap_before.abs().mean():.4f} -> DSnoT {result.gap_after.abs().mean():.4f}; "
          f"mean swaps per row {result.swaps.float().mean():.1f}")


if __name__ == "__main__":
    main()
