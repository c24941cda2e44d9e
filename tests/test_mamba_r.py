"""Mamba-R (arXiv 2405.14858): sizes, register layout, causality of each scan direction, resizing."""

import effitrain.models  # noqa: F401  (registers the mambar_* models)
import pytest
import timm
import torch
from effitrain.models.mamba_r import BiMambaMixer, MambaR, checkpoint_filter_fn, register_layout

# counted from the official models_mamba.py at 224 px and 1000 classes
SIZES = {
    "mambar_tiny_patch16_224": (9_264_232, 2304),
    "mambar_small_patch16_224": (27_801_064, 2304),
    "mambar_base_patch16_224": (99_301_096, 2304),
    "mambar_large_patch16_224": (341_222_376, 2048),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_counts_and_head_width_match_the_official_models(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, head_in = SIZES[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.head.in_features == head_in


@pytest.mark.parametrize("name", list(SIZES) + ["test_mambar"])
def test_every_variant_runs_forward_and_backward(name):
    """Each variant's widths, registers and neck at one block and 96 px (6x6 patches, enough for 16 registers)."""
    model = timm.create_model(name, depth=1, img_size=96, num_classes=3)
    x = torch.randn(2, 3, 96, 96)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 3)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("patches,registers,positions,length", [
    (196, 12, list(range(15, 192, 16)), 208),
    (196, 16, list(range(11, 192, 12)), 212),
    (64, 12, list(range(4, 60, 5)), 76),
    (196, 1, [98], 197),  # one register = Vim's middle class token
])
def test_register_positions(patches, registers, positions, length):
    token_idx, pos = register_layout(patches, registers)
    assert pos.tolist() == positions and len(token_idx) == length
    is_register = token_idx >= patches
    assert torch.nonzero(is_register).flatten().tolist() == positions
    assert token_idx[~is_register].tolist() == list(range(patches))  # image tokens keep raster order
    assert token_idx[is_register].tolist() == list(range(patches, patches + registers))


def test_model_places_registers_and_recycles_them_in_the_head():
    model = timm.create_model("test_mambar", depth=1).eval()  # 8x8 grid, 4 registers
    x = torch.randn(2, 3, 32, 32)
    tokens = model._embed(x)
    patches = model.patch_embed(x) + model.pos_embed
    registers = (model.cls_token + model.pos_embed_cls).expand(2, -1, -1)
    assert model.register_positions.tolist() == [12, 25, 38, 51] and tokens.shape[1] == 68
    torch.testing.assert_close(tokens[:, model.register_positions], registers)
    keep = torch.ones(68, dtype=torch.bool)
    keep[model.register_positions] = False
    torch.testing.assert_close(tokens[:, keep], patches)
    features = model.forward_features(x)
    expected = model.head(model.norm_neck(model.neck(features[:, [12, 25, 38, 51]]).flatten(1)))
    torch.testing.assert_close(model(x), expected)


def _mixer_directions(mixer, hidden):
    xz = mixer.in_proj(hidden).transpose(1, 2)
    fwd = mixer._direction(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    bwd = mixer._direction(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
    return fwd, bwd.flip(-1)


def test_each_direction_is_causal_along_its_own_order():
    torch.manual_seed(0)
    mixer = BiMambaMixer(16)
    hidden = torch.randn(2, 20, 16)
    k = 9
    changed = hidden.clone()
    changed[:, k] += 1.0
    (f0, b0), (f1, b1) = _mixer_directions(mixer, hidden), _mixer_directions(mixer, changed)
    torch.testing.assert_close(f0[..., :k], f1[..., :k], rtol=0, atol=0)  # forward: t < k untouched
    torch.testing.assert_close(b0[..., k + 1:], b1[..., k + 1:], rtol=0, atol=0)  # backward: t > k untouched
    assert (f0[..., k:] - f1[..., k:]).abs().amax() > 1e-3 and (b0[..., :k + 1] - b1[..., :k + 1]).abs().amax() > 1e-3
    torch.testing.assert_close(mixer(hidden), mixer.out_proj(((f0 + b0) / 2).transpose(1, 2)))


def test_swapping_direction_parameters_mirrors_the_mixer():
    """mixer_swapped(flip u) == flip(mixer u): the two directions are the same layer on reversed orders."""
    torch.manual_seed(0)
    mixer, swapped = BiMambaMixer(16), BiMambaMixer(16)
    state = mixer.state_dict()
    pairs = [("conv1d.", "conv1d_b."), ("x_proj.", "x_proj_b."), ("dt_proj.", "dt_proj_b."), ("A_log", "A_b_log")]
    renamed = {}
    for name, value in state.items():
        new = name
        for a, b in pairs + [("D", "D_b")]:
            if name.startswith(a) and (a != "D" or name == "D"):
                new = b + name[len(a):]
            elif name.startswith(b) and (b != "D_b" or name == "D_b"):
                new = a + name[len(b):]
        renamed[new] = value
    swapped.load_state_dict(renamed)
    hidden = torch.randn(2, 15, 16)
    torch.testing.assert_close(swapped(hidden.flip(1)), mixer(hidden).flip(1), rtol=1e-4, atol=1e-5)


def test_chunked_scan_inside_the_model_equals_the_sequential_loop():
    torch.manual_seed(0)
    model = timm.create_model("test_mambar", depth=2, scan_chunk_size=5)
    x = torch.randn(2, 3, 32, 32)
    out_fast = model(x)
    grads_fast = torch.autograd.grad(out_fast.sum(), list(model.parameters()))
    for module in model.modules():
        if isinstance(module, BiMambaMixer):
            module.scan_impl = "ref"
    out_ref = model(x)
    grads_ref = torch.autograd.grad(out_ref.sum(), list(model.parameters()))
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("test_mambar", depth=2)
    x = torch.randn(2, 3, 32, 32)
    plain = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    ckpt = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_pos_embed_resized_between_resolutions_keeps_registers():
    """Stage 1 (128 px) -> stage 2 (224 px): pos_embed resampled 8x8 -> 14x14, register parameters kept."""
    small = timm.create_model("mambar_tiny_patch16_224", img_size=128, depth=1, num_classes=5)
    large = timm.create_model("mambar_tiny_patch16_224", img_size=224, depth=1, num_classes=5)
    state = checkpoint_filter_fn({"model": small.state_dict()}, large)
    large.load_state_dict(state)
    assert large.pos_embed.shape == (1, 196, 192) and large.register_positions.tolist() == list(range(15, 192, 16))
    torch.testing.assert_close(large.cls_token, small.cls_token)
    torch.testing.assert_close(large.pos_embed_cls, small.pos_embed_cls)
    small.set_input_size(224)
    torch.testing.assert_close(small.pos_embed, large.pos_embed)
    assert small(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_dynamic_image_size():
    model = timm.create_model("test_mambar", depth=1, dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)  # 12x10 grid, registers re-placed
    fixed = timm.create_model("test_mambar", depth=1).eval()
    fixed.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(torch.ones(1, 3, 32, 32)), fixed(torch.ones(1, 3, 32, 32)))


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="registers need at least"):
        MambaR(img_size=32, patch_size=16, num_registers=4, embed_dim=32, depth=1)
    with pytest.raises(ValueError, match="cls_reduce"):
        MambaR(img_size=32, patch_size=8, num_registers=4, embed_dim=30, cls_reduce=4, depth=1)
    with pytest.raises(ValueError, match="scan_impl"):
        BiMambaMixer(16, scan_impl="triton")
