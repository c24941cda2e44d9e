"""Step time of UniPTS dynamic sparse training vs dense training, in one process.

A training step (forward, backward, SGD step) of a timm ResNet with every Conv2d/Linear masked by
magnitude at 90% on every forward (`effitrain.methods.sparsity.sparsify`: top-k selection per layer, W⊙m, the
straight-through gradient plus λ(1 − m)⊙W), against the same step on the dense model. Steps alternate
dense / masked so that load on a shared machine hits both alike; the ratio of medians is printed
(target <= 1.15).

    python benchmarks/sparse_step.py                       # resnet18, 32 px, batch 64 (the digits recipe)
    python benchmarks/sparse_step.py --model resnet50 --size 224 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics

import timm
import torch
import torch.nn.functional as F
from effitrain.methods.sparsity import prunable_layers, sparsify
from timing import timed


def step_fn(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, num_classes=10).to(device)
    masked = copy.deepcopy(dense)
    sparsify(masked, {name: args.sparsity for name in prunable_layers(masked)})
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    steps = {"dense": step_fn(dense, images, targets), "masked": step_fn(masked, images, targets)}
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = timed(step, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(m.weight.numel() for m in prunable_layers(dense).values())
    print(f"{args.model} {args.size}px batch {args.batch} on {device} ({torch.get_num_threads()} threads), "
          f"{params / 1e6:.1f}M masked weights at {args.sparsity:.0%}")
    print(f"dense step  {med['dense'] * 1e3:8.1f} ms (median of {args.steps})")
    print(f"masked step {med['masked'] * 1e3:8.1f} ms")
    print(f"masked / dense = {med['masked'] / med['dense']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
