"""Block-AP peak memory against the number of blocks: it should stay flat, because only one block's training
state is alive at a time and the activation caches have a fixed size (samples x tokens x hidden).

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/efficientqat_block_ap_memory.py [--depths 1 2 4 8]

(The fixed mmap threshold returns freed block-sized tensors to the OS; with glibc's dynamic threshold heap
fragmentation makes the CPU peak creep up with depth, an allocator effect rather than retained state.)

Each depth runs the Block-AP recipe (Lightning Trainer, CPU) in a fresh process on a random LLaMA with
hidden 512 / MLP 1536 (3.1M parameters, 12.6 MB fp32 per block) and 64 random 64-token samples. Reported:
the process's resident memory when training starts (model, made resident, + caches), the peak during training (``VmHWM``
after resetting it through /proc/self/clear_refs at the first step), and their difference: the training state
(one block's weights, gradients, AdamW moments, s and z, one batch of activations).
On a GPU the same recipe keeps only the current block on the device; there the difference is the device peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch, lightning as L
from pathlib import Path
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM
from effitrain.lightning_modules.efficientqat_block_ap import EfficientQATBlockAP

depth, folder = int(sys.argv[1]), sys.argv[2]

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB

class Data(L.LightningDataModule):
    block_size, tokenizer = 64, None
    def train_dataloader(self):
        ids = torch.randint(0, 256, (64, 64), generator=torch.Generator().manual_seed(0))
        return DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=8)

class Probe(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            self.start = status("VmRSS:")
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
    def on_train_end(self, trainer, module):
        self.peak = status("VmHWM:")

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=depth,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
LlamaForCausalLM(cfg).save_pretrained(folder)
model_mib = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) * 4 / 2**20
probe = Probe()
module = EfficientQATBlockAP(folder, bits=2, group_size=64, epochs_per_block=1)
for p in module.lm.parameters():  # make the (memory-mapped) weights resident, so "start" includes the model
    p.data = p.data.clone()
trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[probe])
trainer.fit(module, datamodule=Data())
print(json.dumps({"depth": depth, "model_mib": model_mib, "cache_mib": 2 * module.fp_cache.nbytes() / 2**20,
                  "start_mib": probe.start, "peak_mib": probe.peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="*", default=[1, 2, 4, 8])
    args = parser.parse_args()
    print("| blocks | model fp32 MiB | caches MiB | RSS at start MiB | peak MiB | peak - start MiB |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(depth), tmp], capture_output=True, text=True,
                                 check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {depth} | {r['model_mib']:.1f} | {r['cache_mib']:.1f} | {r['start_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['start_mib']:.1f} |")


if __name__ == "__main__":
    main()
