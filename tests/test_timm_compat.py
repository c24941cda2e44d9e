"""timm's generic model checks (pytorch-image-models ``tests/test_models.py``: backward, default cfgs for
non-standard (token) models, ``forward_intermediates``, ``features_only``, FX) on this project's iLLaMA and
Mamba-R, with values compared where timm's tests only compare shapes, plus a ``save_for_hf`` round trip.

TorchScript is not tested: ``torch.jit.script`` is deprecated in PyTorch 2.x (it warns "switch to
torch.compile or torch.export"); the models keep validating Python properties (``soft_mask_rate``,
``mask_mode``) and Mamba-R's selective scan chooses its kernel at run time, neither of which scripts.
FX tracing, the graph path timm's feature extraction uses, is tested instead.
"""

from __future__ import annotations

import json
import math

import effitrain.models  # noqa: F401  (registers the models with timm)
import pytest
import timm
import torch
from timm.data import resolve_data_config

MODELS = ["test_illama", "test_mambar"]
VARIANTS = {  # the non-default layouts: class token first; one register (Vim's middle token); no registers
    "test_illama": [{}, {"class_token_position": "first"}],
    "test_mambar": [{}, {"num_registers": 1, "cls_reduce": 1}, {"num_registers": 0, "cls_reduce": 1}],
}
CASES = [(name, kwargs) for name in MODELS for kwargs in VARIANTS[name]]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES]


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def image(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def patch_tokens(model, tokens: torch.Tensor) -> torch.Tensor:
    """The patch tokens of a forward_features output (class token / registers removed), raster order."""
    if hasattr(model, "cls_index"):
        return tokens[:, :-1] if model.class_token_position == "last" else tokens[:, 1:]
    keep = torch.ones(tokens.shape[1], dtype=torch.bool)
    keep[model.register_positions] = False
    return tokens[:, keep]


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_backward_reaches_every_parameter(name, kwargs):
    model = make(name, num_classes=42, **kwargs).train()
    out = model(image())
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert out.shape == (2, 42) and not missing and not out.isnan().any()


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_default_cfg_widths_and_heads(name, kwargs):
    """timm's ``test_model_default_cfgs_non_std``: num_features is the width forward_features returns,
    head_hidden_size the width of pre-logits and of the head-less forward."""
    model = make(name, **kwargs)
    x = image()
    with torch.no_grad():
        tokens = model.forward_features(x)
        pre = model.forward_head(tokens, pre_logits=True)
        logits = model(x)
    assert tokens.ndim == 3 and tokens.shape[-1] == model.num_features == model.embed_dim
    assert pre.shape == (2, model.head_hidden_size)
    assert torch.equal(logits, model.head(pre))
    if name == "test_mambar" and model.num_registers > 1:  # register recycling: R·D/cls_reduce features
        assert model.head_hidden_size == model.embed_dim * model.num_registers // model.cls_reduce
    else:
        assert model.head_hidden_size == model.num_features

    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model(x), pre)
    # timm's last non-std check (num_classes=0 gives num_features) holds where the pooled width is the token
    # width: iLLaMA always, Mamba-R with 'avg' (its register recycling reads head_hidden_size features).
    pooled = make(name, num_classes=0, **kwargs)
    assert pooled(x).shape[-1] == pooled.head_hidden_size
    averaged = make(name, num_classes=0, global_pool="avg", **kwargs)
    with torch.no_grad():
        assert averaged(x).shape == (2, averaged.num_features)
        assert torch.allclose(averaged(x), averaged.forward_features(x).mean(dim=1) if name == "test_mambar"
                              else patch_tokens(averaged, averaged.forward_features(x)).mean(dim=1))

    state_dict = model.state_dict()
    cfg = model.pretrained_cfg
    assert cfg["classifier"] + ".weight" not in state_dict  # the head was removed above
    assert make(name, **kwargs).head.weight.shape == (cfg["num_classes"], model.head_hidden_size)
    assert cfg["first_conv"] + ".weight" in state_dict


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_global_pool_empty_keeps_every_token(name, kwargs):
    model = make(name, **kwargs)
    x = image()
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), tokens)
        built = make(name, num_classes=0, global_pool="", **kwargs)
        assert torch.equal(built(x), built.forward_features(x)) and built(x).shape == tokens.shape


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_forward_intermediates(name, kwargs):
    """timm's ``test_model_forward_intermediates``, plus: the last intermediate with ``norm=True`` is the
    patch part of forward_features, and grad checkpointing gives the same features."""
    model = make(name, depth=3, **kwargs)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = info.channels(), info.reduction()
    assert len(channels) == 3
    x = image()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert len(intermediates) == 3
        for c, r, y in zip(channels, reductions, intermediates, strict=True):
            assert y.shape == (2, c, math.ceil(32 / r), math.ceil(32 / r)) and not y.isnan().any()
        features = model.forward_features(x)
        assert torch.equal(final, features)
        last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        assert torch.allclose(last[0], patch_tokens(model, features), atol=1e-6)
        (grid, prefix), = model.forward_intermediates(x, indices=[-1], return_prefix_tokens=True,
                                                      intermediates_only=True)
        assert grid.shape == intermediates[-1].shape and torch.equal(grid, intermediates[-1])
        assert prefix.shape[1] == (1 if name == "test_illama" else model.num_registers)
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x)
        assert torch.allclose(again, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_prune_intermediate_layers_and_features_only(name, kwargs):
    full = make(name, depth=3, **kwargs)
    x = image()
    with torch.no_grad():
        reference = full.forward_intermediates(x, intermediates_only=True)

        pruned = make(name, depth=3, **kwargs)
        assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(getattr(pruned, "blocks", None) or pruned.layers) == 2
        assert pruned.num_classes == 0 and isinstance(pruned.head, torch.nn.Identity)
        kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, reference[:2], strict=True))

        # timm's test_model_forward_features: features_only=True (the last 3 blocks by default)
        features = timm.create_model(name, depth=3, features_only=True, **kwargs).eval()
        assert features.feature_info.channels() == [full.embed_dim] * 3
        assert features.feature_info.reduction() == [full.feature_info[0]["reduction"]] * 3
        features.model.load_state_dict(full.state_dict(), strict=False)  # pruned copy: no head
        outputs = features(x)
        assert len(outputs) == 3 and all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_fields(name):
    model = make(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    for key in ("mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "paper_ids", "origin_url"):
        assert cfg.get(key) is not None, key
    data = resolve_data_config(model=model)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == cfg["mean"] and data["std"] == cfg["std"]


@pytest.mark.parametrize("name", MODELS)
def test_fx_trace_matches_eager(name):
    """timm's ``test_model_forward_fx``: the traced graph gives the eager output exactly."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = make(name)
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    traced = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    with torch.inference_mode():
        assert torch.equal(next(iter(traced(image()).values())), model(image()))


@pytest.mark.parametrize("name, kwargs, change", [
    # A pretrained=True load defaults to the official mask (the released weights'): a strict model's folder
    # must name its mode, or it reloads with the other mask (logits off by ~2e-3 here).
    ("test_illama", {}, {}),
    ("test_illama", {"mask_mode": "official"}, {"mask_mode": "strict"}),  # changed after construction
    ("test_illama", {"mask_mode": "official", "class_token_position": "first"}, {}),
    ("test_mambar", {"num_registers": 2, "cls_reduce": 2}, {}),
])
def test_save_for_hf_reloads_bit_identically(name, kwargs, change, tmp_path):
    from timm.models import save_for_hf

    model = make(name, **kwargs)
    for key, value in change.items():
        setattr(model, key, value)
    if name == "test_illama":
        model.soft_mask_rate = 0.0
    save_for_hf(model, tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    if name == "test_illama":
        assert saved["model_args"]["mask_mode"] == model.mask_mode
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert type(reloaded) is type(model)
    if name == "test_illama":
        assert reloaded.mask_mode == model.mask_mode
        assert reloaded.class_token_position == model.class_token_position
    with torch.no_grad():
        assert torch.equal(reloaded(image()), model(image()))
