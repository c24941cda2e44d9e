"""Bits per weight of EfficientQAT's packed checkpoints against the formula N + (N+16)/g.

    python benchmarks/efficientqat_bits.py

A 4096 x 4096 Linear (Llama-2-7B's attention projections) and a 4096 -> 11008 MLP projection are packed at
each width/group size and written to a safetensors file; the bits per weight count qweight + qzeros +
scales (the formula's terms) and, separately, the whole file (with g_idx and the header).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from effitrain.methods.quantization import QuantLinear, average_bits
from safetensors.torch import save_file
from torch import nn


def main() -> None:
    torch.manual_seed(0)
    print("| layer | config | formula N+(N+16)/g | qweight+qzeros+scales | whole file (with g_idx) |")
    print("|---|---|---|---|---|")
    for in_f, out_f in ((4096, 4096), (4096, 11008)):
        linear = nn.Linear(in_f, out_f, bias=False)
        for bits, group in ((2, 64), (2, 128), (3, 128), (4, 128), (8, 128)):
            layer = QuantLinear.from_linear(linear, bits, group)
            core = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales)) * 8
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "layer.safetensors"
                save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
                whole = path.stat().st_size * 8
            n = in_f * out_f
            print(f"| {in_f}x{out_f} | w{bits}g{group} | {average_bits(bits, group):.4f} | {core / n:.4f} | "
                  f"{whole / n:.4f} |")


if __name__ == "__main__":
    main()
