"""Training throughput of iLLaMA-T against timm's ViT-T at the same image size and batch, in one process.

    python benchmarks/illama_throughput.py                       # 224 px, batch 32, the device's default
    python benchmarks/illama_throughput.py --device cuda --batch-size 256 --amp

One training step = forward, cross-entropy, backward, AdamW step. The models are measured in interleaved
rounds (ViT, then each iLLaMA setting, repeated) and each reports the median over rounds, so a busy machine
slows all of them alike; the ratio to ViT is the number to read. iLLaMA settings: the official post-softmax
mask at r = 0 (explicit attention matrix) and r = 1 (fused SDPA), the strict mask at r = 0 (one fused causal
SDPA call) and at r = 0.5 (two fused calls).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import effitrain.models  # noqa: E402,F401  (registers illama_*)
import timm
import torch
import torch.nn.functional as F
from timing import timed

SETTINGS = [("official", 0.0), ("official", 1.0), ("strict", 0.0), ("strict", 0.5)]


def make_step(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, amp: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=args.img_size).to(device).train()
    candidates = {"vit_tiny_patch16_224": make_step(vit, images, targets, args.amp)}
    for mode, rate in SETTINGS:
        model = timm.create_model("illama_tiny_patch16_224", img_size=args.img_size, mask_mode=mode,
                                  soft_mask_rate=rate).to(device).train()
        candidates[f"illama_tiny {mode} r={rate:g}"] = make_step(model, images, targets, args.amp)
    for step in candidates.values():  # warm-up (allocator, kernels)
        step()

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, step in candidates.items():
            times[name].append(timed(step, device, calls=args.steps))

    print(f"device {device} ({torch.get_num_threads()} threads), {args.img_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, median of {args.rounds} rounds x {args.steps} steps")
    base = args.batch_size / statistics.median(times["vit_tiny_patch16_224"])
    print(f"{'model':34s} {'images/s':>9s} {'vs ViT-T':>9s}")
    for name, values in times.items():
        rate = args.batch_size / statistics.median(values)
        print(f"{name:34s} {rate:9.1f} {rate / base:9.3f}")


if __name__ == "__main__":
    main()
