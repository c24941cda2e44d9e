"""Paper-scale configs checked without GPUs: each ``configs/*/full/*.yaml`` recipe is built on the meta device
with the real architecture (no weights are read or allocated), and its parameter counts, optimizer groups and
a per-GPU memory estimate under the config's strategy and device count are printed as a table.

    python benchmarks/paper_scale_plan.py            # all paper-scale configs
    python benchmarks/paper_scale_plan.py configs/moslora/full/moslora_llama3_8b_commonsense.yaml

There is no hub access here, so the architectures are written below (from the models' published
``config.json``): LLaMA-2-7B, LLaMA-3-8B; the image models are this project's timm registrations
(iLLaMA, Mamba-R) and timm's ResNet-50. A config's ``pretrained`` hub name or folder selects the
architecture; the recipe is built with ``pretrained: null`` and that config.

Memory per GPU (GiB) = weights + gradients + optimizer state + method state, each divided by the device
count under a sharded strategy (FSDP2, FSDP, DeepSpeed) and whole on every GPU under DDP / one device.
Weights take the dtype the recipe keeps them in (``dtype: bfloat16`` loads the base in bf16; trainable
adapter / UIO tensors stay fp32; ``32-true`` / ``bf16-mixed`` keep fp32 parameters), gradients the
trainable parameters' dtype, AdamW/MoFO state 2 x fp32 per trainable entry, SGD momentum 1 x fp32. Method
state: MoFO's scratch (3 fp32 buffers of up to 2^25 entries), UniPTS's frozen teacher copy, Block-AP's one
trained block. Activations, the CUDA context and allocator slack are not included: the estimate is the
model state a run must fit before activations.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_XL = dict(GPT2, n_embd=1600, n_layer=48, n_head=25)
#: a config's ``pretrained`` (or a distillation ``teacher``) -> the architecture it names
ARCHITECTURES = {
    "gpt2": GPT2,
    "gpt2-xl": GPT2_XL,
    "meta-llama/Llama-2-7b-hf": LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": LLAMA3_8B,
    "artifacts/llama2_7b_w2g64_block_ap": LLAMA2_7B,  # E2E-QP starts from the Block-AP output of LLaMA-2-7B
}
SHARDED = ("FSDP2Strategy", "ModelParallelStrategy", "FSDPStrategy", "fsdp", "deepspeed")


@dataclass
class Plan:
    config: str
    recipe: str
    strategy: str
    devices: int
    total: int
    trainable: int
    groups: str
    weights: float
    grads: float
    optimizer: float
    method: float

    @property
    def per_gpu(self) -> float:
        return self.weights + self.grads + self.optimizer + self.method


def _load(path: Path) -> dict:
    default = yaml.safe_load((REPO / "configs/trainer/default.yaml").read_text())
    config = yaml.safe_load(path.read_text())
    trainer = {**default["trainer"], **config.get("trainer", {})}
    return {"trainer": trainer, "model": config["model"]}


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _instantiate(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return _class(value["class_path"])(**{k: _instantiate(v) for k, v in value.get("init_args", {}).items()})
    return value


def _strategy_name(trainer: dict) -> str:
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, dict):
        return strategy["class_path"].rpartition(".")[2]
    return str(strategy)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, str]:
    """State bytes per trainable entry and a description of the groups (count, weight decay)."""
    per_entry = {"AdamW": 8, "Adam": 8, "MoFO": 8, "SGD": 4}.get(type(optimizer).__name__, 8)
    if type(optimizer).__name__ == "SGD" and not optimizer.defaults.get("momentum"):
        per_entry = 0
    groups = ", ".join(f"{sum(p.numel() for p in g['params']) / 1e6:.1f}M wd {g['weight_decay']:g}"
                       for g in optimizer.param_groups)
    return per_entry, f"{type(optimizer).__name__}: {len(optimizer.param_groups)} ({groups})"


def _efficientqat(path: Path, config: dict, trainer: dict) -> Plan:
    """EfficientQAT recipes load packed / calibrated models; their plan is computed on a meta LLaMA: Block-AP
    trains one decoder block (weights + per-group step sizes and zero points) at a time over an fp16 model;
    E2E-QP trains only the step sizes of a packed model (N-bit codes, fp16 embeddings / norms / head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = config["init_args"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[args["pretrained"]]))
    bits, group = args.get("bits", 2), args.get("group_size", 64)
    linears = {n: m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    quantized = sum(linears.values())
    total = sum(p.numel() for p in model.parameters())
    if "BlockAP" in config["class_path"]:
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        block_quant = sum(v for n, v in linears.items() if ".layers.0." in n) // group * 2  # step size + zero point
        trainable = block + block_quant
        weights = total * 2 + block_quant * 4  # the fp16 model; the trained block's quantizer in fp32
        return Plan(path.name, config["class_path"].rpartition(".")[2], _strategy_name(trainer),
                    int(trainer.get("devices") or 1), total, trainable, "AdamW per block: 2 (weights, quantizer)",
                    weights / GIB, trainable * 4 / GIB, trainable * 8 / GIB, block * 4 / GIB)
    scales = quantized // group
    other = total - quantized
    weights = quantized * bits / 8 + scales * 4 + scales * bits / 8 + other * 2  # codes, fp32 scales, zeros
    return Plan(path.name, config["class_path"].rpartition(".")[2], _strategy_name(trainer),
                int(trainer.get("devices") or 1), total, scales, "AdamW: 1 (step sizes, wd 0)",
                weights / GIB, scales * 4 / GIB, scales * 8 / GIB, 0.0)


def plan(path: str | Path) -> Plan:
    """Build the recipe of ``path`` on the meta device and estimate its per-GPU model state."""
    path = Path(path)
    loaded = _load(path)
    trainer, config = loaded["trainer"], loaded["model"]
    if "efficientqat" in config["class_path"]:
        return _efficientqat(path, config, trainer)
    args = dict(config["init_args"])
    optimizer_spec = args.pop("optimizer", None)
    args.pop("lr_scheduler", None)
    args.pop("export_dir", None)
    args.pop("merged_dir", None)
    dtype = getattr(torch, args["dtype"]) if args.get("dtype") else None
    if "pretrained" in args and args["pretrained"] in ARCHITECTURES:
        args["config"], args["pretrained"] = dict(ARCHITECTURES[args["pretrained"]]), None
    elif "model_name" in args:
        args["pretrained"] = None  # ImageNet / earlier-stage weights: the same architecture, initialised
    args = {k: _instantiate(v) for k, v in args.items()}
    cls = _class(config["class_path"])
    with torch.device("meta"):
        if args.get("teacher") in ARCHITECTURES:  # a teacher module of the named architecture, not a hub load
            from transformers import AutoConfig, AutoModelForCausalLM

            arch = dict(ARCHITECTURES[args["teacher"]])
            teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
            args["teacher"] = teacher.requires_grad_(False).eval()
        module = cls(**args)
        if getattr(module, "training_free", False):
            module.requires_grad_(False)  # pruning without training (Wanda, DSnoT): weights only
        if not any(p.requires_grad for p in module.parameters()):
            optimizer = None  # post-training recipes (I&S-ViT) build their optimizers inside, one unit at a time
        else:
            optimizer = (_class(optimizer_spec["class_path"])(module.param_groups(), **optimizer_spec.get("init_args", {}))
                         if optimizer_spec else torch.optim.AdamW(module.param_groups()))
    params = list(module.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    adapter = "adapter" in args or cls.__name__ == "UIOLM"

    def kept_dtype(p: torch.nn.Parameter) -> torch.dtype:
        if dtype is None or str(trainer.get("precision")) in ("32-true", "32"):
            return torch.float32
        # adapter / UIO tensors stay fp32 (peft's autocast_adapter_dtype; UIOLM.on_fit_start); a full fine-tune
        # trains the loaded bf16 tensors
        return torch.float32 if p.requires_grad and adapter else dtype

    strategy = _strategy_name(trainer)
    devices = int(trainer.get("devices") or 1) if str(trainer.get("devices")) != "auto" else 1
    shard = devices if any(s in strategy for s in SHARDED) else 1
    weights = sum(p.numel() * _bytes(kept_dtype(p)) for _, p in params)
    grads = sum(p.numel() * _bytes(kept_dtype(p)) for _, p in trainable)
    n_trainable = sum(p.numel() for _, p in trainable)
    per_entry, groups = _optimizer_bytes(optimizer) if optimizer is not None else (0, "none (post-training)")
    method = 0.0
    if type(optimizer).__name__ == "MoFO":
        method += 3 * 4 * min(1 << 25, max(p.numel() for _, p in trainable) // shard)  # step, |m|, flags buffers
    teacher = getattr(module, "teacher", None)
    if teacher is not None:
        method += sum(p.numel() * p.element_size() for p in teacher.parameters())  # a plain module per rank
    return Plan(path.name, cls.__name__, strategy, devices, sum(p.numel() for _, p in params), n_trainable, groups,
                weights / shard / GIB, grads / shard / GIB, n_trainable * per_entry / shard / GIB, method / GIB)


def full_configs() -> list[Path]:
    return sorted(REPO.glob("configs/*/full/*.yaml"))


def table(plans: list[Plan]) -> str:
    head = ("| config | recipe | strategy x devices | params | trainable | optimizer groups | weights | grads | "
            "optimizer | method | per GPU (GiB) |")
    rows = [head, "|" + "---|" * 11]
    for p in plans:
        rows.append(f"| {p.config} | {p.recipe} | {p.strategy} x {p.devices} | {p.total / 1e6:,.1f}M | "
                    f"{p.trainable / 1e6:,.2f}M ({100 * p.trainable / p.total:.2f}%) | {p.groups} | "
                    f"{p.weights:.2f} | {p.grads:.2f} | {p.optimizer:.2f} | {p.method:.2f} | {p.per_gpu:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="paper-scale configs (default: all)")
    paths = parser.parse_args().configs or full_configs()
    print(table([plan(p) for p in paths]))


if __name__ == "__main__":
    main()
