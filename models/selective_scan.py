"""Mamba's selective scan (Gu & Dao, arXiv 2312.00752, Sec. 3.2 / Algorithm 2), fast in plain PyTorch.

For each batch row b, channel d and state n:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t          (ZOH for A, Euler for B, as mamba-ssm)
    y_t = C_t · h_t + D u_t,      y_t ← y_t · silu(z_t)

`selective_scan` has the signature and shapes of mamba-ssm's `selective_scan_ref`:
u, delta, z: (batch, Di, L); A: (Di, N); B, C: (batch, N, L); D, delta_bias: (Di,). It dispatches to

* mamba-ssm's CUDA kernel (`selective_scan_fn`) when the inputs are on a GPU and `mamba_ssm` imports;
* otherwise `_ChunkedScan`, a custom autograd Function that never materialises the (batch, Di, L, N) state
  tensor. The sequence is cut into chunks of `chunk_size` steps; per chunk, exp(ΔA) and ΔBu are built in one
  vectorised op, the recurrence is one in-place `addcmul_` per step (on a cache-sized (batch, Di, N) slice),
  and y = C·h is one batched matmul. Only the state at each chunk start is saved. The backward pass
  recomputes a chunk's states from its saved start, runs the adjoint recurrence
  g_t = C_t dy_t + exp(Δ_{t+1} A) ⊙ g_{t+1} backwards with the same one-op step, and reduces the
  gradients of u, Δ, A, B, C per chunk with batched matmuls. All in fp32; only exp of non-positive
  numbers (Δ ≥ 0, A < 0) is taken, so nothing overflows, unlike `exp(cumsum(ΔA))` forms that divide by it.

`selective_scan_ref` is the sequential loop, kept as the test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the fused CUDA kernel of the official code; optional, GPU only
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except Exception:  # ImportError, or a CUDA extension that fails to load
    _mamba_ssm_scan = None

__all__ = ["selective_scan", "selective_scan_ref", "mamba_ssm_available"]

IMPLEMENTATIONS = ("auto", "chunked", "ref", "cuda")


def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be imported."""
    return _mamba_ssm_scan is not None


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, Di, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, di, length = u.shape
    if A.dim() != 2 or A.shape[0] != di:
        raise ValueError(f"A must be (Di={di}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if tuple(m.shape) != (batch, n, length):
            raise ValueError(
                f"{name} must be input-dependent with shape (batch, N, L) = {(batch, n, length)}; "
                f"got {tuple(m.shape)} (time-invariant or grouped B/C are not supported here)"
            )


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta if delta.dtype == torch.float64 else delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The sequential scan, one step per token (the semantics of mamba-ssm's `selective_scan_ref`):
    `selective_scan(..., impl="ref")`, arguments as there.

    Runs in fp32 like mamba-ssm, or in fp64 when u is fp64 (a tighter oracle for tests and benchmarks).
    """
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, impl="ref")


def _sequential_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """y = C·h (batch, Di, L) and h_L (batch, Di, N), one step per token; delta already prepared."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return torch.stack(ys, dim=2), h


def _chunk_states(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, start: Tensor, decay: Tensor,
                  states: Tensor) -> None:
    """Fills decay[i] = exp(Δ_i A) and states[i+1] = h_i of one chunk, in place, from states[0] = start.

    delta, delta_u: (T, b, Di); B: (T, b, N); decay: (T, b, Di, N); states: (T+1, b, Di, N) workspaces.
    """
    torch.exp(torch.mul(delta[..., None], A, out=decay), out=decay)
    states[0] = start
    torch.mul(delta_u[..., None], B[:, :, None, :], out=states[1:])  # Δ_t B_t u_t
    for block in _row_blocks(states.shape[1], states.shape[2] * states.shape[3]):
        d, h = decay[:, block], states[:, block]
        for i in range(decay.shape[0]):  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, one fused op per step
            h[i + 1].addcmul_(d[i], h[i])


def _row_blocks(batch: int, row_numel: int) -> list[slice]:
    """Batch-row blocks of at most 32768 elements (ATen's GRAIN_SIZE) for the per-step ops.

    Such ops run on one thread. An op above the grain size forks to all intra-op threads for a few
    microseconds of work, and on a busy machine each fork/join waits for descheduled threads (measured: 14x
    slower scans at 2 threads under load); the chunk-sized ops stay multi-threaded.
    """
    per_block = max(1, 32768 // row_numel)
    return [slice(r, min(r + per_block, batch)) for r in range(0, batch, per_block)]


class _ChunkedScan(torch.autograd.Function):
    """y = C·h with h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, fp32, chunked, with a recomputing backward.

    Works in time-major layout: u, delta (L, b, Di); B, C (L, b, N); A (Di, N). Returns y (L, b, Di) and the
    last state (b, Di, N). Chunk-sized workspaces are allocated once per call and reused across chunks
    (fresh multi-megabyte allocations cost more than the arithmetic on CPU).
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int):
        length, batch, di = u.shape
        n = A.shape[1]
        chunk_size = min(chunk_size, length)
        delta_u = delta * u
        y = u.new_empty(length, batch, di)
        starts = u.new_empty(-(-length // chunk_size), batch, di, n)
        decay_ws = u.new_empty(chunk_size, batch, di, n)
        states_ws = u.new_empty(chunk_size + 1, batch, di, n)
        h = u.new_zeros(batch, di, n)
        for c, s in enumerate(range(0, length, chunk_size)):
            e = min(s + chunk_size, length)
            t = e - s
            starts[c] = h
            decay, states = decay_ws[:t], states_ws[: t + 1]
            _chunk_states(delta[s:e], delta_u[s:e], A, B[s:e], h, decay, states)
            torch.sum(torch.mul(states[1:], C[s:e, :, None, :], out=decay), dim=-1, out=y[s:e])
            h = states[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.chunk_size = chunk_size
        return y, h

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        length, batch, di = u.shape
        n = A.shape[1]
        dy = dy.contiguous() if dy is not None else u.new_zeros(length, batch, di)
        delta_u = delta * u
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        decay_ws = u.new_empty(chunk_size, batch, di, n)
        states_ws = u.new_empty(chunk_size + 1, batch, di, n)
        g_ws = u.new_empty(chunk_size, batch, di, n)
        tmp_ws = u.new_empty(chunk_size, batch, di, n)
        # carry = exp(Δ_{t+1} A) g_{t+1} for t the last step of the current chunk (dL/dh_L at the end)
        carry = dlast.clone() if dlast is not None else u.new_zeros(batch, di, n)
        for c in reversed(range(starts.shape[0])):
            s = c * chunk_size
            e = min(s + chunk_size, length)
            t, rows = e - s, (e - s) * batch
            decay, states, g, tmp = decay_ws[:t], states_ws[: t + 1], g_ws[:t], tmp_ws[:t]
            _chunk_states(delta[s:e], delta_u[s:e], A, B[s:e], starts[c], decay, states)
            # adjoint of h: g_t = dy_t C_t + exp(Δ_{t+1} A) g_{t+1}
            torch.mul(dy[s:e, :, :, None], C[s:e, :, None, :], out=g)
            g[-1] += carry
            for block in _row_blocks(batch, di * n):
                d, gr = decay[:, block], g[:, block]
                for i in range(t - 2, -1, -1):
                    gr[i].addcmul_(d[i + 1], gr[i + 1])
            torch.mul(decay[0], g[0], out=carry)
            g_rows = g.view(rows, di, n)
            torch.bmm(dy[s:e].reshape(rows, 1, di), states[1:].view(rows, di, n), out=dC[s:e].view(rows, 1, n))
            torch.bmm(delta_u[s:e].reshape(rows, 1, di), g_rows, out=dB[s:e].view(rows, 1, n))
            g_dot_b = torch.mul(g, B[s:e, :, None, :], out=tmp).sum(-1)
            torch.mul(g_dot_b, delta[s:e], out=du[s:e])
            # dL/dlog(decay) = g_t ⊙ h_{t-1} ⊙ exp(Δ_t A); log(decay) = Δ_t A
            grad_log_decay = states[:-1].mul_(decay).mul_(g)
            ddelta[s:e] = torch.mul(grad_log_decay, A, out=tmp).sum(-1).addcmul_(g_dot_b, u[s:e])
            dA += torch.mul(grad_log_decay, delta[s:e, :, :, None], out=tmp).sum((0, 1))
        return du, ddelta, dA, dB, dC, None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's `selective_scan_ref` semantics; returns y (batch, Di, L) in u's dtype.

    Args:
        u, delta, z: (batch, Di, L). A: (Di, N), real (A = -exp(A_log)). B, C: (batch, N, L).
        D, delta_bias: (Di,). delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return h_L (batch, Di, N).
        impl: "auto" (CUDA kernel on GPU when mamba-ssm imports, else "chunked"), "chunked", "ref"
            (the sequential loop) or "cuda" (mamba-ssm, required).
        chunk_size: steps per chunk of the chunked path: memory for saved states is L / chunk_size states.

    Raises:
        ValueError: on shapes that differ from the above, an unknown `impl` or a non-positive `chunk_size`.
        RuntimeError: `impl="cuda"` without mamba-ssm or without CUDA inputs.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of steps, got {chunk_size}")
    _check_shapes(u, delta, A, B, C)
    if impl == "cuda" or (impl == "auto" and u.is_cuda and _mamba_ssm_scan is not None):
        if _mamba_ssm_scan is None or not u.is_cuda:
            raise RuntimeError("impl='cuda' needs `pip install mamba-ssm` and CUDA tensors; use impl='chunked'")
        return _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype_in = u.dtype
    # fp32 always, as mamba-ssm; the sequential loop keeps fp64 inputs in fp64 (the tighter oracle)
    compute = torch.float64 if impl == "ref" and dtype_in == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_c = u.to(compute)
        delta = _prepare_delta(delta.to(compute), delta_bias, delta_softplus)
        if impl == "ref":
            y, last = _sequential_scan(u_c, delta, A.to(compute), B.to(compute), C.to(compute))
        else:
            y, last = _ChunkedScan.apply(
                u_c.permute(2, 0, 1).contiguous(),
                delta.permute(2, 0, 1).contiguous(),
                A.float().contiguous(),
                B.float().permute(2, 0, 1).contiguous(),
                C.float().permute(2, 0, 1).contiguous(),
                chunk_size,
            )
            y = y.permute(1, 2, 0)
        y = _finish(y, u_c, D, z).to(dtype_in)
    return (y, last) if return_last_state else y
