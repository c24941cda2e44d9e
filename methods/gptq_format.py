"""Saving and loading packed low-bit causal LMs in the Hugging Face folder layout (``config.json`` with a
``quantization_config`` + ``model.safetensors``), GPTQ "v2" tensor names (``qweight``, ``qzeros``, ``scales``,
``g_idx``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from effitrain.methods.packing import codes_per_word
from effitrain.methods.quant_surgery import decoder_blocks, named_linears, replace_module
from effitrain.methods.quantization import QuantLinear
from torch import nn

#: The weights file of a 3-bit folder. Its layout (10 codes per int32 word) is EfficientQAT's own, which GPTQ
#: loaders would misread; under this name they find no weights and stop with an error instead of loading a
#: model with random block weights.
EFFICIENTQAT_WEIGHTS = "efficientqat_model.safetensors"
GPTQ_WEIGHTS = "model.safetensors"


def weights_name(bits: int) -> str:
    return EFFICIENTQAT_WEIGHTS if bits == 3 else GPTQ_WEIGHTS


def quantization_config(bits: int, group_size: int, modules_in_block: list[str]) -> dict:
    """The ``quantization_config`` written to config.json.

    2/4/8-bit tensors have the GPTQ layout in its v2 form (zero points without the v1 ``-1`` offset), read by
    transformers' GPTQ integration (optimum + GPTQModel) and by GPTQModel: ``quant_method: gptq``,
    ``checkpoint_format: gptq_v2`` and ``modules_in_block_to_quantize`` as transformers/optimum expect it, a
    list of lists of Linear names inside one decoder block. 3-bit uses EfficientQAT's own 10-codes-per-word
    layout, marked ``quant_method: efficientqat`` and stored under ``EFFICIENTQAT_WEIGHTS``.
    """
    return {
        "quant_method": "efficientqat" if bits == 3 else "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "gptq_v2",
        "modules_in_block_to_quantize": [list(modules_in_block)],
        "codes_per_int32": codes_per_word(bits),
    }


def save_quantized(model: nn.Module, folder: str | Path, bits: int, group_size: int) -> Path:
    """Write ``config.json`` (with ``quantization_config``) and the packed weights: ``model.safetensors`` at
    2/4/8 bits (GPTQ v2, loadable by transformers and GPTQModel), ``EFFICIENTQAT_WEIGHTS`` at 3 bits (which only
    :func:`load_quantized` reads).

    Scales are stored in fp16, codes as int32, the full-precision rest (embeddings, norms, head) in fp16.
    Tied tensors (e.g. a tied LM head) are stored once.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and ptr in seen:
            continue
        seen.add(ptr)
        tensor = tensor.detach().cpu()
        state[key] = (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
    for stale in (GPTQ_WEIGHTS, EFFICIENTQAT_WEIGHTS):  # a folder holds one format
        (folder / stale).unlink(missing_ok=True)
    save_file(state, str(folder / weights_name(bits)), metadata={"format": "pt"})
    config = model.config
    names = [name for name, module in decoder_blocks(model)[0].named_modules() if isinstance(module, QuantLinear)]
    config.quantization_config = quantization_config(bits, group_size, names)
    try:
        config.save_pretrained(folder)
    finally:
        del config.quantization_config
    return folder


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a folder written by :func:`save_quantized` into a transformers model with ``QuantLinear`` blocks.

    Full-precision tensors are cast to ``dtype``; scales stay fp16 (cast at each forward).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    qcfg = raw.get("quantization_config")
    if not qcfg or "bits" not in qcfg:
        raise ValueError(f"{folder}/config.json has no quantization_config with 'bits': not a packed model.")
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for block in decoder_blocks(model):
        for name, linear in list(named_linears(block)):
            layer = QuantLinear(linear.in_features, linear.out_features, qcfg["bits"], qcfg["group_size"],
                                bias=linear.bias is not None)
            replace_module(block, name, layer)
    weights = folder / weights_name(qcfg["bits"])
    state = load_file(str(weights))
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in own:
            raise ValueError(f"Unexpected tensor {key!r} in {weights}.")
        if tensor.is_floating_point() and not key.endswith(".scales"):
            state[key] = tensor.to(dtype)
    missing, _ = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied = [k for k in missing if k not in state and not _is_tied(model, k)]
    if untied:
        raise ValueError(f"{weights} lacks {untied[:5]}.")
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    """A missing key is fine when it names the same tensor as a loaded one (tied embeddings)."""
    target = model.get_parameter(key) if key in dict(model.named_parameters(remove_duplicate=False)) else None
    return target is not None and any(
        p is target for name, p in model.named_parameters() if name != key
    )
