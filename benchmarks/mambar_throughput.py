"""Training and inference throughput of Mamba-R-T against iLLaMA-T and timm's ViT-T, same process, same inputs.

    python benchmarks/mambar_throughput.py                          # 224 px, batch 8, CPU
    python benchmarks/mambar_throughput.py --batch 64 --device cuda --precision bf16

A training step is forward + cross-entropy + backward + AdamW step. Each number is the median over
`--steps` interleaved steps after one warm-up step per model (machine load hits every model alike); ratios are
relative to mambar_tiny. iLLaMA (models/illama.py) is skipped if absent.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import effitrain.models  # noqa: E402,F401  (registers mambar_* and illama_*)
import timm
import torch
import torch.nn.functional as F
from timing import timed

MODELS = ["mambar_tiny_patch16_224", "illama_tiny_patch16_224", "vit_tiny_patch16_224"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n for n in MODELS if n in timm.list_models()]
    for missing in set(MODELS) - set(names):
        print(f"{missing} is not registered: skipped")
    torch.manual_seed(0)
    nets = {n: timm.create_model(n, img_size=args.img_size, num_classes=1000).to(args.device) for n in names}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in nets.items()}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())

    def train(name: str) -> None:
        model, opt = nets[name].train(), opts[name]
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(name: str) -> None:
        with autocast:
            nets[name].eval()(x)

    def train_step(name: str) -> float:
        return timed(lambda: train(name), args.device)

    def infer_step(name: str) -> float:
        return timed(lambda: infer(name), args.device)

    results = {}
    for kind, step in (("train", train_step), ("inference", infer_step)):
        for n in names:
            step(n)  # warm-up
        times = {n: [] for n in names}
        for _ in range(args.steps):
            for n in names:
                times[n].append(step(n))
        results[kind] = {n: args.batch / statistics.median(t) for n, t in times.items()}

    ref = names[0]
    print(f"{args.img_size} px, batch {args.batch}, {args.device}, {args.precision}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print("| model | params (M) | train img/s | train vs mambar | inference img/s | inference vs mambar |")
    print("|---|---|---|---|---|---|")
    for n in names:
        params = sum(p.numel() for p in nets[n].parameters()) / 1e6
        tr, inf = results["train"][n], results["inference"][n]
        print(f"| {n} | {params:.2f} | {tr:.2f} | {tr / results['train'][ref]:.2f}x | {inf:.2f} | "
              f"{inf / results['inference'][ref]:.2f}x |")


if __name__ == "__main__":
    main()
