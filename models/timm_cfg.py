"""What this project's timm models share at registration: the pretrained-cfg fields of an ImageNet patch
model at 224 px, and the build that gives ``features_only=True`` its default blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from torch import nn


def patch_model_cfg(url: str = "", **kwargs) -> dict[str, Any]:
    """timm's pretrained cfg of a 224-px ImageNet patch model (1000 classes, bicubic, crop 0.875, ImageNet
    mean/std, ``patch_embed.proj`` / ``head``); ``kwargs`` add the paper fields or override."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


def build_patch_model(model_cls: type[nn.Module], variant: str, pretrained: bool,
                      pretrained_filter_fn: Callable, default_depth: int, **kwargs) -> nn.Module:
    """``build_model_with_cfg``; with ``features_only=True`` the last 3 blocks' outputs by default, through
    ``forward_intermediates`` (as timm's ViT)."""
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", default_depth)))
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
