"""LBC training step against the dense step, and the memory of LBC's scores α, in one process.

A training step (forward, backward, SGD step) of a timm model whose Conv2d/Linear layers (first conv and
classifier dense) carry LBC's learnable N:M mask, in three phases of the schedule:

* ``lbc_all``: all C(M, N) candidates alive (the start: the mask is all ones, but α gets its gradient
  Σ_{j∈c} g_j·W_j and an optimizer update every step; the most weights α has),
* ``lbc_mid``: two candidates alive per group (mid-schedule: a mask that is not all ones, α still trained),
* ``lbc_final``: one candidate left, α frozen (after t_f: a fixed N:M mask),

against the dense step and the SR-STE step (per-forward N:M magnitude mask). Steps alternate so that load
on a shared machine hits all alike; medians and ratios are printed (target <= 1.3 at 2:4 with all
candidates alive), then α's parameter count and fp32 bytes per model and pattern (n·C(M, N)/M per masked
weight). Seed 0 for the model, α of the later phases and the batch.

    python benchmarks/lbc_step.py                          # resnet18, 32 px, batch 64 (the digits recipe)
    python benchmarks/lbc_step.py --model resnet50 --size 224 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import math

import timm
import torch
from effitrain.callbacks.nm_sparsity import timm_dense_layers
from effitrain.methods.lbc import LearnableNMMask
from effitrain.methods.sparsity import parse_pattern, prunable_layers, register_mask, sparsify
from sparse_step import step_fn  # the same SGD training step as the UniPTS masked-step benchmark
from timing import CLOCKS, interleaved_medians


def lbc(model: torch.nn.Module, n: int, m: int, alive: int | None = None) -> int:
    """LBC masks on ``model``; with ``alive``, random scores and ``alive`` candidates kept per group (1: α
    frozen, as after t_f). Returns α's element count."""
    layers = prunable_layers(model, timm_dense_layers(model))
    for layer in layers.values():
        mask = LearnableNMMask(tuple(layer.weight.shape), n, m).to(layer.weight.device)
        register_mask(layer, mask)
        if alive is not None:
            with torch.no_grad():
                mask.alpha.normal_()
            mask.keep_best(alive)
            mask.alpha.requires_grad_(alive > 1)
    return sum(layer.parametrizations.weight[0].alpha.numel() for layer in layers.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: CPU seconds of this process (less sensitive to other jobs on a shared CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n, m = parse_pattern(args.pattern)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, num_classes=10).to(device)
    phases = {"lbc_all": None, "lbc_mid": 2, "lbc_final": 1}
    models = {name: copy.deepcopy(dense) for name in (*phases, "sr_ste")}
    for name, alive in phases.items():
        lbc(models[name], n, m, alive)
    layers = prunable_layers(models["sr_ste"], timm_dense_layers(models["sr_ste"]))
    sparsify(models["sr_ste"], dict.fromkeys(layers, 1 - n / m), 2e-4, pattern=(n, m))
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    steps = {"dense": step_fn(dense, images, targets)}
    steps.update({name: step_fn(model, images, targets) for name, model in models.items()})
    med = interleaved_medians(steps, rounds=args.steps, warmup=args.warmup, device=device, clock=CLOCKS[args.clock])
    print(f"{args.model} {args.size}px batch {args.batch}, {n}:{m}, {device.type}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps, {args.clock} clock")
    for name in steps:
        print(f"{name:9s} step {med[name] * 1e3:8.1f} ms   ratio to dense {med[name] / med['dense']:.3f}")
    print("alpha memory (fp32) per model and pattern, first conv and classifier dense:")
    for model_name in sorted({args.model, "resnet18", "resnet50"}):
        net = timm.create_model(model_name, num_classes=1000, pretrained=False)
        layers = prunable_layers(net, timm_dense_layers(net))
        weights = sum(layer.weight.numel() for layer in layers.values())
        for nn_, mm in ((2, 4), (1, 4), (4, 8), (1, 8), (1, 16)):
            count = weights // mm * math.comb(mm, nn_)
            print(f"  {model_name:9s} {nn_}:{mm:<3d} alpha {count:>12,d} ({count / weights:5.2f}x the masked weights, "
                  f"{count * 4 / 2**20:8.1f} MiB)")


if __name__ == "__main__":
    main()
