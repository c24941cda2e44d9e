"""iLLaMA: a LLaMA decoder as a vision transformer (Wang et al., "Adapting LLaMA Decoder to Vision
Transformer", arXiv 2404.06773; official code techmonsterwang/iLLaMA ``models/illama.py``).

    image -> 16x16 patch conv -> [p_0 .. p_{N-2}, cls] + pos_embed          (post-sequence class token, §3.2)
          -> depth x { x += DP(Attn(RMSNorm x) with 1-D RoPE and soft mask);  x += DP(SwiGLU(RMSNorm x)) }
          -> RMSNorm -> head(x[:, -1])

Soft mask (§3.3): with P = softmax(QK^T / sqrt(d)) and r = ``soft_mask_rate`` (1 = bidirectional, 0 = causal),
  * ``mask_mode='strict'`` (default): out = r·softmax(S) V + (1-r)·softmax(S + causal bias) V: the causal
    decoder the paper describes, exactly causal at r = 0 (most of training, and inference), where it is one
    fused causal SDPA call (two fused calls while 0 < r < 1).
  * ``mask_mode='official'``: out = (P ⊙ (r·1 + (1-r)·tril(1))) V, not renormalised, as in the released code
    that produced the paper's numbers and checkpoints (use it to load those or reproduce them). At r = 0 a
    patch row sums to < 1 and still depends on later tokens through the softmax denominator ("leaky
    causal"); r = 1 runs fused SDPA, r < 1 an explicit attention matrix (slower).
``effitrain.callbacks.soft_causal_mask.SoftCausalMask`` drives ``soft_mask_rate`` during training; a new model starts
at r = 0, the state every recipe ends in (the rate is not part of the state_dict).

Built from ``timm.layers`` (PatchEmbed, RmsNormFp32, SwiGLU, DropPath, RoPE frequencies from ``freq_bands``,
applied as LLaMA's complex rotation) and registered with timm on ``import effitrain.models``:
``timm.create_model("illama_tiny_patch16_224")``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from effitrain.models.intermediates import check_output_fmt, prune_blocks, split_intermediates, take_indices
from effitrain.models.timm_cfg import build_patch_model, patch_model_cfg
from timm.layers import (
    DropPath,
    PatchEmbed,
    RmsNormFp32,
    SwiGLU,
    calculate_drop_path_rates,
    freq_bands,
    register_notrace_function,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn

__all__ = ["ILLaMA"]

MASK_MODES = ("official", "strict")
CLASS_TOKEN_POSITIONS = ("last", "first")
GLOBAL_POOLS = ("token", "avg", "")


@register_notrace_function  # FX: a leaf (its size comes from the input's shape)
def rope_freqs(num_tokens: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """LLaMA's 1-D RoPE table ``freqs_cis``: e^{i·m·θ_j} for positions m = 0..num_tokens-1 and
    θ_j = theta^(-2j/head_dim) (timm's ``freq_bands``), complex64 (num_tokens, head_dim / 2)."""
    angles = torch.outer(torch.arange(num_tokens, device=device, dtype=torch.float32),
                         freq_bands(head_dim, temperature=theta, step=2, device=device))
    return torch.polar(torch.ones_like(angles), angles)


@register_notrace_function  # FX: a leaf (layout checks on the input)
def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs (x_2j, x_2j+1) of x (..., N, head_dim) by ``freqs`` (N, head_dim/2),
    as LLaMA's ``apply_rotary_emb``: one complex multiply, in fp32. Same values as timm's
    ``apply_rot_embed(half=False)``, about 5x cheaper on CPU (no concatenations of rotated halves)."""
    y = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if y.storage_offset() % 2 or any(stride % 2 for stride in y.stride()[:-1]) or y.stride(-1) != 1:
        y = y.contiguous()  # view_as_complex needs (real, imag) pairs at even offsets
    pairs = torch.view_as_complex(y.reshape(*y.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class SoftMaskAttention(nn.Module):
    """Multi-head self-attention with 1-D RoPE on q and k of every token and the soft causal mask (§3.3).

    ``forward(x, rope, rate, soft_mask)``: ``rope`` is the :func:`rope_freqs` table; ``rate`` is r;
    ``soft_mask`` is the (N, N) multiplicative mask r·1 + (1-r)·tril(1) in official mode and ``None`` in
    strict mode.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates channel pairs: head_dim {self.head_dim} (embed_dim / num_heads) "
                             "must be even.")
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, rate: float, soft_mask: torch.Tensor | None
                ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], rope).unbind(0)  # q and k rotated in one pass
        v = qkv[2]
        if rate >= 1.0:  # bidirectional: identical in both modes
            out = F.scaled_dot_product_attention(q, k, v)
        elif soft_mask is None:  # strict: r·softmax(S) + (1-r)·softmax(S + causal bias)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if rate > 0.0:
                out = torch.lerp(out, F.scaled_dot_product_attention(q, k, v), rate)
        else:  # official: the mask multiplies the probabilities after the softmax, no renormalisation
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = (attn * soft_mask) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm LLaMA block: x += DP(Attn(RMSNorm x)); x += DP(SwiGLU(RMSNorm x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, mlp_align: int = 256, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Callable[..., nn.Module] = RmsNormFp32,
                 mlp_layer: Callable[..., nn.Module] = SwiGLU):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SoftMaskAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, mlp_hidden, bias=False, align_to=mlp_align)  # fc1_g = official fc1, fc1_x = fc3
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, rate: float, soft_mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope, rate, soft_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ILLaMA(nn.Module):
    """The iLLaMA classifier with timm's model interface.

    Args:
        img_size, patch_size, in_chans: input geometry (any size divisible by the patch).
        num_classes: classifier outputs (0: no head).
        global_pool: ``'token'`` reads the class token (the paper), ``'avg'`` averages the patch tokens,
            ``''`` keeps every token (the head, if any, applies to each).
        embed_dim, depth, num_heads: width, blocks, heads.
        mlp_ratio, mlp_align: SwiGLU hidden = ``int(2/3 · int(mlp_ratio·D))`` rounded up to ``mlp_align``
            (8D/3 to a multiple of 256 in the paper: 512 / 1024 / 2048 / 2816 for T / S / B / L).
        qkv_bias: bias on the fused qkv projection (True in every released size).
        rope_theta: RoPE base.
        class_token_position: ``'last'`` (post-sequence [cls], the paper) or ``'first'`` (ViT order; with a
            causal mask the class token then sees only itself: the collapse the paper's §3.2 fixes).
        mask_mode: ``'official'`` or ``'strict'`` soft mask (see the module docstring).
        soft_mask_rate: r in [0, 1]; 1 = bidirectional, 0 = causal.
        drop_rate: dropout before the head. ``drop_path_rate``: stochastic depth, linear over the blocks.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, mlp_align: int = 256, qkv_bias: bool = True,
                 rope_theta: float = 1e4, class_token_position: str = "last", mask_mode: str = "strict",
                 soft_mask_rate: float = 0.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, mlp_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        _check_pool(global_pool)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, "
                             f"got {class_token_position!r}.")
        norm_layer = norm_layer or partial(RmsNormFp32, eps=1e-6)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.class_token_position, self.rope_theta = class_token_position, rope_theta
        self.mask_mode, self.soft_mask_rate = mask_mode, soft_mask_rate  # validated by the setters
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, bias=True)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))  # in sequence order
        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # linspace(0, rate, depth), as the official code
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, int(2 * int(embed_dim * mlp_ratio) / 3), mlp_align, qkv_bias, dpr[i],
                  norm_layer, mlp_layer or SwiGLU)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # --- the two settable knobs -------------------------------------------------------------------------
    @property
    def soft_mask_rate(self) -> float:
        """r of the soft mask: 1 = bidirectional, 0 = causal (set every step by ``SoftCausalMask``)."""
        return self._soft_mask_rate

    @soft_mask_rate.setter
    def soft_mask_rate(self, rate: float) -> None:
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"soft_mask_rate must be in [0, 1] (1 = bidirectional, 0 = causal), got {rate}.")
        self._soft_mask_rate = rate

    @property
    def mask_mode(self) -> str:
        return self._mask_mode

    @mask_mode.setter
    def mask_mode(self, mode: str) -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}: 'official' is the released "
                             "code's post-softmax mask, 'strict' the exactly causal mix of two softmaxes.")
        self._mask_mode = mode
        # timm's exports (save_for_hf) write the factory's `_model_args` as the reload arguments: keep the
        # current mode there, so a folder reloads with the mask it was saved with.
        self.__dict__.setdefault("_model_args", {})["mask_mode"] = mode

    # --- timm interface ---------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Official init: trunc_normal(0.02) for Linear weights, pos_embed and cls_token; zero biases; the
        patch conv keeps PyTorch's default."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def cls_index(self) -> int:
        return -1 if self.class_token_position == "last" else 0

    def soft_mask(self, num_tokens: int, x: torch.Tensor) -> torch.Tensor | None:
        """The official multiplicative mask r·1 + (1-r)·tril(1), or ``None`` where it is not needed."""
        rate = self.soft_mask_rate
        if self.mask_mode != "official" or rate >= 1.0:
            return None
        causal = torch.ones(num_tokens, num_tokens, device=x.device, dtype=x.dtype).tril_()
        return causal if rate == 0.0 else rate + (1.0 - rate) * causal

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((x, cls) if self.class_token_position == "last" else (cls, x), dim=1) + self.pos_embed

    def _block_args(self, x: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """RoPE table, mask rate and (official mode) mask shared by every block."""
        num_tokens = x.shape[1]
        return (rope_freqs(num_tokens, self.head_dim, self.rope_theta, x.device), self.soft_mask_rate,
                self.soft_mask(num_tokens, x))

    def _block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor, rate: float,
               soft_mask: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, rope, rate, soft_mask)
        return block(x, rope, rate, soft_mask)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, N, D): patches in raster order, class token last (or first)."""
        x = self._embed(x)
        rope, rate, soft_mask = self._block_args(x)
        for block in self.blocks:
            x = self._block(block, x, rope, rate, soft_mask)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature-extraction forward (as ``VisionTransformer.forward_intermediates``; the arguments are
        described in :mod:`effitrain.models.intermediates`): block outputs, the class token as prefix token."""
        check_output_fmt(output_fmt)
        taken, last = take_indices(len(self.blocks), indices)
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        intermediates, x = [], self._embed(x)
        rope, rate, soft_mask = self._block_args(x)
        for i, block in enumerate(blocks):
            x = self._block(block, x, rope, rate, soft_mask)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        last_cls = self.class_token_position == "last"
        intermediates = split_intermediates(intermediates, prefix=slice(-1, None) if last_cls else slice(0, 1),
                                            patches=slice(0, -1) if last_cls else slice(1, None),
                                            grid=self.patch_embed.grid_size, output_fmt=output_fmt,
                                            return_prefix_tokens=return_prefix_tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one ``indices`` takes (and the final norm / head); returns the
        absolute indices kept (``features_only=True`` uses this)."""
        return prune_blocks(self, "blocks", "norm", indices, prune_norm, prune_head)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, self.cls_index]
        elif self.global_pool == "avg":
            x = (x[:, :-1] if self.class_token_position == "last" else x[:, 1:]).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ILLaMA) -> dict[str, torch.Tensor]:
    """Load official iLLaMA checkpoints (``{'model': ...}``; SwiGLU ``fc1``/``fc3``) and resample
    ``pos_embed`` to the model's patch grid (the class token row is kept apart, at its position)."""
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = {}
    for name, value in state_dict.items():
        if name == "freqs_cis":
            continue
        name = name.replace(".mlp.fc1.", ".mlp.fc1_g.").replace(".mlp.fc3.", ".mlp.fc1_x.")
        if name == "pos_embed" and value.shape[1] != model.pos_embed.shape[1]:
            cls_row = value[:, -1:] if model.class_token_position == "last" else value[:, :1]
            patches = value[:, :-1] if model.class_token_position == "last" else value[:, 1:]
            patches = resample_abs_pos_embed(patches, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=0)
            value = torch.cat((patches, cls_row) if model.class_token_position == "last" else (cls_row, patches), 1)
        out[name] = value
    return out


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' keeps every token), got {global_pool!r}.")
    return global_pool


def _create_illama(variant: str, pretrained: bool = False, **kwargs) -> ILLaMA:
    if pretrained:  # the released weights were trained with the post-softmax mask: load them as such
        kwargs.setdefault("mask_mode", "official")
    return build_patch_model(ILLaMA, variant, pretrained, checkpoint_filter_fn, default_depth=12, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return patch_model_cfg(url, paper_ids="arXiv:2404.06773", paper_name="Adapting LLaMA Decoder to Vision Transformer",
                           origin_url="https://github.com/techmonsterwang/iLLaMA", **kwargs)


default_cfgs = generate_default_cfgs({
    "illama_tiny_patch16_224": _cfg(),
    "illama_small_patch16_224": _cfg(),
    "illama_base_patch16_224": _cfg(),
    "illama_base_patch16_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "illama_large_patch16_224": _cfg(),
    "test_illama": _cfg(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0),
})


@register_model
def illama_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ILLaMA:
    """iLLaMA-T: 5,701,096 parameters at 224 px, 1000 classes."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_illama("illama_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def illama_small_patch16_224(pretrained: bool = False, **kwargs) -> ILLaMA:
    """iLLaMA-S: 22,018,024 parameters."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_illama("illama_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def illama_base_patch16_224(pretrained: bool = False, **kwargs) -> ILLaMA:
    """iLLaMA-B: 86,502,376 parameters."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_illama("illama_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def illama_base_patch16_384(pretrained: bool = False, **kwargs) -> ILLaMA:
    """iLLaMA-B at 384 px (the paper's fine-tune): 86,794,216 parameters."""
    args = dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_illama("illama_base_patch16_384", pretrained, **dict(args, **kwargs))


@register_model
def illama_large_patch16_224(pretrained: bool = False, **kwargs) -> ILLaMA:
    """iLLaMA-L: 310,445,032 parameters."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_illama("illama_large_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_illama(pretrained: bool = False, **kwargs) -> ILLaMA:
    """A tiny iLLaMA for tests and the digits recipe: 32 px, 8 px patches, width 64, 2 blocks."""
    args = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2)
    return _create_illama("test_illama", pretrained, **dict(args, **kwargs))
