"""The chunked selective scan equals the sequential reference (mamba-ssm's `selective_scan_ref` semantics)."""

import pytest
import torch
from effitrain.models.selective_scan import (
    _ChunkedScan,
    mamba_ssm_available,
    selective_scan,
    selective_scan_ref,
)


def make_inputs(batch, di, length, n, delta_scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, di, length, generator=g, dtype=dtype),
        delta=torch.randn(batch, di, length, generator=g, dtype=dtype) * delta_scale,
        A=-torch.exp(torch.randn(di, n, generator=g, dtype=dtype)),
        B=torch.randn(batch, n, length, generator=g, dtype=dtype),
        C=torch.randn(batch, n, length, generator=g, dtype=dtype),
        D=torch.randn(di, generator=g, dtype=dtype),
        z=torch.randn(batch, di, length, generator=g, dtype=dtype),
        delta_bias=torch.randn(di, generator=g, dtype=dtype),
    )


def outputs_and_grads(fn, inputs, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    loss = (y * weights).sum() + (last * last).sum()
    loss.backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


def assert_matches_reference(inputs, **kwargs):
    """fp32 fast path against the fp64 loop (tolerances of mamba-ssm's fp32 scan tests)."""
    y, last, grads = outputs_and_grads(selective_scan, inputs, impl="chunked", **kwargs)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_ref, {k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(y.double(), y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.double(), last_ref, rtol=6e-4, atol=2e-3)
    for name, grad in grads.items():
        ref = grads_ref[name]
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(grad.double() / scale, ref / scale, rtol=6e-4, atol=2e-3, msg=name)


@pytest.mark.parametrize(
    "batch,di,length,n,chunk_size",
    [(2, 8, 1, 4, 16), (2, 8, 37, 4, 16), (1, 6, 64, 16, 16), (3, 5, 100, 8, 7), (2, 4, 127, 16, 1),
     (1, 3, 208, 16, 64), (2, 4, 50, 2, 500), (3, 700, 20, 16, 8)],  # the last: per-step ops in 2 row blocks
)
def test_fast_scan_equals_sequential_reference(batch, di, length, n, chunk_size):
    assert_matches_reference(make_inputs(batch, di, length, n, seed=length), chunk_size=chunk_size)


def test_long_sequence_large_delta_stays_finite_and_exact():
    """L = 256 with A down to -16 and Δ up to ~5: cumsum(ΔA) reaches about -20000, where the
    exp(cumsum)-division form gives inf/NaN. The chunked scan only exponentiates non-positive numbers."""
    inputs = make_inputs(2, 8, 256, 16, delta_scale=3.0, seed=3)
    inputs["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(8, 1)
    inputs["delta_bias"] = torch.full((8,), 2.0)
    cum = (torch.nn.functional.softplus(inputs["delta"] + 2.0)[..., None] * inputs["A"][:, None]).cumsum(2)
    assert torch.isinf(torch.exp(-cum)).any()  # the unsafe formulation would overflow here
    y, last, grads = outputs_and_grads(selective_scan, inputs, impl="chunked")
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert_matches_reference(inputs)


def test_custom_backward_passes_gradcheck():
    """The hand-written backward of the chunked Function against finite differences, in float64."""
    g = torch.Generator().manual_seed(0)
    length, batch, di, n = 9, 2, 3, 4
    u = torch.randn(length, batch, di, generator=g, dtype=torch.float64, requires_grad=True)
    delta = (torch.rand(length, batch, di, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    A = (-torch.rand(di, n, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    B = torch.randn(length, batch, n, generator=g, dtype=torch.float64, requires_grad=True)
    C = torch.randn(length, batch, n, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: _ChunkedScan.apply(*x, 4), (u, delta, A, B, C))


def test_bf16_inputs_scan_in_fp32_and_return_bf16():
    inputs = {k: v.bfloat16() for k, v in make_inputs(2, 8, 40, 16, seed=5).items()}
    y = selective_scan(**inputs, delta_softplus=True, impl="chunked")
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)  # same bf16 inputs, fp32 loop
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise_clear_errors():
    x = make_inputs(2, 8, 10, 4)
    with pytest.raises(ValueError, match="B must be input-dependent"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][:, :, :5], x["C"])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x["u"], x["delta"], x["A"][:4], x["B"], x["C"])
    with pytest.raises(ValueError, match="impl="):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="triton")
    if not mamba_ssm_available():
        with pytest.raises(RuntimeError, match="mamba-ssm"):
            selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_paths_match_reference():
    inputs = {k: v.cuda() for k, v in make_inputs(2, 16, 100, 16, seed=7).items()}
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    impls = ["chunked"] + (["cuda"] if mamba_ssm_available() else [])
    for impl in impls:
        y = selective_scan(**inputs, delta_softplus=True, impl=impl)
        torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
