"""Block-AP, the first phase of EfficientQAT (Chen et al., arXiv 2407.11062, Sec. 3.2): the parts of the
block-wise training of all parameters, in plain PyTorch. The training loop itself lives in the recipe
(``lightning_modules/efficientqat_block_ap.py``).

Blocks are trained in order with two activation caches of the calibration set:

* ``fp``: the input of block k in the full-precision model; replaced in place by FP block k's output,
  which is block k's **target**;
* ``quant``: the input of block k in the model whose blocks 0..k-1 are already quantized (equal to ``fp`` at
  block 0); the block's **input** during training, then replaced by the quantized block's output.

Block k minimises ``MSE(quantized_block_k(quant), FP_block_k(fp))`` over all its Linear weights, its norm
weights, and the quantizers' step sizes and zero points (Eq. 3). The caches live on CPU (or in a file on
disk), so the accelerator holds one block's training state and one batch of activations, whatever the depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from effitrain.methods.quant_surgery import decoder_blocks, named_linears, replace_module
from effitrain.methods.quantization import FakeQuantLinear, QuantLinear
from torch import nn


class ActivationCache:
    """``n`` activations of shape [seq_len, hidden], in CPU memory or in a memory-mapped file on disk.

    Args:
        n: number of calibration samples.
        seq_len: tokens per sample.
        hidden: hidden size.
        dtype: storage dtype (fp16 as in the official code; computation is in the block's dtype).
        path: a file to memory-map (the ``--off_load_to_disk`` option); None keeps the cache in RAM.
    """

    def __init__(self, n: int, seq_len: int, hidden: int, dtype: torch.dtype = torch.float16,
                 path: str | Path | None = None) -> None:
        shape = (n, seq_len, hidden)
        if path is None:
            self.data = torch.zeros(shape, dtype=dtype)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            numel = n * seq_len * hidden
            self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self.path = path

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, index: slice | torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return self.data[index].to(device=device, dtype=dtype, non_blocking=True)

    def put(self, index: slice | torch.Tensor, value: torch.Tensor) -> None:
        self.data[index] = value.detach().to("cpu", self.data.dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def copy_from(self, other: ActivationCache) -> None:
        self.data.copy_(other.data)


class _StopForward(Exception):
    pass


def block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 4.54) or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[torch.Tensor], cache: ActivationCache) -> dict:
    """Run the embedding of each batch of ``input_ids`` [B, T] and store the first block's input in ``cache``.

    Returns the keyword arguments the first block received for a batch of one sample (rotary position
    embeddings, causal mask, positions), to be reused for every block and batch: they do not depend on the
    tokens and broadcast over the batch.
    """
    first = decoder_blocks(model)[0]
    seen: dict = {}

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    block_kwargs = None
    try:
        start = 0
        for input_ids in batches:
            if block_kwargs is None:  # the kwargs of a one-sample batch
                try:
                    model(input_ids=input_ids[:1], use_cache=False)
                except _StopForward:
                    block_kwargs = seen["kwargs"]
            try:
                model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
            n = seen["hidden"].shape[0]
            if start + n > len(cache):
                raise ValueError(f"More calibration samples than the cache holds ({len(cache)}).")
            cache.put(slice(start, start + n), seen["hidden"])
            start += n
    finally:
        handle.remove()
    if start != len(cache):
        raise ValueError(f"The calibration batches gave {start} samples; the cache expects {len(cache)}.")
    block_kwargs.pop("past_key_values", None)
    block_kwargs.pop("past_key_value", None)
    block_kwargs["use_cache"] = False
    return block_kwargs


def move_kwargs(kwargs: dict, device: torch.device | str, dtype: torch.dtype) -> dict:
    """Block kwargs on ``device``; floating tensors (rotary cos/sin, additive masks) cast to ``dtype``."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def propagate(block: nn.Module, cache: ActivationCache, kwargs: dict, batch_size: int,
              device: torch.device | str, dtype: torch.dtype) -> None:
    """Replace every activation of ``cache`` by the block's output for it (in batches, in place)."""
    for start in range(0, len(cache), batch_size):
        index = slice(start, min(start + batch_size, len(cache)))
        cache.put(index, block_output(block(cache.get(index, device, dtype), **kwargs)))


def wrap_block(block: nn.Module, bits: int, group_size: int, keep_zeros: bool = False) -> None:
    """Replace every Linear of the block by a ``FakeQuantLinear`` with min/max-initialized s and z.

    ``keep_zeros``: each layer keeps its current zeros (a pruned model's mask) exactly zero through training
    and packing (``FakeQuantLinear``'s ``mask``).
    """
    for name, linear in list(named_linears(block)):
        mask = (linear.weight.detach() != 0) if keep_zeros else None
        replace_module(block, name, FakeQuantLinear(linear, bits, group_size, mask))


def trainable_groups(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(step sizes and zero points, weights): the Linear weights and the norm weights of the block.

    As in the official code, every parameter named ``*weight`` trains with the weight learning rate and the
    quantizer parameters with the quantizer learning rate; biases are frozen buffers.
    """
    quant, weights = [], []
    for name, p in block.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("scale", "zero_point"):
            quant.append(p)
        elif leaf == "weight":
            weights.append(p)
        else:
            p.requires_grad_(False)
    for p in quant + weights:
        p.requires_grad_(True)
    return quant, weights


def finalize_block(block: nn.Module) -> None:
    """Pack every ``FakeQuantLinear`` of the block into a ``QuantLinear`` (the codes of its current s, z, W)."""
    for name, module in list(block.named_modules()):
        if isinstance(module, FakeQuantLinear):
            replace_module(block, name, module.to_quant_linear())
    for p in block.parameters():
        p.requires_grad_(False)


def block_mse(block: nn.Module, inputs: ActivationCache, targets: ActivationCache, kwargs: dict,
              batch_size: int, device: torch.device | str, dtype: torch.dtype) -> float:
    """Mean squared error of the block's output on ``inputs`` against ``targets`` over the whole cache."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            index = slice(start, min(start + batch_size, len(inputs)))
            out = block_output(block(inputs.get(index, device, dtype), **kwargs))
            total += torch.nn.functional.mse_loss(out, targets.get(index, device, dtype), reduction="sum").item()
            count += out.numel()
    return total / count


def is_quantized(block: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in block.modules())


ProgressFn = Callable[[int, dict], None]
