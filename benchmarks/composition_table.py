"""Sparse + low-bit on the EfficientQAT testbed: perplexity of the FP, RTN, Block-AP and Block-AP + E2E-QP models,
dense and pruned (with and without keeping the mask), the share of pruned weights still exactly zero after
quantization, bits per weight and the size on disk.

    python benchmarks/composition_table.py --bits 2 --group 64 \
        --rows "dense=artifacts/efficientqat_testbed,artifacts/efficientqat_w2g64_block_ap,artifacts/efficientqat_w2g64" \
               "wanda50 keep_mask=artifacts/efficientqat_testbed_wanda50,artifacts/efficientqat_wanda50_w2g64_block_ap,..."

Each ``--rows`` item is ``<label>=<FP folder>,<Block-AP folder>,<E2E-QP folder>`` (the last two may be missing);
the FP folder gives the FP row and the RTN row (round-to-nearest of that folder's weights). The data is the
validation split of ``--data_config``'s ``data:`` section (the testbed's by default; ``configs/wanda/wanda.yaml``
for the quickstart model).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from efficientqat_table import evaluate, file_size, val_loader
from effitrain.methods.gptq_format import load_quantized, save_quantized
from effitrain.methods.quant_surgery import decoder_blocks, named_linears, quantize_model_rtn
from effitrain.methods.quantization import QuantLinear, average_bits
from transformers import AutoModelForCausalLM


def block_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The dense weights of the decoder blocks' Linears (dequantized for QuantLinear), in a fixed order."""
    out = []
    for block in decoder_blocks(model):
        for _, m in block.named_modules():
            if isinstance(m, QuantLinear):
                out.append(m.dequantize(torch.float32))
        out.extend(m.weight.detach().float() for _, m in named_linears(block))
    return out


def zeros_kept(pruned: list[torch.Tensor] | None, model: torch.nn.Module) -> str:
    if pruned is None:
        return "-"
    weights = block_weights(model)
    masked = sum(int((p == 0).sum()) for p in pruned)
    kept = sum(int(((p == 0) & (w == 0)).sum()) for p, w in zip(pruned, weights, strict=True))
    return f"{100 * kept / masked:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--data_config", default="configs/pretrain/efficientqat_testbed.yaml",
                        help="a config whose data: section gives the validation split (e.g. configs/wanda/wanda.yaml "
                             "for the quickstart model)")
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()

    loader = val_loader(args.data_config)
    bpw = f"{average_bits(args.bits, args.group):.3f}"
    lines = ["| model | stage | val ppl | val acc % | pruned weights still 0 | bits/weight (blocks) | size on disk |",
             "|---|---|---|---|---|---|---|"]
    for item in args.rows:
        label, _, folders = item.partition("=")
        fp_folder, *quant = folders.split(",")
        fp = AutoModelForCausalLM.from_pretrained(fp_folder, dtype=torch.float32)
        pruned = block_weights(fp) if "dense" not in label else None
        ppl, acc = evaluate(fp, loader)
        with tempfile.TemporaryDirectory() as tmp:
            copy.deepcopy(fp).half().save_pretrained(tmp)
            fp16 = file_size(Path(tmp))
        lines.append(f"| {label} | FP | {ppl:.3f} | {100 * acc:.1f} | {zeros_kept(pruned, fp)} | 16 (fp16) | "
                     f"{fp16 / 1024:.0f} KiB |")
        rtn = quantize_model_rtn(copy.deepcopy(fp), args.bits, args.group)
        ppl, acc = evaluate(rtn, loader)
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(rtn, tmp, args.bits, args.group)
            size = file_size(Path(tmp))
        lines.append(f"| {label} | RTN w{args.bits}g{args.group} | {ppl:.3f} | {100 * acc:.1f} | "
                     f"{zeros_kept(pruned, rtn)} | {bpw} | {size / 1024:.0f} KiB |")
        for stage, folder in zip(("Block-AP", "Block-AP + E2E-QP"), quant, strict=False):
            if not folder or not Path(folder).exists():
                continue
            model = load_quantized(folder)
            ppl, acc = evaluate(model, loader)
            lines.append(f"| {label} | {stage} | {ppl:.3f} | {100 * acc:.1f} | {zeros_kept(pruned, model)} | {bpw} | "
                         f"{file_size(Path(folder)) / 1024:.0f} KiB |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
