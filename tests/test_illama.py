"""iLLaMA as timm models (models/illama.py): sizes, the soft mask semantics and the official-code forward."""

from __future__ import annotations

import math

import effitrain.models  # noqa: F401  (registers the iLLaMA variants)
import pytest
import timm
import torch
import torch.nn.functional as F
from effitrain.models.illama import ILLaMA, SoftMaskAttention, checkpoint_filter_fn

PARAMS = {  # the official logs' n_parameters
    "illama_tiny_patch16_224": (5_701_096, 512),
    "illama_small_patch16_224": (22_018_024, 1024),
    "illama_base_patch16_224": (86_502_376, 2048),
    "illama_base_patch16_384": (86_794_216, 2048),
    "illama_large_patch16_224": (310_445_032, 2816),
}


def tiny(**kwargs) -> ILLaMA:
    torch.manual_seed(0)
    return timm.create_model("test_illama", **kwargs).eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_and_swiglu_width(name: str) -> None:
    with torch.device("meta"):  # no memory or init time for the 310M model
        model = timm.create_model(name)
    count, hidden = PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.blocks[0].mlp.fc1_g.out_features == hidden
    assert model.blocks[0].attn.qkv.bias is not None and model.blocks[0].mlp.fc1_g.bias is None


def test_every_registered_variant_builds() -> None:
    names = timm.list_models("illama_*") + timm.list_models("test_illama*")
    assert set(PARAMS) | {"test_illama"} == set(names)
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=7)
        assert model.head.out_features == 7 and model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    out = tiny()(images())
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope_complex(x: torch.Tensor, theta: float = 1e4) -> torch.Tensor:
    """LLaMA's rotation: adjacent channel pairs as complex numbers times exp(i·m·θ_k); x is (B, H, N, d)."""
    d, n = x.shape[-1], x.shape[-2]
    freqs = torch.outer(torch.arange(n).float(), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2)) * torch.polar(torch.ones_like(freqs), freqs)
    return torch.view_as_real(rotated).flatten(-2)


def reference_forward(model: ILLaMA, x: torch.Tensor, rate: float) -> torch.Tensor:
    """The official forward written out: cls appended, pos_embed, RoPE on q/k, softmax(QK^T/√d) ⊙ mask."""
    p = dict(model.named_parameters())
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=model.patch_embed.patch_size)
    x = torch.cat([x.flatten(2).transpose(1, 2), p["cls_token"].expand(len(x), -1, -1)], 1) + p["pos_embed"]
    B, N, D = x.shape
    H = model.blocks[0].attn.num_heads
    mask = rate * torch.ones(N, N) + (1 - rate) * torch.ones(N, N).tril()
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        h = _rms(x, p[b + "norm1.weight"]) @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
        q, k, v = h.reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        attn = (_rope_complex(q) @ _rope_complex(k).transpose(-2, -1) / math.sqrt(D // H)).softmax(-1) * mask
        h = (attn @ v).transpose(1, 2).reshape(B, N, D) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        x = x + h
        h = _rms(x, p[b + "norm2.weight"])
        x = x + (F.silu(h @ p[b + "mlp.fc1_g.weight"].T) * (h @ p[b + "mlp.fc1_x.weight"].T)) @ p[b + "mlp.fc2.weight"].T
    return _rms(x, p["norm.weight"])[:, -1] @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_official_mode_equals_the_official_forward(rate: float) -> None:
    model, x = tiny(mask_mode="official"), images()
    model.soft_mask_rate = rate
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x, rate), rtol=1e-4, atol=1e-5)


def test_rate_one_is_bidirectional_and_strict_mixes_two_softmaxes() -> None:
    from effitrain.models.illama import rope_freqs

    attn, x = SoftMaskAttention(16, 2).eval(), torch.randn(2, 5, 16)
    rope = rope_freqs(5, 8, 1e4, x.device)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = _rope_complex(q) @ _rope_complex(k).transpose(-2, -1) / math.sqrt(8)
    future = ~torch.ones(5, 5, dtype=torch.bool).tril()
    full, causal = scores.softmax(-1) @ v, scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    project = lambda o: attn.proj(o.transpose(1, 2).reshape(2, 5, 16))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope, 1.0, None), project(full))  # both modes at r = 1
        torch.testing.assert_close(attn(x, rope, 0.0, None), project(causal))  # strict at r = 0
        torch.testing.assert_close(attn(x, rope, 0.25, None), project(0.25 * full + 0.75 * causal))


def _tokens_after_perturbing(model: ILLaMA, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = images(1)
    y = x.clone()
    row, col = divmod(patch, model.patch_embed.grid_size[1])
    y[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 1.0  # only patch `patch` changes
    with torch.no_grad():
        return model.forward_features(x), model.forward_features(y)


def test_strict_causal_patch_outputs_ignore_later_patches_while_cls_sees_all() -> None:
    model = tiny(mask_mode="strict", soft_mask_rate=0.0)
    before, after = _tokens_after_perturbing(model, patch=9)
    changed = (before - after).abs().amax(-1)[0]  # per token: patches 0..15, cls at 16
    assert changed[:9].max() == 0.0  # earlier patches: exactly unchanged
    assert changed[9:16].min() > 1e-4  # the changed patch and every later one move
    assert changed[16] > 1e-4  # the post-sequence class token sees every patch


def test_official_causal_leaks_through_the_softmax_denominator() -> None:
    model = tiny(mask_mode="official", soft_mask_rate=0.0)
    before, after = _tokens_after_perturbing(model, patch=9)
    assert (before[0, :9] - after[0, :9]).abs().max() > 1e-6  # the released code is not exactly causal


def test_front_class_token_with_causal_mask_sees_no_image() -> None:
    model = tiny(mask_mode="strict", class_token_position="first", soft_mask_rate=0.0)
    with torch.no_grad():
        logits = model(torch.cat([images(1, seed=1), images(1, seed=2)]))
    torch.testing.assert_close(logits[0], logits[1])  # the collapse of §3.2: the head reads a constant


def test_rope_scores_depend_only_on_relative_position() -> None:
    from effitrain.models.illama import apply_rope, rope_freqs
    from timm.layers import apply_rot_embed

    rope = rope_freqs(12, 8, 1e4, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    score = lambda m, n: apply_rope(q[None], rope[m:m + 1])[0] @ apply_rope(k[None], rope[n:n + 1])[0]  # noqa: E731
    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(5, 5), q @ k)
    # the complex rotation equals timm's interleaved (half=False) rotary embedding
    from timm.layers import freq_bands

    angles = torch.outer(torch.arange(12.0), freq_bands(8, temperature=1e4, step=2)).repeat_interleave(2, -1)
    x = torch.randn(3, 12, 8)
    torch.testing.assert_close(apply_rope(x, rope), apply_rot_embed(x, angles.sin(), angles.cos()))


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model, x = tiny(soft_mask_rate=0.4), images()
    model.train()
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_timm_interface_and_no_weight_decay_groups() -> None:
    from effitrain.lightning_modules.base import no_decay_groups

    model = tiny()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    decay, no_decay = no_decay_groups(model, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_embed", "cls_token", "head.bias", "norm.weight"}
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) == 1 + 2 * 5 + 1  # conv, 5 per block, head
    assert model.forward_head(model.forward_features(images()), pre_logits=True).shape == (2, 64)
    model.reset_classifier(3, global_pool="avg")
    assert model(images()).shape == (2, 3)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 2 + 1 + 1  # stem, two blocks, final norm (+ head ungrouped)
    with pytest.raises(ValueError, match="soft_mask_rate must be in"):
        model.soft_mask_rate = 1.5
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        ILLaMA(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, mask_mode="causal")


def test_official_checkpoint_layout_loads_and_pos_embed_resamples() -> None:
    model, x = tiny(soft_mask_rate=0.0), images()
    official = {k.replace("mlp.fc1_g.", "mlp.fc1.").replace("mlp.fc1_x.", "mlp.fc3."): v
                for k, v in model.state_dict().items()}
    official["freqs_cis"] = torch.zeros(17, 4, dtype=torch.complex64)  # a plain attribute there, dropped here
    twin = ILLaMA(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2).eval()
    twin.load_state_dict(checkpoint_filter_fn({"model": official}, twin))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    bigger = ILLaMA(img_size=48, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2)
    resized = checkpoint_filter_fn(official, bigger)["pos_embed"]
    assert resized.shape == (1, 37, 64)
    torch.testing.assert_close(resized[:, -1], model.pos_embed[:, -1])  # the class token row is kept as is
