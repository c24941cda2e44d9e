"""I&S-ViT's smooth optimization strategy (SOS, arXiv 2311.10126 Sec. 4.2): three stages of block-wise
reconstruction of a model wrapped by ``effitrain.methods.vit_ptq.quantize_vit``, in plain PyTorch.

Reconstruction units, in forward order: the weight layers before the blocks (patch embedding), each block,
the weight layers after them (the head). Each unit minimises ``sum_tokens ||unit(x) - y||^2`` averaged over
the rest (the official ``lp_loss``: squared error summed over dim 1) with Adam (wd 0) and a cosine decay to 0,
on random batches of the cached calibration activations. Only Linear/conv weights and biases are trained.

1. Stage one: weights FP, activations quantized (post-norm inputs per channel). Input **and** target are the
   FP model's input and output of the unit. Activation quantizers are initialised per unit on its FP input.
2. Stage two: ``reparameterize_model``: per-channel post-norm quantizers folded into the norms and the next
   Linears, layer-wise from then on (exact).
3. Stage three: weights quantized (percentile-MSE init at the unit's start), input = the **quantized**
   model's input of the unit, target = the FP model's output.

``reconstruction="single"`` is the one-stage baseline (layer-wise post-norm quantizers; weights and
activations quantized together; stage three's inputs and targets), ``"none"`` calibrates the quantizers unit
by unit without training (plain PTQ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from effitrain.methods.vit_ptq import (
    AttentionQuantizers,
    calibrate_weights,
    find_blocks,
    quantizers,
    reparameterize_model,
    set_quant_state,
    start_activation_calibration,
    trainable_parameters,
    weight_layers,
)
from torch import nn

RECONSTRUCTIONS = ("sos", "single", "none")
Progress = Callable[[str, int, int], None]  # (stage name, steps done, total steps)


class _Stop(Exception):
    pass


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(name, module)]: weight layers outside the blocks (before them: patch embedding; after: head) and the
    blocks, in registration order (the forward order of timm ViTs and iLLaMA)."""
    blocks = find_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    units, seen_blocks = [], False
    layers = {id(m) for m in weight_layers(model)}
    for name, module in model.named_modules():
        if name == prefix:
            seen_blocks = True
            units += [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]
        elif id(module) in layers and not name.startswith(prefix + "."):
            units.append((name, module))
    if not seen_blocks:
        raise ValueError("could not place the blocks among the model's modules.")
    return units


def _first_tensor(args: tuple) -> torch.Tensor:
    if not args or not torch.is_tensor(args[0]):
        raise ValueError("a reconstruction unit must take its batch as first positional argument.")
    return args[0]


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
            output: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
    """Run ``model`` on ``images`` and record ``unit``'s first input (and its output when ``output``), stopping
    the forward there. Returns (inputs [N, ...], outputs or None, the other args, kwargs) on CPU / as seen."""
    inputs, outputs, extra = [], [], {}

    def pre_hook(module, args, kwargs):
        inputs.append(_first_tensor(args).detach().cpu())
        extra["args"], extra["kwargs"] = args[1:], kwargs
        if not output:
            raise _Stop

    def post_hook(module, args, kwargs, out):
        outputs.append(out.detach().cpu())
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if output:
        handles.append(unit.register_forward_hook(post_hook, with_kwargs=True))
    try:
        for chunk in images.split(batch_size):
            try:
                model(chunk.to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if not inputs:
        raise ValueError("the unit was not reached by the model's forward.")
    return torch.cat(inputs), (torch.cat(outputs) if output else None), extra["args"], extra["kwargs"]


def unit_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dim 1 (tokens of a block's [B, N, C] output), averaged over the rest."""
    return (out - target).pow(2).sum(dim=1).mean()


@torch.no_grad()
def _eval_loss(unit, inputs, targets, args, kwargs, batch_size, device) -> float:
    total = 0.0
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
        total += float(unit_loss(unit(x.to(device), *args, **kwargs), y.to(device))) * len(x)
    return total / len(inputs)


class Step(NamedTuple):
    """One reconstruction step handed to the caller, which runs ``apply_step`` (or its own equivalent:
    ``loss.backward()``, ``optimizer.step()``, ``scheduler.step()``) before asking for the next one."""

    stage: str
    unit: str
    loss: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def apply_step(step: Step) -> None:
    step.optimizer.zero_grad(set_to_none=True)
    step.loss.backward()
    step.optimizer.step()
    step.scheduler.step()


def unit_steps(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, args: tuple, kwargs: dict, *,
               iters: int, batch_size: int, lr: float, device: torch.device, generator: torch.Generator,
               stage: str = "", name: str = "") -> Iterator[Step]:
    """Adam (wd 0) with cosine decay to 0 over ``iters`` steps on the unit's Linear/conv weights and biases:
    yields each step's loss (on a random batch of the cached pairs) for the caller to apply."""
    params = trainable_parameters(unit)
    frozen = [p for p in unit.parameters() if all(p is not q for q in params)]
    states = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / iters)))
    try:
        for _ in range(iters):
            idx = torch.randint(len(inputs), (batch_size,), generator=generator)
            with torch.enable_grad():
                loss = unit_loss(unit(inputs[idx].to(device), *args, **kwargs), targets[idx].to(device))
            yield Step(stage, name, loss, optimizer, schedule)
    finally:
        for p, state in zip(frozen, states, strict=True):
            p.requires_grad_(state)
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def reconstruct(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, args: tuple, kwargs: dict, *,
                iters: int, batch_size: int, lr: float, device: torch.device, generator: torch.Generator) -> None:
    """All of :func:`unit_steps`, applied."""
    for step in unit_steps(unit, inputs, targets, args, kwargs, iters=iters, batch_size=batch_size, lr=lr,
                           device=device, generator=generator):
        with torch.enable_grad():
            apply_step(step)


def _has_active_quantizer(unit: nn.Module, weights: bool) -> bool:
    layers = weight_layers(unit)
    active = any(layer.quant_input and layer.input_quant is not None for layer in layers)
    active |= weights and bool(layers)
    active |= any(getattr(m, "enabled", False) and isinstance(m, AttentionQuantizers) for m in unit.modules())
    return active


def stage_three_pairs(qmodel: nn.Module, fp_model: nn.Module, index: int, images: torch.Tensor, batch_size: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
    """Stage three's (inputs, targets, args, kwargs) of unit ``index``: the quantized model's input of the
    unit and the FP model's output of it."""
    q_unit = reconstruction_units(qmodel)[index][1]
    fp_unit = fp_model.get_submodule(reconstruction_units(qmodel)[index][0])
    inputs, _, _, _ = capture(qmodel, q_unit, images, batch_size, device, output=False)
    _, targets, args, kwargs = capture(fp_model, fp_unit, images, batch_size, device, output=True)
    return inputs, targets, args, kwargs


def _check(reconstruction: str, images: torch.Tensor, batch_size: int) -> None:
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={reconstruction!r} is not one of {RECONSTRUCTIONS}.")
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} calibration images is fewer than the batch size {batch_size}: use more "
                         "images or a smaller batch.")


def planned_steps(qmodel: nn.Module, reconstruction: str, iters: int) -> int:
    """How many steps :func:`isvit_steps` yields: ``iters`` per unit and stage, except stage-one units with
    nothing quantized (the patch embedding: FP weights, FP image input)."""
    if reconstruction == "none":
        return 0
    units = [u for _, u in reconstruction_units(qmodel)]
    if reconstruction == "single":
        return iters * len(units)
    active = sum(any(isinstance(m, AttentionQuantizers) or (getattr(m, "input_quant", None) is not None)
                     for m in u.modules()) for u in units)
    return iters * (active + len(units))


def isvit_steps(qmodel: nn.Module, fp_model: nn.Module, images: torch.Tensor, *, reconstruction: str = "sos",
                iters: int = 1000, batch_size: int = 64, lr: float = 4e-5, init_images: int = 256,
                device: torch.device | str = "cpu", seed: int = 0, stats: dict | None = None) -> Iterator[Step]:
    """The whole of I&S-ViT as a sequence of reconstruction steps (calibration, captures and stage two happen
    between them). The caller applies each step (``apply_step``, or a Lightning optimizer step) before
    asking for the next; ``stats`` (if given) receives per-stage seconds and per-unit losses.

    Raises:
        ValueError: an unknown ``reconstruction``, or fewer calibration images than ``batch_size``.
    """
    _check(reconstruction, images, batch_size)
    device = torch.device(device)
    qmodel.eval()
    fp_model.eval()
    fp_model.requires_grad_(False)
    qmodel.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    units = reconstruction_units(qmodel)
    fp_units = [(name, fp_model.get_submodule(name)) for name, _ in units]  # same names, FP modules
    stats = {} if stats is None else stats
    stats.update({"seconds": {}, "units": [u for u, _ in units], "loss": {}})
    train_iters = 0 if reconstruction == "none" else iters

    def stage(name: str, weights: bool, fp_inputs: bool, steps: int) -> Iterator[Step]:
        start = time.perf_counter()
        set_quant_state(qmodel, weights=weights, activations=True)
        losses = stats["loss"].setdefault(name, [])
        for (unit_name, unit), (_, fp_unit) in zip(units, fp_units, strict=True):
            x_fp, targets, args, kwargs = capture(fp_model, fp_unit, images, batch_size, device, output=True)
            inputs = x_fp if fp_inputs else capture(qmodel, unit, images, batch_size, device, output=False)[0]
            if weights:
                calibrate_weights(unit)
            if name != "stage3":  # stage three keeps stage one's (reparameterised) activation quantizers
                start_activation_calibration(unit)
                with torch.no_grad():
                    unit(inputs[:init_images].to(device), *args, **kwargs)
            before = _eval_loss(unit, inputs, targets, args, kwargs, batch_size, device)
            if steps and _has_active_quantizer(unit, weights):
                yield from unit_steps(unit, inputs, targets, args, kwargs, iters=steps, batch_size=batch_size,
                                      lr=lr, device=device, generator=generator, stage=name, name=unit_name)
            losses.append({"unit": unit_name, "before": before,
                           "after": _eval_loss(unit, inputs, targets, args, kwargs, batch_size, device)})
        stats["seconds"][name] = time.perf_counter() - start

    if reconstruction == "sos":
        yield from stage("stage1", weights=False, fp_inputs=True, steps=train_iters)
        start = time.perf_counter()
        reparameterize_model(qmodel)
        stats["seconds"]["stage2"] = time.perf_counter() - start
        yield from stage("stage3", weights=True, fp_inputs=False, steps=train_iters)
    else:
        yield from stage("single" if reconstruction == "single" else "calibration", weights=True,
                         fp_inputs=False, steps=train_iters)
    set_quant_state(qmodel, weights=True, activations=True)
    uncalibrated = [q for q in quantizers(qmodel) if hasattr(q, "initialized") and not bool(q.initialized)]
    if uncalibrated:
        raise RuntimeError(f"{len(uncalibrated)} quantizers were never reached during calibration.")


def run_isvit(qmodel: nn.Module, fp_model: nn.Module, images: torch.Tensor, *, reconstruction: str = "sos",
              iters: int = 1000, batch_size: int = 64, lr: float = 4e-5, init_images: int = 256,
              device: torch.device | str = "cpu", seed: int = 0, progress: Progress | None = None) -> dict:
    """Calibrate and reconstruct ``qmodel`` (wrapped by ``quantize_vit``) against ``fp_model`` (an untouched
    copy of the FP model) on calibration ``images``: every step of :func:`isvit_steps`, applied. Returns
    per-stage seconds and per-unit losses.
    """
    stats: dict = {}
    total = planned_steps(qmodel, reconstruction, iters)
    for done, step in enumerate(isvit_steps(qmodel, fp_model, images, reconstruction=reconstruction, iters=iters,
                                            batch_size=batch_size, lr=lr, init_images=init_images, device=device,
                                            seed=seed, stats=stats), start=1):
        with torch.enable_grad():
            apply_step(step)
        if progress is not None:
            progress(step.stage, done, total)
    return stats
