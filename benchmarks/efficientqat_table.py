"""EfficientQAT on the testbed: perplexity/accuracy of FP, RTN, Block-AP and Block-AP + E2E-QP, the share of
RTN's gap recovered, and the size on disk against FP16.

    python benchmarks/efficientqat_table.py --fp artifacts/efficientqat_testbed \
        --runs w2g64=artifacts/efficientqat_w2g64_block_ap,artifacts/efficientqat_w2g64 ...

Each ``--runs`` item is ``w<N>g<G>=<Block-AP folder>,<E2E-QP folder>`` (either may be missing). The data is
the testbed's validation split (``AlgorithmicDataModule`` with the settings of configs/pretrain/efficientqat_testbed.yaml).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import tempfile
from pathlib import Path

import torch
import yaml
from effitrain.methods.gptq_format import EFFICIENTQAT_WEIGHTS, GPTQ_WEIGHTS, load_quantized, save_quantized
from effitrain.methods.quant_surgery import quantize_model_rtn
from torchmetrics.text import Perplexity
from transformers import AutoModelForCausalLM


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> tuple[float, float]:
    """(perplexity over scored tokens, next-token argmax accuracy over scored tokens)."""
    model.eval()
    ppl, correct, total = Perplexity(ignore_index=-100), 0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        ppl.update(logits, target)
        mask = target != -100
        correct += (logits.argmax(-1)[mask] == target[mask]).sum().item()
        total += mask.sum().item()
    return ppl.compute().item(), correct / total


def val_loader(data_config: str, tokenizer: str | None = None):
    """The validation batches of a recipe's data, as its config's ``data:`` section builds them (the testbed's
    ``AlgorithmicDataModule``, or a text datamodule; ``tokenizer`` replaces the config's, for a model folder)."""
    data = yaml.safe_load(Path(data_config).read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    init_args = dict(data.get("init_args", {}))
    if tokenizer is not None:
        init_args["tokenizer"] = tokenizer
    datamodule = getattr(importlib.import_module(module), name)(**init_args)
    datamodule.setup("validate")
    return datamodule.val_dataloader()


def file_size(folder: Path) -> int:
    """Bytes of the folder's weights file (the 3-bit pack has its own name, which GPTQ loaders do not open)."""
    return sum(p.stat().st_size for p in (folder / GPTQ_WEIGHTS, folder / EFFICIENTQAT_WEIGHTS) if p.exists())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp", default="artifacts/efficientqat_testbed")
    parser.add_argument("--data_config", default="configs/pretrain/efficientqat_testbed.yaml")
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()

    loader = val_loader(args.data_config)
    fp = AutoModelForCausalLM.from_pretrained(args.fp, dtype=torch.float32)
    fp_ppl, fp_acc = evaluate(fp, loader)
    with tempfile.TemporaryDirectory() as tmp:
        # The fp16 size from a copy: casting `fp` itself to fp16 and back would round the weights that RTN
        # and the table's other rows then quantize.
        copy.deepcopy(fp).half().save_pretrained(tmp)
        fp16_size = file_size(Path(tmp))
    rows = [f"| FP (fp32 eval) | - | {fp_ppl:.3f} | {100 * fp_acc:.1f} | - | {fp16_size / 1024:.0f} KiB (fp16) |"]
    lines = ["| model | config | val ppl | val acc % | RTN gap recovered | size on disk |", "|---|---|---|---|---|---|"]
    for item in args.runs:
        name, _, folders = item.partition("=")
        bits, group = map(int, re.fullmatch(r"w(\d+)g(\d+)", name).groups())
        rtn = quantize_model_rtn(copy.deepcopy(fp), bits, group)
        rtn_ppl, rtn_acc = evaluate(rtn, loader)
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(rtn, tmp, bits, group)
            rtn_size = file_size(Path(tmp))
        gap = rtn_ppl - fp_ppl
        rows.append(f"| RTN | {name} | {rtn_ppl:.3f} | {100 * rtn_acc:.1f} | 0% | {rtn_size / 1024:.0f} KiB "
                    f"({rtn_size / fp16_size:.2f}x) |")
        for label, folder in zip(("Block-AP", "Block-AP + E2E-QP"), folders.split(","), strict=False):
            if not folder or not Path(folder).exists():
                continue
            ppl, acc = evaluate(load_quantized(folder), loader)
            recovered = (rtn_ppl - ppl) / gap if gap > 0 else float("nan")
            rows.append(f"| {label} | {name} | {ppl:.3f} | {100 * acc:.1f} | {100 * recovered:.0f}% | "
                        f"{file_size(Path(folder)) / 1024:.0f} KiB ({file_size(Path(folder)) / fp16_size:.2f}x) |")
    table = "\n".join(lines + rows)
    print(table)
    print("\nRTN gap recovered = (ppl_RTN - ppl) / (ppl_RTN - ppl_FP).")
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
