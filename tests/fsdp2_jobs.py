"""Recipes run under FSDP2 on 2 CPU processes (gloo), for tests/test_fsdp2.py; one launch runs them all.

Each job builds a recipe with a fixed seed, trains it a few optimizer steps on a fixed dataset (no shuffle:
the two ranks' per-step batches together are the 1-process batch of the same step), gathers the full
parameters and rank 0 saves them. A job that the recipe refuses records the error message instead.

    WORLD_SIZE=2 RANK=r LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/fsdp2_jobs.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

STEPS = 3
GLOBAL_BATCH = 4
TINY_LM = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=64)


class Tokens(Dataset):
    """Random token sequences (every label counts, so a per-rank token mean averages to the global one)."""

    def __init__(self, n: int = GLOBAL_BATCH * STEPS, length: int = 16):
        gen = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, TINY_LM["vocab_size"], (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Images(Dataset):
    def __init__(self, n: int = GLOBAL_BATCH * STEPS):
        gen = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def sgd(params):
    """For full-model recipes: Adam divides each entry by its own |g|, so entries whose gradient is only
    rounding noise (e.g. the key bias, which softmax ignores) move by ±lr whatever the noise; SGD's step is
    linear in the gradient, so equal weights show equal gradients."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)


def mofo(params):
    from effitrain.methods.mofo import MoFO

    return MoFO(params, lr=1e-2, weight_decay=0.1, fraction=0.15)


def build(name: str, root: str | None = None):
    """(module, dataset, callbacks, gradient_clip_val) of a job; the same on every rank and in 1 process."""
    torch.manual_seed(0)
    export = f"{root}/export" if root else None
    if name in ("causal_lm", "causal_lm_mofo", "causal_lm_mofo_resume"):
        from effitrain.lightning_modules.causal_lm import CausalLM

        optimizer = sgd if name == "causal_lm" else mofo
        return CausalLM(config=TINY_LM, optimizer=optimizer), Tokens(), [], 1.0
    if name == "causal_lm_export":  # an export at the end of fit: refused under FSDP2 before training
        from effitrain.lightning_modules.causal_lm import CausalLM

        return CausalLM(config=TINY_LM, optimizer=sgd, export_dir=export or "export"), Tokens(), [], 1.0
    if name == "moslora":
        from effitrain.lightning_modules.adapter_lm import AdapterCausalLM
        from effitrain.methods.moslora import MoSLoraConfig

        adapter = MoSLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        module = AdapterCausalLM(adapter=adapter, config=TINY_LM, optimizer=adamw)
        # B starts at zero: give it values so that the mixer gets gradients from the first step
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return module, Tokens(), [], None
    if name in ("illama", "mambar"):
        from effitrain.lightning_modules.image_classifier import ImageClassifier

        model = "test_illama" if name == "illama" else "test_mambar"
        return ImageClassifier(model_name=model, num_classes=10, optimizer=sgd), Images(), [], None
    if name == "uio":
        from effitrain.lightning_modules.uio_lm import UIOLM

        return (UIOLM(pretrained=None, config=TINY_LM, segment_length=8, num_memory_tokens=2, encoder_rank=4,
                      transfer_rank=4), Tokens(), [], None)
    if name in ("dynamic_sparsity", "sparsity_search"):
        from effitrain.callbacks.dynamic_sparsity import DynamicSparsity
        from effitrain.callbacks.sparsity_search import SparsitySearch
        from effitrain.lightning_modules.image_classifier import ImageClassifier

        callbacks = [DynamicSparsity(sparsity=0.5)] if name == "dynamic_sparsity" else [SparsitySearch()]
        return ImageClassifier(model_name="test_illama", num_classes=10, optimizer=adamw), Images(), callbacks, None
    raise KeyError(name)


def full_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (a collective under FSDP2: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.named_parameters()}


def fit(name: str, devices: int, strategy="auto", root: str | None = None, max_steps: int = STEPS,
        checkpoint_every: int | None = None, ckpt_path: str | None = None, export_dir: str | None = None):
    module, data, callbacks, clip = build(name, root)
    module.export_dir = export_dir
    if checkpoint_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=checkpoint_every,
                                                 save_top_k=-1, filename="{step}")]
    # the ranks take alternate samples in order, so together they see the 1-process batch of each step; the
    # stateful loader resumes mid-epoch where it stopped
    sampler = DistributedSampler(data, devices, int(os.environ.get("RANK", 0)), shuffle=False) if devices > 1 else None
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                        enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=clip, callbacks=callbacks, default_root_dir=root,
                        use_distributed_sampler=False)
    trainer.fit(module, StatefulDataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler),
                ckpt_path=ckpt_path)
    return module, trainer


JOBS = ["causal_lm_export", "causal_lm", "causal_lm_mofo", "moslora", "illama", "mambar", "uio", "dynamic_sparsity", "sparsity_search"]


def main(out: Path) -> None:
    from effitrain.lightning_modules.sharding import FSDP2Strategy

    torch.set_num_threads(1)
    results = {}
    for name in JOBS:
        try:
            module, trainer = fit(name, 2, FSDP2Strategy(), root=str(out / name))
        except ValueError as err:
            results[name] = str(err)
            continue
        results[name] = full_parameters(module)
    # save after 2 of 3 steps (mid-epoch: 3 batches an epoch), then resume in a new trainer to step 3
    name, root = "causal_lm_mofo_resume", str(out / "causal_lm_mofo_resume")
    fit(name, 2, FSDP2Strategy(), root=root, max_steps=2, checkpoint_every=2)
    module, _ = fit(name, 2, FSDP2Strategy(), root=root, ckpt_path=f"{root}/ckpt/step=2.ckpt")
    results[name] = full_parameters(module)
    # a consolidated checkpoint (rank 0 writes one file) after 2 steps, for a 1-process export
    root = str(out / "consolidated")
    fit("causal_lm_mofo", 2, FSDP2Strategy(save_distributed_checkpoint=False), root=root, max_steps=2,
        checkpoint_every=2)
    results["consolidated"] = f"{root}/ckpt/step=2.ckpt"
    if torch.distributed.get_rank() == 0:
        torch.save(results, out / "fsdp2.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
