"""Model surgery for weight-only quantization: find the decoder blocks of a causal LM and swap their Linears for
packed ``QuantLinear`` layers (round-to-nearest, EfficientQAT Sec. 3: embeddings, norms and the LM head stay
in full precision)."""

from __future__ import annotations

from collections.abc import Iterator

from effitrain.methods.quantization import QuantLinear
from torch import nn

_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (``model.layers`` for LLaMA/Mistral/Qwen)."""
    for path in _BLOCK_PATHS:
        module: nn.Module | None = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"Could not find the decoder blocks of {type(model).__name__}: looked for {', '.join(_BLOCK_PATHS)}."
    )


def named_linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The plain nn.Linear layers inside a module (q/k/v/o and gate/up/down in a LLaMA block)."""
    return ((name, m) for name, m in module.named_modules() if type(m) is nn.Linear)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_block_rtn(block: nn.Module, bits: int, group_size: int) -> None:
    """Replace every Linear of a block by its round-to-nearest packed ``QuantLinear`` (in place)."""
    for name, linear in list(named_linears(block)):
        replace_module(block, name, QuantLinear.from_linear(linear, bits, group_size))


def quantize_model_rtn(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """RTN: every Linear inside the decoder blocks becomes a packed ``QuantLinear``; embeddings, norms and the
    LM head stay in full precision (Sec. 3). Returns the same model, changed in place."""
    for block in decoder_blocks(model):
        quantize_block_rtn(block, bits, group_size)
    return model

