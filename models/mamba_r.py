"""Mamba-R: Vision Mamba with registers (Wang et al., "Mamba-R: Vision Mamba ALSO Needs Registers",
arXiv 2405.14858; official code wangf3014/Mamba-Reg ``models_mamba.py``, ``utils.get_cls_idx``).

    image -> 16x16 patch conv + pos_embed -> insert R registers (own token + own pos embed), evenly:
             [p_0..p_{L-1}, r_0, p_L..p_{2L-1}, r_1, ..., r_{R-1}, leftover patches],  L = n_patches // (R+1)
          -> depth x { residual += DP(hidden);  hidden = BiMamba(RMSNorm(residual)) }   (residual in fp32)
          -> RMSNorm(residual + DP(hidden)) -> registers -> Linear D -> D/cls_reduce each -> flatten
          -> RMSNorm (only when cls_reduce > 1) -> head                       ("register recycling", §3)

BiMamba (Vim's bidirectional mixer): in_proj / out_proj shared, one causal depthwise conv, x_proj, dt_proj,
A_log and D per direction; the backward direction scans the flipped sequence (z included) and is flipped
back; out = out_proj((y_fwd + y_bwd) / 2). The scan is ``effitrain.models.selective_scan.selective_scan`` (mamba-ssm's
CUDA kernel on a GPU when installed, else the chunked pure-PyTorch scan).

With ``num_registers=1`` the single register sits at n_patches // 2 and is read alone: Vim's middle class
token, the no-register baseline. ``num_registers=0`` averages all tokens.

Parameter names follow the official code (``cls_token`` / ``pos_embed_cls`` are the registers), so its
checkpoints load as they are; ``pos_embed`` is resampled to the model's grid on load (128 -> 224 px stages).

    timm.create_model("mambar_base_patch16_224", img_size=128)   # after ``import effitrain.models``
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from effitrain.models.intermediates import check_output_fmt, prune_blocks, split_intermediates, take_indices
from effitrain.models.selective_scan import IMPLEMENTATIONS, selective_scan
from effitrain.models.timm_cfg import build_patch_model, patch_model_cfg
from timm.layers import (
    DropPath,
    PatchEmbed,
    RmsNormFp32,
    calculate_drop_path_rates,
    lecun_normal_,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn

__all__ = ["MambaR", "BiMambaMixer", "register_layout"]

GLOBAL_POOLS = ("token", "avg", "")


def register_layout(num_patches: int, num_registers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the registers go (the official ``get_cls_idx``).

    Returns ``token_idx`` (gathers the sequence from ``cat([patches, registers])``) and the register
    positions in that sequence: register g sits at L + g(L+1) with L = num_patches // (num_registers + 1).
    """
    if num_registers == 0:
        return torch.arange(num_patches), torch.zeros(0, dtype=torch.long)
    span = num_patches // (num_registers + 1)
    if span < 1:
        raise ValueError(f"{num_registers} registers need at least {num_registers + 1} patches, got {num_patches}: "
                         "use fewer registers or a larger image / smaller patch.")
    groups = torch.cat([torch.arange(span * num_registers).view(num_registers, span),
                        torch.arange(num_patches, num_patches + num_registers)[:, None]], dim=1).flatten()
    token_idx = torch.cat([groups, torch.arange(span * num_registers, num_patches)])
    positions = span + torch.arange(num_registers) * (span + 1)
    return token_idx, positions


@register_notrace_module  # FX: a leaf (the selective scan picks its kernel at run time)
class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer (``Mamba(biscan=True)`` of the official ``mamba_custom.py``).

    Args:
        dim: model width D. d_state: N (16). d_conv: causal conv kernel (4). expand: Di = expand·D.
        dt_rank: rank of the Δ projection; ``'auto'`` = ceil(D/16).
        dt_min, dt_max, dt_init_floor: softplus(dt bias) is log-uniform in [dt_min, dt_max], floored.
        scan_impl, scan_chunk_size: passed to ``selective_scan`` (``impl``, ``chunk_size``).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan_impl: str = "auto",
                 scan_chunk_size: int = 64):
        super().__init__()
        if scan_impl not in IMPLEMENTATIONS:
            raise ValueError(f"scan_impl={scan_impl!r} is not one of {IMPLEMENTATIONS}")
        self.d_inner, self.d_state = expand * dim, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_impl, self.scan_chunk_size = scan_impl, scan_chunk_size
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        for suffix in ("", "_b"):  # forward and backward direction, official names
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            # Δ init keeps the variance (weight ~ U(±rank^-1/2)); bias = softplus^-1 of a log-uniform step
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)  # S4D-real
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
            setattr(self, "A_log" if not suffix else "A_b_log", nn.Parameter(a_log))
            setattr(self, f"D{suffix}", nn.Parameter(torch.ones(self.d_inner)))

    def _direction(self, xz: torch.Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
                   a_log: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """One causal Mamba pass over xz (B, 2Di, S) in its own order; returns y (B, Di, S)."""
        seqlen = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :seqlen])  # pad d_conv-1 both sides and keep the first S: causal
        dt, b, c = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # bias goes to the scan, inside the softplus
        return selective_scan(x, delta, -torch.exp(a_log.float()), b.transpose(1, 2), c.transpose(1, 2),
                              d.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                              impl=self.scan_impl, chunk_size=self.scan_chunk_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2Di, S)
        y_fwd = self._direction(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_bwd = self._direction(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        return self.out_proj(((y_fwd + y_bwd.flip(-1)) / 2).transpose(1, 2))


class Block(nn.Module):
    """Add -> RMSNorm -> mixer (mamba-ssm's block): returns (mixer output, fp32 residual).

    ``drop_path`` applies to the incoming hidden state, i.e. to the previous block's mixer output.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = RmsNormFp32(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual)), residual


class MambaR(nn.Module):
    """Vision Mamba with registers, with timm's model interface.

    Args:
        img_size, patch_size, in_chans: input geometry.
        num_classes: classifier outputs (0: no head).
        embed_dim, depth: width D and number of blocks.
        num_registers: R registers spread through the sequence (12 in T/S/B, 16 in L); 1 = Vim's middle
            class token; 0 = no token, mean of all tokens.
        cls_reduce: each register's output is reduced D -> D/cls_reduce by ``neck`` (with an RMSNorm over the
            flattened registers) when > 1; the head reads R·D/cls_reduce features.
        global_pool: ``'token'`` recycles the registers (the paper; the default with registers), ``'avg'``
            averages all tokens (the default without), ``''`` keeps every token (the head, if any, applies to
            each). ``num_features`` is the token width D; ``head_hidden_size`` the width the head reads.
        d_state, expand, d_conv: Mamba's N, Di/D and conv kernel.
        drop_rate: dropout before the head; drop_path_rate: stochastic depth, linspace(0, rate, depth).
        norm_eps: RMSNorm eps (1e-5).
        dynamic_img_size: accept any image size at run time (pos_embed resampled and registers re-placed per
            call); otherwise the size is fixed at build time (``set_input_size`` changes it).
        scan_impl, scan_chunk_size: selective-scan backend, see ``effitrain.models.selective_scan.selective_scan``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24, num_registers: int = 12,
                 cls_reduce: int = 1, d_state: int = 16, expand: int = 2, d_conv: int = 4, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-5, dynamic_img_size: bool = False,
                 scan_impl: str = "auto", scan_chunk_size: int = 64, global_pool: str | None = None):
        super().__init__()
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if cls_reduce < 1 or embed_dim % cls_reduce:
            raise ValueError(f"cls_reduce must be a positive divisor of embed_dim={embed_dim}, got {cls_reduce}")
        if cls_reduce > 1 and num_registers == 0:
            raise ValueError("cls_reduce > 1 reduces register outputs: it needs num_registers > 0")
        self.num_classes, self.num_registers, self.cls_reduce = num_classes, num_registers, cls_reduce
        self.global_pool = self._check_pool("token" if num_registers > 0 else "avg", global_pool)
        self.num_features = self.embed_dim = embed_dim  # the width of forward_features' tokens (timm's rule)
        self.head_hidden_size = self._head_width()  # the width forward_head(pre_logits=True) returns
        self.dynamic_img_size, self.grad_checkpointing = dynamic_img_size, False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, bias=True, strict_img_size=not dynamic_img_size,
                                      output_fmt="NHWC" if dynamic_img_size else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))  # patches only
        if num_registers > 0:
            self.cls_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
            self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self._set_layout(self.patch_embed.num_patches)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # linspace(0, rate, depth)
        mixer = partial(BiMambaMixer, d_state=d_state, d_conv=d_conv, expand=expand, scan_impl=scan_impl,
                        scan_chunk_size=scan_chunk_size)
        # block i drops the output of mixer i-1, so mixer j's output is dropped with rate dpr[j]
        self.layers = nn.ModuleList(
            [Block(embed_dim, mixer(embed_dim), ([0.0] + dpr)[i], norm_eps) for i in range(depth)])
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.drop_path = DropPath(dpr[-1]) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RmsNormFp32(embed_dim, eps=norm_eps)
        if cls_reduce > 1:
            self.neck = nn.Linear(embed_dim, embed_dim // cls_reduce, bias=False)
            self.norm_neck = RmsNormFp32(embed_dim * num_registers // cls_reduce, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(depth)

    def _check_pool(self, default: str, global_pool: str | None) -> str:
        pool = default if global_pool is None else global_pool
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('' keeps every token), got {pool!r}.")
        if pool == "token" and self.num_registers == 0:
            raise ValueError("global_pool='token' reads the registers: it needs num_registers > 0 (use 'avg').")
        return pool

    def _head_width(self) -> int:
        if self.global_pool == "token":
            return self.embed_dim * self.num_registers // self.cls_reduce
        return self.embed_dim

    def _set_layout(self, num_patches: int) -> None:
        token_idx, positions = register_layout(num_patches, self.num_registers)
        device = self.pos_embed.device
        self.register_buffer("token_idx", token_idx.to(device), persistent=False)
        self.register_buffer("register_positions", positions.to(device), persistent=False)

    def init_weights(self, depth: int) -> None:
        """Official init: lecun-normal patch conv, trunc_normal(0.02) for pos embeds, registers, neck and head;
        zero Linear biases except dt_proj's; out_proj = PyTorch's default / sqrt(depth) (GPT-2 rescaling)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.num_registers > 0:
            trunc_normal_(self.cls_token, std=0.02)
            trunc_normal_(self.pos_embed_cls, std=0.02)
        for linear in [self.head] + ([self.neck] if self.cls_reduce > 1 else []):
            if isinstance(linear, nn.Linear):
                trunc_normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        for block in self.layers:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    # --- timm interface ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "pos_embed_cls"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(self.global_pool, global_pool)
            self.head_hidden_size = self._head_width()
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the build-time image size: pos_embed is resampled (bicubic), the registers are kept."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        if self.patch_embed.grid_size != old_grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.data, new_size=list(self.patch_embed.grid_size), old_size=list(old_grid),
                num_prefix_tokens=0))
            self._set_layout(self.patch_embed.num_patches)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patches + pos_embed with the registers inserted: (B, n_patches + R, D)."""
        x = self.patch_embed(x)
        token_idx = self.token_idx
        if self.dynamic_img_size:
            grid = list(x.shape[1:3])
            pos = resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=list(self.patch_embed.grid_size),
                                         num_prefix_tokens=0)
            x = x.flatten(1, 2) + pos
            token_idx = register_layout(x.shape[1], self.num_registers)[0].to(x.device)
        else:
            x = x + self.pos_embed
        if self.num_registers > 0:
            registers = (self.cls_token + self.pos_embed_cls).expand(x.shape[0], -1, -1)
            x = torch.cat([x, registers], dim=1)[:, token_idx]
        return x

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual)
        return layer(hidden, residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, n_patches + R, D), registers at ``register_positions``."""
        hidden, residual = self._embed(x), None
        for layer in self.layers:
            hidden, residual = self._layer(layer, hidden, residual)
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.norm_f(residual)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature-extraction forward (as ``VisionTransformer.forward_intermediates``; the arguments are
        described in :mod:`effitrain.models.intermediates`).

        Intermediate i is the residual stream after block i (its input plus its mixer output), the tensor the
        final norm reads after the last block; the registers are split off as prefix tokens.
        """
        check_output_fmt(output_fmt)
        taken, last = take_indices(len(self.layers), indices)
        layers = self.layers[:last + 1] if stop_early else self.layers
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        hidden, residual, intermediates = self._embed(x), None, []
        for i, layer in enumerate(layers):
            hidden, residual = self._layer(layer, hidden, residual)
            if i in taken:
                stream = residual + self.drop_path(hidden).float()
                intermediates.append(self.norm_f(stream) if norm else stream)
        positions = self._register_positions(hidden.shape[1])
        is_patch = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        is_patch[positions] = False  # patches in raster order
        intermediates = split_intermediates(intermediates, prefix=positions, patches=is_patch, grid=grid,
                                            output_fmt=output_fmt, return_prefix_tokens=return_prefix_tokens)
        if intermediates_only:
            return intermediates
        return self.norm_f(residual + self.drop_path(hidden).float()), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one ``indices`` takes (and the final norm / neck and head);
        returns the absolute indices kept (``features_only=True`` uses this)."""
        return prune_blocks(self, "layers", "norm_f", indices, prune_norm, prune_head)

    def _register_positions(self, seqlen: int) -> torch.Tensor:
        if self.dynamic_img_size:
            return register_layout(seqlen - self.num_registers, self.num_registers)[1].to(self.pos_embed.device)
        return self.register_positions

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, self._register_positions(x.shape[1])]  # (B, R, D): recycle the registers
            if self.cls_reduce > 1:
                x = self.norm_neck(self.neck(x).flatten(1))
            else:
                x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MambaR) -> dict[str, torch.Tensor]:
    """Load official checkpoints (``{'model': ...}``) and resample ``pos_embed`` (patches only) to the model's
    grid, as between the 128 px and 224 px stages; register parameters are kept as they are."""
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape[1] != model.pos_embed.shape[1]:
        old = int(math.isqrt(pos.shape[1]))
        if old * old != pos.shape[1]:
            raise ValueError(f"Cannot infer the grid of a {pos.shape[1]}-token pos_embed (not square).")
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                  old_size=[old, old], num_prefix_tokens=0)
    return out


def _create_mambar(variant: str, pretrained: bool = False, **kwargs) -> MambaR:
    return build_patch_model(MambaR, variant, pretrained, checkpoint_filter_fn, default_depth=24, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return patch_model_cfg(url, paper_ids="arXiv:2405.14858", paper_name="Mamba-R: Vision Mamba ALSO Needs Registers",
                           origin_url="https://github.com/wangf3014/Mamba-Reg", **kwargs)


default_cfgs = generate_default_cfgs({
    "mambar_tiny_patch16_224": _cfg(),
    "mambar_small_patch16_224": _cfg(),
    "mambar_base_patch16_224": _cfg(),
    "mambar_large_patch16_224": _cfg(),
    "test_mambar": _cfg(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0),
})


@register_model
def mambar_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    """Mamba-R-T: D 192, 24 blocks, 12 registers: 9,264,232 parameters at 224 px, 1000 classes."""
    args = dict(patch_size=16, embed_dim=192, depth=24, num_registers=12, cls_reduce=1)
    return _create_mambar("mambar_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def mambar_small_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    """Mamba-R-S: D 384, 24 blocks, 12 registers reduced 2x: 27,801,064 parameters."""
    args = dict(patch_size=16, embed_dim=384, depth=24, num_registers=12, cls_reduce=2)
    return _create_mambar("mambar_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def mambar_base_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    """Mamba-R-B: D 768, 24 blocks, 12 registers reduced 4x: 99,301,096 parameters."""
    args = dict(patch_size=16, embed_dim=768, depth=24, num_registers=12, cls_reduce=4)
    return _create_mambar("mambar_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def mambar_large_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    """Mamba-R-L: D 1024, 48 blocks, 16 registers reduced 8x: 341,222,376 parameters."""
    args = dict(patch_size=16, embed_dim=1024, depth=48, num_registers=16, cls_reduce=8)
    return _create_mambar("mambar_large_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_mambar(pretrained: bool = False, **kwargs) -> MambaR:
    """A tiny Mamba-R for tests and the digits recipe: 32 px, 4 px patches (8x8 grid), width 64, 2 blocks,
    4 registers reduced 2x (so the neck path is exercised)."""
    args = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_registers=4, cls_reduce=2)
    return _create_mambar("test_mambar", pretrained, **dict(args, **kwargs))
