"""Fake-quantized vision transformers for I&S-ViT (arXiv 2311.10126; official code zysxmu/IaS-ViT ``quant/``):
the layer wrappers, the quantized attention twins, the stage-two reparameterisation (Sec. 4.2, RepQ-ViT style)
and the safetensors format of a quantized model.

What is quantized (as the official code): every Linear/conv weight and input, and both inputs of the two
attention matmuls (q, k; probabilities, v). The image input, LayerNorm/RMSNorm, softmax and GELU/SiLU stay in
floating point. The inputs of ``qkv`` and ``fc1`` (after a norm) are quantized per channel in stage one.

The wrappers keep the wrapped layer's ``weight`` and ``bias`` Parameters (same names in the state dict); an
attention module is replaced by a twin that reuses its Linears and runs the attention explicitly so that the
matmul inputs can be quantized. timm's ``Attention`` has its twin here; other attention classes plug in through
``quantize_vit(..., twins={cls: factory})``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from effitrain.methods.vit_quantizers import (
    WEIGHT_PERCENTILES,
    Log2Quantizer,
    SULQuantizer,
    UniformQuantizer,
    check_bits,
    post_softmax_quantizer,
)
from torch import nn

QUANTIZERS = (UniformQuantizer, Log2Quantizer, SULQuantizer)


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------
class _QuantWeightLayer(nn.Module):
    """Shared part of QLinear / QConv2d: the weight quantizer (per output channel or per tensor) and an
    optional input quantizer; ``quant_weight`` / ``quant_input`` switch them."""

    def _setup(self, layer: nn.Module, w_bits: int, a_bits: int | None, weight_channel_wise: bool,
               input_channels: int | None) -> None:
        self.weight = layer.weight
        self.bias = layer.bias
        out_channels = layer.weight.shape[0]
        self.weight_quant = UniformQuantizer(w_bits, out_channels if weight_channel_wise else None, channel_dim=0,
                                             percentiles=WEIGHT_PERCENTILES)
        self.input_quant = None if a_bits is None else UniformQuantizer(a_bits, input_channels)
        self.quant_weight, self.quant_input = False, False

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.quant_weight else self.weight

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.quant_input and self.input_quant is not None else x


class QLinear(_QuantWeightLayer):
    """A Linear with fake-quantized weight and input.

    Args:
        linear: the layer to wrap (its weight and bias Parameters are reused).
        w_bits, a_bits: weight and input code widths.
        weight_channel_wise: one weight scale per output row (else per tensor).
        input_channel_wise: one input scale per input channel (the post-norm inputs in stage one).
    """

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, weight_channel_wise: bool = True,
                 input_channel_wise: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear, w_bits, a_bits, weight_channel_wise, linear.in_features if input_channel_wise else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w={self.quant_weight}, a={self.quant_input}"


class QConv2d(_QuantWeightLayer):
    """A Conv2d with a fake-quantized weight; the input (the image, for a patch embedding) stays FP."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, weight_channel_wise: bool = True) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv2d supports zero padding only, got padding_mode={conv.padding_mode!r}.")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._setup(conv, w_bits, None, weight_channel_wise, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class AttentionQuantizers(nn.Module):
    """The quantizers of the two attention matmuls: ``q``, ``k``, ``v`` uniform per tensor, ``probs`` the
    post-softmax quantizer (SULQ, log2 or uniform). ``enabled`` switches all four."""

    def __init__(self, a_bits: int, post_softmax: str) -> None:
        super().__init__()
        self.q, self.k, self.v = UniformQuantizer(a_bits), UniformQuantizer(a_bits), UniformQuantizer(a_bits)
        self.probs = post_softmax_quantizer(post_softmax, a_bits)
        self.enabled = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q^ k^T * scale + bias), quantized, times v^ (all heads: [B, H, N, d])."""
        probs = self.probabilities(q, k, scale, bias)
        return self.matmul_v(probs, v)

    def scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """q^ k^T * scale (the first matmul, on quantized inputs)."""
        if self.enabled:
            q, k = self.q(q), self.k(k)
        return (q @ k.transpose(-2, -1)) * scale

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, scale: float,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.scores(q, k, scale)
        return (scores if bias is None else scores + bias).softmax(dim=-1)

    def matmul_v(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            probs, v = self.probs(probs), self.v(v)
        return probs @ v


def _mask_bias(n: int, like: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    bias = None
    if is_causal:
        bias = torch.full((n, n), float("-inf"), device=like.device, dtype=like.dtype).triu(1)
    if attn_mask is not None:
        extra = (torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill(~attn_mask, float("-inf"))
                 if attn_mask.dtype == torch.bool else attn_mask.to(like.dtype))
        bias = extra if bias is None else bias + extra
    return bias


class QuantTimmAttention(nn.Module):
    """Twin of ``timm.models.vision_transformer.Attention`` with quantized qkv/proj and matmul inputs.

    It reuses the wrapped module's ``qkv``, ``proj``, norms and gate (same state-dict names plus the
    ``quant`` quantizers) and has the same ``forward(x, attn_mask=None, is_causal=False)``.
    """

    def __init__(self, attn: nn.Module, w_bits: int, a_bits: int, post_softmax: str,
                 weight_channel_wise: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv = QLinear(attn.qkv, w_bits, a_bits, weight_channel_wise, input_channel_wise=True)
        self.proj = QLinear(attn.proj, w_bits, a_bits, weight_channel_wise)
        gate = getattr(attn, "gate", None)
        self.gate = None if gate is None else QLinear(gate, w_bits, a_bits, weight_channel_wise)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.quant = AttentionQuantizers(a_bits, post_softmax)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        probs = self.attn_drop(self.quant.probabilities(q, k, self.scale, _mask_bias(N, q, attn_mask, is_causal)))
        x = self.quant.matmul_v(probs, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def timm_twins() -> dict[type, Callable[..., nn.Module]]:
    from timm.models.vision_transformer import Attention

    return {Attention: QuantTimmAttention}


# ------------------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------------------
def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def find_blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks` list of transformer blocks: I&S-ViT quantizes "
                         "vision transformers (timm ViT/DeiT, iLLaMA).")
    return blocks


def quantize_vit(model: nn.Module, w_bits: int, a_bits: int, post_softmax: str = "sulq",
                 weight_channel_wise: bool = True, post_norm_channel_wise: bool = True,
                 twins: dict[type, Callable[..., nn.Module]] | None = None) -> nn.Module:
    """Wrap a ViT in place: attention modules by their twins, every other Linear by ``QLinear`` (inputs of
    ``qkv``/``fc1``-like layers after a norm per channel when ``post_norm_channel_wise``: SOS stage one), conv
    layers by ``QConv2d``. All quantizers start disabled
    and uncalibrated (``set_quant_state`` and the SOS stages switch them on).

    Raises:
        ValueError: bits outside 2-8, an unknown post-softmax quantizer, or a model without attention blocks.
    """
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    post_softmax_quantizer(post_softmax, a_bits)  # validates the kind
    twins = {**timm_twins(), **(twins or {})}
    find_blocks(model)
    attentions = [(n, m) for n, m in model.named_modules() if type(m) in twins]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no attention module of a known type "
                         f"({', '.join(t.__name__ for t in twins)}): nothing for I&S-ViT to quantize. Pass "
                         "`twins={YourAttention: factory}` for another attention class.")
    for name, module in attentions:
        twin = twins[type(module)](module, w_bits, a_bits, post_softmax, weight_channel_wise)
        if not post_norm_channel_wise:
            twin.qkv.input_quant = UniformQuantizer(a_bits)
        replace_module(model, name, twin)
    post_norm = {f"{n}.{c}" for n, _ in post_norm_pairs(model) for c in _consumer_names(model.get_submodule(n))}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            replace_module(model, name, QLinear(module, w_bits, a_bits, weight_channel_wise,
                                                input_channel_wise=post_norm_channel_wise and name in post_norm))
        elif type(module) is nn.Conv2d:
            replace_module(model, name, QConv2d(module, w_bits, weight_channel_wise))
    return model


def _consumer_names(block: nn.Module) -> list[str]:
    """Linears fed by a block's second norm: ``mlp.fc1`` (GELU MLP) or ``mlp.fc1_g``/``mlp.fc1_x`` (SwiGLU)."""
    mlp = getattr(block, "mlp", None)
    names = [n for n in ("fc1", "fc1_g", "fc1_x") if isinstance(getattr(mlp, n, None), (nn.Linear, QLinear))]
    return [f"mlp.{n}" for n in names]


def post_norm_pairs(model: nn.Module) -> list[tuple[str, list[tuple[nn.Module, list[nn.Module]]]]]:
    """Per block: (block name, [(norm1, [attn.qkv]), (norm2, [mlp.fc1] or [mlp.fc1_g, mlp.fc1_x])])."""
    out = []
    blocks = find_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    for i, block in enumerate(blocks):
        pairs = []
        if hasattr(block, "norm1") and hasattr(getattr(block, "attn", None), "qkv"):
            pairs.append((block.norm1, [block.attn.qkv]))
        if hasattr(block, "norm2") and _consumer_names(block):
            pairs.append((block.norm2, [block.get_submodule(n) for n in _consumer_names(block)]))
        out.append((f"{prefix}.{i}", pairs))
    return out


def quantizers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, QUANTIZERS)]


def weight_layers(module: nn.Module) -> list[_QuantWeightLayer]:
    return [m for m in module.modules() if isinstance(m, _QuantWeightLayer)]


def set_quant_state(module: nn.Module, weights: bool, activations: bool) -> None:
    """Switch weight and activation (layer inputs and attention matmul inputs) quantization of a module."""
    for layer in weight_layers(module):
        layer.quant_weight = weights
        layer.quant_input = activations
    for m in module.modules():
        if isinstance(m, AttentionQuantizers):
            m.enabled = activations


def start_activation_calibration(module: nn.Module) -> None:
    """Every activation quantizer of ``module`` initialises itself on the next tensor it sees."""
    weight_quants = {id(layer.weight_quant) for layer in weight_layers(module)}
    for q in quantizers(module):
        if id(q) not in weight_quants:
            q.calibrating = True


def calibrate_weights(module: nn.Module) -> None:
    """Percentile-MSE initialisation of every weight quantizer of ``module`` on the current weights."""
    for layer in weight_layers(module):
        layer.weight_quant.calibrate(layer.weight)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Only Linear/conv weights and biases (Sec. 4.2: norms and quantizer parameters stay frozen)."""
    params = []
    for layer in weight_layers(module):
        params += [p for p in (layer.weight, layer.bias) if p is not None]
    return params


# ------------------------------------------------------------------------------------------------------------
# Stage two: reparameterisation of per-channel post-norm quantizers (RepQ-ViT, Sec. 4.2)
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reparameterize(norm: nn.Module, consumers: list[QLinear]) -> None:
    """Fold the per-channel input quantizer of ``consumers`` (which read ``norm``'s output) into ``norm`` and
    their weights, and make the quantizer one scale for the layer.

    With channel scales s and zero points z, ``s~ = mean(s)``, ``z~ = round(mean(z))``, ``r = s / s~`` and
    ``b = s~ (z~ - z)`` (= ``-z s / r + z~ s~``, the paper's form):

    * LayerNorm: ``gamma <- gamma / r``, ``beta <- beta / r - b``; the quantizer becomes (s~, z~).
    * Linear: ``W[:, c] <- r_c W[:, c]``, ``bias <- bias + W_new b``, so W x = W_new (x / r - b) + W_new b.

    z~ is rounded (the paper keeps the real mean): then ``x'/s~ + z~ = x/s + z`` exactly, so the quantized
    values are unchanged too, not only the FP function.

    RMSNorm has no bias, so the offset ``-b`` cannot be folded: only r is (``gamma <- gamma / r`` and the
    Linear's columns), the scale becomes layer-wise s~ and the zero points stay per channel (integers added
    before the clamp), which is still exact.
    """
    quant = consumers[0].input_quant
    if quant is None or quant.num_channels is None or not bool(quant.initialized):
        raise ValueError("reparameterize needs a calibrated per-channel input quantizer (stage one first).")
    s, z = quant.scale.clone(), quant.zero_point.clone()
    s_t = s.mean()
    r = s / s_t
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"{type(norm).__name__} has no affine weight to fold the channel scales into.")
    has_offset = getattr(norm, "bias", None) is not None
    z_t = z.mean().round() if has_offset else None
    b = s_t * (z_t - z) if has_offset else torch.zeros_like(s)
    weight.div_(r.to(weight.dtype))
    if has_offset:
        norm.bias.copy_(norm.bias / r - b)
    for layer in consumers:
        layer.weight.mul_(r.to(layer.weight.dtype))
        if has_offset:
            shift = layer.weight @ b.to(layer.weight.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(shift, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.add_(shift)
        q = layer.input_quant
        q.scale.fill_(float(s_t))
        q.zero_point.copy_(z if z_t is None else torch.full_like(z, float(z_t)))


def reparameterize_model(model: nn.Module) -> None:
    """Stage two on every block: both post-norm quantizers become layer-wise."""
    for _, pairs in post_norm_pairs(model):
        for norm, consumers in pairs:
            reparameterize(norm, consumers)


# ------------------------------------------------------------------------------------------------------------
# Storage: integer weight codes + scales + zero points + eta in safetensors
# ------------------------------------------------------------------------------------------------------------
def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with each quantized weight replaced by ``<layer>.weight_codes`` (uint8 codes; the
    scales and zero points are in ``<layer>.weight_quant.*``). Activation quantizers keep their state
    (``scale``, ``zero_point``, SULQ's ``eta``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, _QuantWeightLayer):
            if not bool(layer.weight_quant.initialized):
                raise ValueError(f"{name}: weight quantizer not calibrated; quantize the model before saving.")
            del state[f"{name}.weight"]
            state[f"{name}.weight_codes"] = layer.weight_quant.codes(layer.weight.detach()).to(torch.uint8).cpu()
    return state


def save_quantized_vit(model: nn.Module, folder: str | Path, config: dict) -> Path:
    """Write ``model.safetensors`` (:func:`quantized_state`) and ``config.json`` (``config``: how to rebuild the
    FP architecture and the quantization settings)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(quantized_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


@torch.no_grad()
def load_quantized_state(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load :func:`save_quantized_vit`'s tensors into a model already wrapped by ``quantize_vit`` with the same
    settings: weights become ``(codes - z) * s``, which the weight quantizer maps to the same codes again."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    for name, layer in model.named_modules():
        if isinstance(layer, _QuantWeightLayer):
            codes = state.pop(f"{name}.weight_codes").float()
            wq = layer.weight_quant
            scale = state[f"{name}.weight_quant.scale"]
            zero = state[f"{name}.weight_quant.zero_point"]
            shape = [-1] + [1] * (codes.dim() - 1) if wq.num_channels is not None else []
            state[f"{name}.weight"] = (codes - zero.view(shape)) * scale.view(shape)
            if state.get(f"{name}.bias") is not None and layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(state[f"{name}.bias"]))  # added by stage two
    model.load_state_dict(state, strict=True)
    return model
