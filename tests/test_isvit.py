"""I&S-ViT (arXiv 2311.10126): quantizers, SOS stages, storage and input checks, on tiny random ViTs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from effitrain.methods.isvit_sos import reconstruct, reconstruction_units, run_isvit, stage_three_pairs
from effitrain.methods.vit_ptq import (
    QLinear,
    calibrate_weights,
    post_norm_pairs,
    quantize_vit,
    quantizers,
    reparameterize_model,
    set_quant_state,
    start_activation_calibration,
    trainable_parameters,
)
from effitrain.methods.vit_quantizers import ETA_GRID, Log2Quantizer, SULQuantizer, UniformQuantizer
from effitrain.models.illama_isvit import illama_twins
from torch import nn


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=10).eval()


def tiny_illama(seed: int = 0, **kwargs) -> nn.Module:
    import effitrain.models  # noqa: F401

    torch.manual_seed(seed)
    return timm.create_model("test_illama", img_size=32, patch_size=8, depth=2, num_classes=10, **kwargs).eval()


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def softmax_probs(seed: int = 0) -> torch.Tensor:
    scores = torch.randn(4, 3, 17, 17, generator=torch.Generator().manual_seed(seed)) * 3
    return scores.softmax(dim=-1)


# ------------------------------------------------------------------------------------------------------------
# Quantizers
# ------------------------------------------------------------------------------------------------------------
def test_sulq_outputs_are_shifted_powers_of_two_and_monotone():
    probs = softmax_probs()
    quant = SULQuantizer(3)
    quant.calibrate(probs)
    out = quant(probs)
    k = torch.log2(out + quant.eta)
    assert torch.allclose(k, k.round(), atol=1e-5), "every output must be 2^k - eta with integer k"
    x = torch.linspace(float(probs.min()), float(probs.max()), 5000)
    y = quant(x)
    assert bool((y[1:] >= y[:-1]).all()), "SULQ must be monotone non-decreasing"


def test_sulq_eta_is_the_lowest_mse_grid_value():
    probs = softmax_probs(1)
    quant = SULQuantizer(3)
    quant.calibrate(probs)
    errors = {}
    for eta in ETA_GRID:  # independent recomputation of each candidate's MSE
        y = -torch.log2(probs + eta)
        s = (y.max() - y.min()) / 7
        z = torch.round(-y.min() / s)
        yq = (torch.clamp(torch.round(y / s) + z, 0, 7) - z) * s
        errors[eta] = float((torch.exp2(-torch.round(yq)) - eta - probs).pow(2).mean())
    assert float(quant.eta) == pytest.approx(min(errors, key=errors.get))


def test_sulq_uses_every_code_where_log2_clamps():
    probs = softmax_probs(2)
    sulq, log2 = SULQuantizer(3), Log2Quantizer(3)
    sulq.calibrate(probs)
    # Over the calibration range, SULQ's 2^3 codes are all used and give 8 distinct outputs.
    x = torch.linspace(float(probs.min()), float(probs.max()), 20000)
    assert sorted(sulq.codes(x).unique().tolist()) == list(range(8))
    assert sulq(x).unique().numel() == 8
    # Log2 clamps every exponent above 7 onto 7: a real share of the probabilities land there.
    clamped = (-torch.log2(probs) > 7.5).float().mean()
    assert clamped > 0.05
    assert torch.all(log2(probs[-torch.log2(probs) > 7.5]) == 2.0**-7)


def test_uniform_percentile_init_picks_lowest_mse_and_minmax_never_clips():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    x[:3] = torch.tensor([40.0, -35.0, 30.0])  # outliers: a clipping percentile must win
    quant = UniformQuantizer(3, percentiles=(1.0, 0.999, 0.99))
    quant.calibrate(x)
    errs = []
    for p in (1.0, 0.999, 0.99):
        q = UniformQuantizer(3, percentiles=(p,))
        q.calibrate(x)
        errs.append(float((q(x) - x).pow(2).mean()))
    assert float((quant(x) - x).pow(2).mean()) == pytest.approx(min(errs))
    assert errs.index(min(errs)) != 0
    minmax = UniformQuantizer(4, num_channels=5, channel_dim=0, percentiles=(1.0,))
    w = torch.randn(5, 7)
    minmax.calibrate(w)
    step = minmax.scale.view(-1, 1)
    assert bool(((minmax(w) - w).abs() <= step / 2 + 1e-6).all())
    codes = minmax.codes(w)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15


# ------------------------------------------------------------------------------------------------------------
# Wrapped models
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "illama_strict", "illama_soft", "illama_official"])
def test_twins_with_quantization_off_equal_the_fp_model(arch):
    if arch == "vit":
        fp = tiny_vit()
    else:
        fp = tiny_illama(mask_mode="official" if arch == "illama_official" else "strict")
        fp.soft_mask_rate = 0.5 if arch == "illama_soft" else 0.0
    q = quantize_vit(copy.deepcopy(fp), 4, 4, "sulq", twins=illama_twins())
    x = images(8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), fp(x), atol=2e-6, rtol=1e-5)


def calibrated(fp: nn.Module, x: torch.Tensor, post_softmax: str = "sulq") -> nn.Module:
    """Stage-one state: activations quantized and calibrated, post-norm inputs per channel, weights FP."""
    q = quantize_vit(copy.deepcopy(fp), 4, 4, post_softmax, twins=illama_twins())
    set_quant_state(q, weights=False, activations=True)
    start_activation_calibration(q)
    with torch.no_grad():
        q(x)
    return q


@pytest.mark.parametrize("arch", ["vit", "illama"])
def test_stage_two_is_lossless_and_layer_wise(arch):
    fp = tiny_vit() if arch == "vit" else tiny_illama()
    # Spread the norm outputs so that channel scales really differ.
    with torch.no_grad():
        for block in fp.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.copy_(torch.linspace(0.2, 3.0, norm.weight.numel()))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(torch.linspace(-1.0, 1.0, norm.bias.numel()))
    x = images(32)
    q = calibrated(fp, x)
    scales = q.blocks[0].attn.qkv.input_quant.scale
    assert float(scales.max() / scales.min()) > 2  # per-channel before
    with torch.no_grad():
        set_quant_state(q, False, False)
        before_fp = q(x)
        set_quant_state(q, False, True)
        before_q = q(x)
        reparameterize_model(q)
        after_q = q(x)
        set_quant_state(q, False, False)
        after_fp = q(x)
    # Floating point: the folded norm + Linear compute the same function (float32 re-association only).
    torch.testing.assert_close(after_fp, before_fp, atol=1e-4, rtol=1e-4)
    # Quantized: x'/s~ + z~ = x/s + z with an integer z~, so the codes are the same up to ties at .5.
    torch.testing.assert_close(after_q, before_q, atol=1e-3, rtol=1e-3)
    for _, pairs in post_norm_pairs(q):
        for norm, consumers in pairs:
            for layer in consumers:
                s = layer.input_quant.scale
                assert torch.allclose(s, s[0].expand_as(s)), "the quantizer must have one scale per layer"
                if getattr(norm, "bias", None) is not None:  # LayerNorm: one zero point too
                    z = layer.input_quant.zero_point
                    assert torch.equal(z, z[0].expand_as(z)) and float(z[0]) == round(float(z[0]))


def test_stage_three_uses_quantized_input_and_fp_target():
    fp = tiny_vit()
    x = images(32)
    q = quantize_vit(copy.deepcopy(fp), 3, 3, "sulq", post_norm_channel_wise=False)
    run_isvit(q, fp, x, reconstruction="none", batch_size=16)
    index = 2  # blocks.1: after the quantized patch embedding and block 0
    name, q_unit = reconstruction_units(q)[index]
    assert name == "blocks.1"
    inputs, targets, _, _ = stage_three_pairs(q, fp, index, x, 16, torch.device("cpu"))
    seen = {}
    hooks = [q_unit.register_forward_pre_hook(lambda m, a: seen.setdefault("q_in", a[0])),
             fp.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("fp_in", a[0])),
             fp.blocks[1].register_forward_hook(lambda m, a, o: seen.setdefault("fp_out", o)),
             q_unit.register_forward_hook(lambda m, a, o: seen.setdefault("q_out", o))]
    with torch.no_grad():
        q(x)
        fp(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(inputs, seen["q_in"], atol=1e-6, rtol=0)
    torch.testing.assert_close(targets, seen["fp_out"], atol=1e-6, rtol=0)
    # The two chains differ at 3 bits: a swap (FP input, quantized target) would fail the checks above.
    assert (inputs - seen["fp_in"]).abs().mean() > 1e-2 * seen["fp_in"].abs().mean()
    assert (targets - seen["q_out"]).abs().mean() > 1e-2 * seen["fp_out"].abs().mean()


def test_only_weights_and_biases_get_gradients_and_quantizers_stay_frozen():
    fp = tiny_vit()
    x = images(32)
    q = quantize_vit(copy.deepcopy(fp), 4, 4, "sulq")
    set_quant_state(q, weights=True, activations=True)
    start_activation_calibration(q)
    calibrate_weights(q)
    with torch.no_grad():
        q(x)
    unit = q.blocks[0]
    params = trainable_parameters(unit)
    names = {n for n, p in unit.named_parameters() if any(p is t for t in params)}
    linears = [n for n, m in unit.named_modules() if isinstance(m, QLinear)]
    assert names == {f"{n}.{k}" for n in linears for k in ("weight", "bias")}
    assert not any("norm" in n for n in names)
    # A full SOS run: quantizer state frozen after its calibration, norms never trained.
    q2 = quantize_vit(copy.deepcopy(fp), 4, 4, "sulq")
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, True)) for n, p in q2.named_parameters()]
    norms_before = {k: v.clone() for k, v in q2.state_dict().items() if ".norm" in k}
    run_isvit(q2, fp, x, reconstruction="single", iters=3, batch_size=16)
    for h in hooks:
        h.remove()
    assert grads and all(n.endswith((".weight", ".bias")) and "norm" not in n for n in grads)
    state = q2.state_dict()
    for k, v in norms_before.items():
        assert torch.equal(state[k], v), f"{k} must stay frozen"
    assert sum(p.numel() for q_ in quantizers(q2) for p in q_.parameters()) == 0  # buffers only
    # More reconstruction steps move the weights but not the calibrated quantizer state.
    frozen = {k: v.clone() for k, v in q2.state_dict().items() if "quant" in k}
    weight = q2.blocks[0].attn.qkv.weight.clone()
    inputs, targets, args, kwargs = stage_three_pairs(q2, fp, 1, x, 16, torch.device("cpu"))
    reconstruct(q2.blocks[0], inputs, targets, args, kwargs, iters=3, batch_size=16, lr=1e-3,
                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(q2.blocks[0].attn.qkv.weight, weight)
    assert all(torch.equal(q2.state_dict()[k], v) for k, v in frozen.items())


def test_reconstruction_lowers_every_units_loss():
    fp = tiny_vit()
    q = quantize_vit(copy.deepcopy(fp), 3, 3, "sulq")
    stats = run_isvit(q, fp, images(64), reconstruction="sos", iters=30, batch_size=16, lr=1e-4)
    assert set(stats["seconds"]) == {"stage1", "stage2", "stage3"}
    trained = [u for u in stats["loss"]["stage3"] if u["before"] > 0]
    assert len(trained) == 4  # patch embedding, 2 blocks, head
    assert all(u["after"] < u["before"] for u in trained)


def test_saved_model_reloads_with_identical_outputs(tmp_path):
    from effitrain.lightning_modules.isvit_ptq import build_quantized, load_isvit
    from safetensors.torch import load_file

    fp = tiny_vit()
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    q = build_quantized(copy.deepcopy(fp), 3, 3, "sulq", "sos", "percentile", True)
    run_isvit(q, fp, images(32), reconstruction="sos", iters=2, batch_size=16, lr=1e-3)
    from effitrain.methods.vit_ptq import save_quantized_vit

    save_quantized_vit(q, tmp_path, {"model_name": "vit_tiny_patch16_224", "model_kwargs": kwargs,
                                     "num_classes": 10, "w_bits": 3, "a_bits": 3, "post_softmax": "sulq",
                                     "reconstruction": "sos", "init": "percentile", "weight_channel_wise": True})
    tensors = load_file(str(tmp_path / "model.safetensors"))
    codes = tensors["blocks.0.attn.qkv.weight_codes"]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    assert "blocks.0.attn.qkv.weight" not in tensors and "blocks.0.attn.quant.probs.eta" in tensors
    loaded = load_isvit(tmp_path)
    x = images(16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


# ------------------------------------------------------------------------------------------------------------
# Bad input: errors before any calibration
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_2_to_8_fail(bits):
    with pytest.raises(ValueError, match="from 2 to 8"):
        quantize_vit(tiny_vit(), bits, 4)
    with pytest.raises(ValueError, match="from 2 to 8"):
        quantize_vit(tiny_vit(), 4, bits)


def test_model_without_attention_blocks_fails():
    with pytest.raises(ValueError, match="no `blocks`"):
        quantize_vit(timm.create_model("resnet18", num_classes=10), 4, 4)
    mlp_mixer_like = nn.Module()
    mlp_mixer_like.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))])
    with pytest.raises(ValueError, match="no attention module"):
        quantize_vit(mlp_mixer_like, 4, 4)


def test_recipe_checks_before_calibration(tmp_path):
    from effitrain.lightning_modules.isvit_ptq import ISViTPTQ

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ISViTPTQ(model_kwargs=kwargs, calib_images=32, batch_size=64)
    with pytest.raises(ValueError, match="from 2 to 8"):
        ISViTPTQ(model_kwargs=kwargs, w_bits=1)
    with pytest.raises(ValueError, match="post_softmax"):
        ISViTPTQ(model_kwargs=kwargs, post_softmax="log10")
    with pytest.raises(ValueError, match="no attention module|no `blocks`"):
        ISViTPTQ(model_name="resnet18")
    with pytest.raises(ValueError, match="fewer than the batch size"):
        run_isvit(quantize_vit(tiny_vit(), 4, 4), tiny_vit(), images(8), batch_size=16)


@pytest.mark.parametrize("arch", ["vit", "illama"])
def test_step_sequence_matches_the_plan_and_quantizes_everything(arch):
    from effitrain.methods.isvit_sos import apply_step, isvit_steps, planned_steps

    fp = tiny_vit() if arch == "vit" else tiny_illama()
    q = quantize_vit(copy.deepcopy(fp), 4, 4, "sulq", twins=illama_twins())
    stats: dict = {}
    stages = []
    for step in isvit_steps(q, fp, images(32), iters=2, batch_size=16, lr=1e-4, stats=stats):
        with torch.enable_grad():
            apply_step(step)
        stages.append((step.stage, step.unit))
    # Stage one skips the patch embedding (nothing quantized there: FP weights, FP image); stage three has all.
    units = [n for n, _ in reconstruction_units(q)]
    assert stages == [("stage1", u) for u in units[1:] for _ in range(2)] + [("stage3", u) for u in units for _ in range(2)]
    assert len(stages) == planned_steps(q, "sos", 2)
    assert all(bool(m.initialized) for m in quantizers(q) if hasattr(m, "initialized"))
    assert set(stats["seconds"]) == {"stage1", "stage2", "stage3"}
