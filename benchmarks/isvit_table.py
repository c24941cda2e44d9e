"""I&S-ViT accuracy table on the digits testbed (docs/isvit.md), in one process.

For W3/A3, W4/A4, W6/A6: FP top-1, plain PTQ (min-max and percentile init; uniform, log2 and SULQ
post-softmax quantizers), I&S-ViT's SOS with each post-softmax quantizer, and the ablation neither / SULQ only
/ SOS only / both (the "without SOS" rows use one-stage block reconstruction with the same iterations). Also
the calibration time per stage and a save -> reload check of the W4/A4 model (identical outputs).

    OMP_NUM_THREADS=1 python benchmarks/isvit_table.py --iters 100 --lr 4e-5 --bits 3 4 6
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import effitrain.models  # noqa: F401
import torch
from effitrain.datamodules.images import ImageDataModule
from effitrain.lightning_modules.image_classifier import create_timm_model
from effitrain.lightning_modules.isvit_ptq import build_quantized, load_isvit
from effitrain.methods.isvit_sos import run_isvit
from effitrain.methods.vit_ptq import save_quantized_vit

# (row label, reconstruction, post-softmax, init)
ROWS = [
    ("PTQ min-max, uniform", "none", "uniform", "minmax"),
    ("PTQ percentile, uniform", "none", "uniform", "percentile"),
    ("PTQ percentile, log2", "none", "log2", "percentile"),
    ("PTQ percentile, SULQ", "none", "sulq", "percentile"),
    ("one-stage recon., uniform (neither)", "single", "uniform", "percentile"),
    ("one-stage recon., SULQ (SULQ only)", "single", "sulq", "percentile"),
    ("SOS, uniform (SOS only)", "sos", "uniform", "percentile"),
    ("SOS, log2", "sos", "log2", "percentile"),
    ("SOS, SULQ (I&S-ViT: both)", "sos", "sulq", "percentile"),
]


@torch.no_grad()
def add_outlier_channels(model: torch.nn.Module, channels: int, factor: float) -> None:
    """Give the post-LayerNorm activations ViT-like outlier channels without changing the function: for the
    first ``channels`` channels of every norm1/norm2, gamma and beta are multiplied by ``factor`` and the
    matching input columns of the Linears that read them divided by it (RepQ-ViT's observation: real ViTs
    have a few post-LN channels with ranges tens of times the others; the digits model has none)."""
    for block in model.blocks:
        for norm, layers in ((block.norm1, [block.attn.qkv]), (block.norm2, [block.mlp.fc1])):
            norm.weight[:channels] *= factor
            norm.bias[:channels] *= factor
            for layer in layers:
                layer.weight[:, :channels] /= factor


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="artifacts/digits_vit_tiny")
    parser.add_argument("--model_name", default="vit_tiny_patch16_224")
    parser.add_argument("--model_kwargs", default='{"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 96, '
                                                  '"num_heads": 3}')
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--calib_images", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="*", default=None, help="row labels to run (default: all)")
    parser.add_argument("--outliers", type=int, default=0, help="post-LN outlier channels per norm (testbed)")
    parser.add_argument("--outlier_factor", type=float, default=30.0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    kwargs = json.loads(args.model_kwargs)

    data = ImageDataModule("builtin:digits", image_size=32, batch_size=120)
    data.setup("fit")
    val = list(data.val_dataloader())
    train = data.train_set
    train.transform = data.eval_transform  # calibration uses evaluation transforms
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.calib_images]
    calib = torch.stack([train[int(i)][0] for i in order])

    fp = create_timm_model(args.model_name, 10, args.pretrained, **kwargs).eval()
    if args.outliers:
        add_outlier_channels(fp, args.outliers, args.outlier_factor)
    results = {"fp": accuracy(fp, val), "rows": [], "settings": vars(args)}
    print(f"FP top-1 {results['fp']:.2f} ({len(calib)} calibration images, {args.iters} iterations, lr {args.lr})")
    for bits in args.bits:
        for label, reconstruction, post_softmax, init in ROWS:
            if args.rows and label not in args.rows:
                continue
            torch.manual_seed(args.seed)
            q = build_quantized(copy.deepcopy(fp), bits, bits, post_softmax, reconstruction, init, True)
            start = time.perf_counter()
            stats = run_isvit(q, fp, calib, reconstruction=reconstruction, iters=args.iters,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed)
            row = {"bits": bits, "row": label, "top1": accuracy(q, val), "seconds": stats["seconds"],
                   "total_s": time.perf_counter() - start}
            results["rows"].append(row)
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in stats["seconds"].items())
            print(f"W{bits}/A{bits}  {label:38s} {row['top1']:6.2f}   ({stages})", flush=True)
            if bits == 4 and reconstruction == "sos" and post_softmax == "sulq":
                with tempfile.TemporaryDirectory() as folder:
                    save_quantized_vit(q, folder, {"model_name": args.model_name, "model_kwargs": kwargs,
                                                   "num_classes": 10, "w_bits": bits, "a_bits": bits,
                                                   "post_softmax": post_softmax, "reconstruction": reconstruction,
                                                   "init": init, "weight_channel_wise": True})
                    size = (Path(folder) / "model.safetensors").stat().st_size
                    loaded = load_isvit(folder)
                    with torch.no_grad():
                        same = all(torch.equal(loaded(x), q(x)) for x, _ in val)
                results["reload"] = {"identical_outputs": same, "safetensors_bytes": size}
                print(f"  saved + reloaded: outputs identical on all {sum(len(y) for _, y in val)} val images: "
                      f"{same}; model.safetensors {size / 1024:.0f} KiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
