"""MoFO: the Momentum-Filtered Optimizer (Chen et al., "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning", arXiv 2407.20999, Algorithm 1; official code
YChen-zzz/MoFO ``algorithms_MoFO.py``).

Each parameter tensor is one partition. At step t, with fraction α:

    θ ← θ · (1 − lr·λ)                                    decoupled weight decay, every entry
    m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²        dense moments, fp32, every entry
    S = the k = max(1, ⌊α·numel⌋) entries of largest |m|   (entries tied with the k-th value join S)
    θ_S ← θ_S − lr/(1 − β1^t) · m_S / (√v_S / √(1 − β2^t) + ε)

Tensors named ``*bias*`` / ``*norm*`` take the full Adam step, so α = 1 is exactly AdamW.

Speed. The dense part is one fused kernel (``torch._fused_adamw_`` on CPU and CUDA) that updates m
and v and writes the full Adam step into a zeroed buffer u; the filtered step is then θ += u ⊙ [|m| >= τ]
(a compare and an ``addcmul``). ``torch.topk`` / ``kthvalue`` on |m| cost several AdamW steps on CPU, so
``topk_threshold`` uses dense compare-and-count passes instead: a band of values around a first guess
(the previous step's threshold, or cold, a fixed random sample of |m|) is counted at both ends, and the
k-th largest value is taken directly among the few values inside it; when the band misses, a
safeguarded search on exact counts ``#{|m| >= t}`` moves it. The selected set is exactly the top-k
(+ ties) whatever path the search took, so resumed runs and DDP ranks (same all-reduced gradients) make
the same update. Tensors with the same number of entries are stacked so each pass covers all of them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_SMALL_ROW = 4096  # rows this short take torch.kthvalue directly
_SAMPLE = 2048  # sample size per row for the cold-start guess
_STACK_CAP = 1 << 25  # at most this many entries stacked per pass (bounds the scratch memory)
_END_GAME = 16  # bracket holding this few values: plain interpolation of their order
_EXTRACT = 64  # a bracket holding this few values (or under 1/_EXTRACT_SHARE of the row): take the k-th directly
_EXTRACT_SHARE = 8
_BAND = 64  # the narrowest warm band, in counts either side of the guess
_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")
_NUMPY_ON_CPU = True  # count with NumPy on CPU tensors (tests turn it off to exercise the torch path)


def _sample_index(numel: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random positions (sorted, for locality); the same on every rank and every step."""
    gen = torch.Generator().manual_seed(numel)
    return torch.randperm(numel, generator=gen)[:_SAMPLE].sort().values.to(device)


def _count_ge(a: Tensor, t: list[float], scratch: Tensor, rows: list[int] | None = None, slot: int = 0) -> list[int]:
    """Exact ``#{a[i, :] >= t[i]}`` for each row in ``rows`` (all when ``None``; the others come back 0).
    On CPU the flags ``a[i] >= t[i]`` stay in byte slot ``slot`` (0 or 1) of the row's scratch, so an
    extraction between two counted points needs no compare pass of its own.

    CPU: NumPy's SIMD compare into a byte buffer and ``count_nonzero``; about twice as fast as torch's
    compare-and-sum, and torch's bool reductions are slower still. Elsewhere: a torch compare into a float
    buffer and a float sum (exact in fp32 up to 2^24 entries, fp64 beyond).
    """
    n_rows, n = a.shape
    rows = list(range(n_rows)) if rows is None else rows
    counts = [0] * n_rows
    if a.device.type == "cpu" and _NUMPY_ON_CPU:
        values, flags = a.numpy(), scratch.numpy().view(np.bool_)[:, slot * n : (slot + 1) * n]
        for i in rows:
            np.greater_equal(values[i], np.float32(t[i]), out=flags[i])
            counts[i] = int(np.count_nonzero(flags[i]))
        return counts
    acc = torch.float32 if n <= (1 << 24) else torch.float64
    thresholds = torch.tensor(t, dtype=a.dtype, device=a.device).unsqueeze(1)
    if len(rows) == n_rows:
        torch.ge(a, thresholds, out=scratch)
        return [round(c) for c in scratch.sum(1, dtype=acc).tolist()]
    index = torch.tensor(rows, device=a.device)
    sub = a.index_select(0, index)
    torch.ge(sub, thresholds.index_select(0, index), out=sub)
    for i, c in zip(rows, sub.sum(1, dtype=acc).tolist(), strict=True):
        counts[i] = round(c)
    return counts


def _kth_in_bracket(a: Tensor, i: int, r: _RowSearch, j: int, scratch: Tensor) -> float:
    """The j-th largest (1-based) value of row i among those in the bracket [r.lo, r.hi), by extracting
    them: cheaper than the counts that would pin down the last values at random places. On CPU the
    band is the difference of the two counts' flags when both are still in the scratch."""
    lo, hi = r.lo, r.hi
    if a.device.type == "cpu" and _NUMPY_ON_CPU:
        n = a.shape[1]
        row, flags = a.numpy()[i], scratch.numpy().view(np.bool_)[i]
        band = flags[2 * n : 3 * n]
        slot_lo, slot_hi = r.flag_slot.get(lo), r.flag_slot.get(hi)
        if slot_lo is not None and slot_hi is not None and slot_lo != slot_hi:
            np.not_equal(flags[slot_lo * n : (slot_lo + 1) * n], flags[slot_hi * n : (slot_hi + 1) * n], out=band)
        else:
            below = flags[3 * n : 4 * n]
            np.greater_equal(row, np.float32(lo), out=band)
            np.less(row, np.float32(hi), out=below)
            np.logical_and(band, below, out=band)
        values = row[band]
        return float(np.partition(values, values.size - j)[values.size - j])
    row = a[i]
    values = row[(row >= lo) & (row < hi)].sort().values
    return float(values[values.numel() - j])


class _RowSearch:
    """Search state of one row: the bracket [lo, hi) with count(lo) >= k > count(hi) and the next
    point t to count. Before both ends are counted: Newton steps with the sample's density of values
    (counts per unit of value), aimed a little past k so that they bracket it; after: regula falsi
    on the count with the Illinois rule (an end kept twice has its weight halved), which converges
    superlinearly and never leaves the bracket."""

    def __init__(self, n: int, k: int, t: float, slope: float, plan: Sequence[float] = ()) -> None:
        self.n, self.k = n, k
        self.plan = [_f32(p) for p in plan]  # points to count next while they stay inside the bracket
        self.flag_slot: dict[float, int] = {}  # counted point -> the scratch slot holding its flags
        self.lo, self.c_lo, self.hi, self.c_hi = 0.0, n, math.inf, 0
        self.t, self.slope = _f32(t), slope
        self.w_lo = self.w_hi = 1.0
        self.kept = 0  # +1: lo moved last, -1: hi moved last
        self.gaps = [n, n]
        self.lo_counted = False
        self.wide_slope: float | None = None
        self.probed = False  # the last point tested an end of the bracket
        self.boost = 1.25  # Newton overshoot, doubled after each step that fails to cross k

    def done(self) -> bool:
        return self.c_lo == self.k or _next_up(self.lo) >= self.hi

    def update(self, c: int) -> None:
        """Record count(t) = c, then choose the next t (the caller stops when ``done()``)."""
        t, k = self.t, self.k
        empty = c == (self.c_lo if c >= k else self.c_hi)  # the bracket shrank but held no values
        if c >= k:
            self.lo, self.c_lo, self.lo_counted = t, c, True
            self.w_lo, self.w_hi = 1.0, self.w_hi / 2 if self.kept == 1 else self.w_hi
            self.kept = 1
        else:
            self.hi, self.c_hi = t, c
            self.w_hi, self.w_lo = 1.0, self.w_lo / 2 if self.kept == -1 else self.w_lo
            self.kept = -1
        if self.done():
            return
        while self.plan:
            nxt = self.plan.pop(0)
            if self.lo < nxt < self.hi:
                self.t = nxt
                return
        gap = self.c_lo - self.c_hi
        self.gaps.append(gap)
        bracketed = self.lo_counted and math.isfinite(self.hi)
        if bracketed and self.wide_slope is None and self.hi > self.lo:
            self.wide_slope = gap / (self.hi - self.lo)  # the density over the first, widest bracket
        probe, self.probed = empty and not self.probed and bracketed and gap > _END_GAME, False
        if bracketed and gap <= _END_GAME and gap < self.gaps[-3]:
            # a few values left in the bracket, at unknown places: aim at the expected position of the
            # boundary between the k-th and (k+1)-th under uniform spacing (Illinois would skew it);
            # when two counts leave the gap unchanged (tied values), the bit bisection below takes over
            nxt = self.lo + (self.hi - self.lo) * (self.c_lo - k + 0.5) / (gap + 1)
        elif probe:  # the values may all sit at one end of the bracket (e.g. a pile of zeros): test it
            nxt = _next_up(self.lo) if c < k else _next_down(self.hi)
            self.probed = True
        elif self.lo_counted and math.isfinite(self.hi):  # both ends counted
            if gap > self.gaps[-3] / 2:
                # two counts without halving the count gap (e.g. a pile of equal values): bisect the
                # bracket's float bit patterns, which ends within 32 counts whatever the values
                nxt = _bits_mid(self.lo, self.hi)
            else:  # Illinois regula falsi
                f_lo, f_hi = (self.c_lo - k) * self.w_lo, (self.c_hi - k) * self.w_hi
                nxt = self.lo + (self.hi - self.lo) * f_lo / (f_lo - f_hi)
        else:  # one end still open: Newton steps with the density, lengthened until they cross k
            nxt = t + (c - k) * self.boost / self.slope if self.slope > 0 else math.nan
            self.boost *= 2
            if not self.lo < nxt < self.hi:
                if math.isinf(self.hi):
                    nxt = max(2 * t, 1e-30)
                else:  # below the lowest count: is there a pile of zeros under k? (one count says)
                    nxt = _next_up(0.0) if self.lo == 0.0 and not self.lo_counted else self.hi / 2
        self.t = min(max(_f32(nxt), _next_up(self.lo)), _next_down(self.hi))


def _f32(x: float) -> float:
    """x rounded to the nearest fp32 value (struct is ~10x cheaper than NumPy scalars here)."""
    if not abs(x) <= 3.4028234663852886e38:  # beyond fp32 (or nan): pack would raise
        return math.copysign(math.inf, x) if not math.isnan(x) else x
    return _F32.unpack(_F32.pack(x))[0]


def _bits(x: float) -> int:
    return _U32.unpack(_F32.pack(x))[0]


def _from_bits(b: int) -> float:
    return _F32.unpack(_U32.pack(b))[0]


def _bits_mid(lo: float, hi: float) -> float:
    """The fp32 value whose bit pattern is halfway between those of the non-negative fp32 lo and hi."""
    return _from_bits((_bits(lo) + _bits(hi)) // 2)


def _next_up(x: float) -> float:
    """The next fp32 value above the non-negative fp32 x (+inf stays +inf)."""
    return x if math.isinf(x) else _from_bits(_bits(x) + 1)


def _next_down(x: float) -> float:
    """The next fp32 value below the fp32 x >= 0, toward 0 (0 stays 0; +inf gives the largest float)."""
    if x <= 0.0:
        return 0.0
    return _from_bits(0x7F7FFFFF) if math.isinf(x) else _from_bits(_bits(x) - 1)


def topk_threshold(
    a: Tensor,
    k: int,
    scratch: Tensor | None = None,
    index: Tensor | None = None,
    hint: list[tuple[float, float, float, float]] | None = None,
) -> tuple[list[float], list[tuple[float, float, float, float]]]:
    """Per row of the non-negative fp32 ``a`` [T, N], a threshold τ with ``{a[i] >= τ[i]}`` exactly
    the top-k set of row i plus the entries tied with its k-th largest value.

    τ lies in (v_{k+1}, v_k], v_j being the j-th largest value of the row; any such τ selects the
    same set, so the search stops at the first t whose count is k. The thresholds come back as
    Python floats (exact fp32 values), with a hint for the next call on slowly changing rows.

    Search: a band of values is guessed around the k-th largest, from the hint (the previous call's τ
    and density of values, rescaled by the change of the row's mean, for rows that change slowly such as
    Adam's m; the band as wide as the previous guess's miss) or else from a sorted sample of the row (a
    band of ±3σ of the sample quantile). Both ends are counted; when they bracket k, the k-th largest is
    taken directly among the values inside (at most 1/8 of the row). Otherwise Newton steps with the
    density until both sides of k are counted, Illinois regula falsi inside the bracket, and float-bit
    bisection when that stalls. The search path never changes the result, only its cost: typically
    two counts and one extraction per row.

    Args:
        a: non-negative values, one row per tensor.
        k: how many entries of each row to select, 1 <= k <= N.
        scratch: a float tensor shaped like ``a`` (allocated when missing).
        index: the sample positions (``_sample_index(N, device)`` when missing).
        hint: what the previous call returned, for the same rows.
    """
    n_rows, n = a.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n or n <= _SMALL_ROW:
        tau = (a.amin(1) if k == n else a.kthvalue(n - k + 1, dim=1).values).tolist()
        return tau, [(t, math.nan, math.nan, math.nan) for t in tau]
    if scratch is None:
        scratch = torch.empty_like(a)
    # the scale of each row, to carry a hint over: the mean of a strided subsample (about 16K values, ~1%
    # noise) costs a small part of a full pass, which matters while m ramps up over the first steps
    means = a[:, :: max(1, n // 16384)].mean(1).tolist()
    hint = hint if hint is not None and len(hint) == n_rows else [(math.nan,) * 4] * n_rows
    cold = [i for i, ((tau, slope, mean, _), now) in enumerate(zip(hint, means, strict=True))
            if not (tau > 0 and math.isfinite(slope) and slope > 0 and mean > 0 and now > 0)]
    if cold:  # a sorted sample of each row: its quantile at k/N and a band of ±3σ of that estimate around it
        index = _sample_index(n, a.device) if index is None else index
        s = index.numel()
        rank = k * s / n  # expected 1-based position of the k-th largest value in the sorted sample
        width = max(2, math.ceil(3 * math.sqrt(s * (k / n) * (1 - k / n))))
        j = min(max(round(rank) - 1, 0), s - 1)
        j1, j2 = max(j - width, 0), min(j + width, s - 1)
        sample = a.index_select(1, index).sort(dim=1, descending=True).values
        at_j, at_j1, at_j2 = sample[:, [j, j1, j2]].double().T.tolist()
    searches, guesses = [], []
    for i, ((tau, slope, mean, band), now) in enumerate(zip(hint, means, strict=True)):
        if i in cold:
            slope = (j2 - j1) * (n / s) / (at_j1[i] - at_j2[i]) if at_j1[i] > at_j2[i] else math.nan
            plan = [t for t in (at_j1[i], at_j2[i]) if t > 0]
            # τ was 0 last time (fewer non-zeros than k, e.g. embedding rows of unseen tokens): test that first
            first = _next_up(0.0) if tau == 0.0 else plan.pop(0) if plan else at_j[i]
            searches.append(_RowSearch(n, k, first, slope, plan))
            guesses.append(at_j[i])
        else:  # the previous τ and density, rescaled by how the row's mean moved (m drifts slowly), and a
            # band around it as wide as the last guess's miss: count both ends, then extract inside
            t0, slope = tau * now / mean, slope * mean / now
            hi, lo = t0 + band / slope, t0 - band / slope
            searches.append(_RowSearch(n, k, hi, slope, plan=[lo if lo > 0 else t0 / 2]))
            guesses.append(t0)
    extract = max(_EXTRACT, n // _EXTRACT_SHARE)
    active = list(range(n_rows))
    for call in range(512):  # bisection alone ends within ~70 counts (the bits of a float interval)
        slot = call % 2
        points = [r.t for r in searches]
        counts = _count_ge(a, points, scratch, None if len(active) == n_rows else active, slot)
        for i in active:
            r = searches[i]
            r.flag_slot = {t: sl for t, sl in r.flag_slot.items() if sl != slot}
            r.flag_slot[points[i]] = slot
            r.update(counts[i])
            if not r.done() and r.lo_counted and math.isfinite(r.hi) and r.c_lo - r.c_hi <= extract:
                # few values left between the bracket's ends: take the k-th largest directly
                r.lo, r.c_lo = _kth_in_bracket(a, i, r, k - r.c_hi, scratch), k
        active = [i for i in active if not searches[i].done()]
        if not active:
            break
    else:  # pragma: no cover
        raise RuntimeError("MoFO threshold search did not converge")
    tau = [r.lo for r in searches]
    slopes = [r.wide_slope if r.wide_slope else r.slope for r in searches]
    # next band: twice this guess's miss in counts, so a steadily drifting threshold stays inside it
    bands = [min(max(_BAND, 2 * abs(t - g) * sl), extract / 2) if math.isfinite(sl) else _BAND
             for t, g, sl in zip(tau, guesses, slopes, strict=True)]
    return tau, list(zip(tau, slopes, means, bands, strict=True))


def _is_dense(name: str | None, param: Tensor, dense_keywords: Sequence[str]) -> bool:
    """The partitions that take the full Adam step: names containing a dense keyword; without names
    (plain parameter lists), tensors of fewer than two dimensions (biases and norm weights)."""
    if name is not None:
        return any(key in name for key in dense_keywords)
    return param.ndim < 2


class MoFO(torch.optim.Optimizer):
    """Momentum-filtered AdamW (arXiv 2407.20999, Algorithm 1).

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Named parameters
            (``model.named_parameters()``, or :func:`mofo_param_groups`) let the dense rule go by name.
        lr: learning rate.
        betas: (β1, β2) of the moment averages.
        eps: ε added to the bias-corrected √v.
        weight_decay: decoupled weight decay λ, applied to every entry.
        fraction: α, the fraction of each filtered tensor updated per step (settable per group);
            the paper advises 0.05 to 0.2 and uses 0.15. 1.0 is AdamW.
        dense_keywords: names containing any of these take the full Adam step (paper: bias, norm).
            Parameters given without names are dense when they have fewer than 2 dimensions.

    Raises:
        ValueError: on a learning rate, ε, β, weight decay or fraction out of range.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float = 0.15,
        dense_keywords: Sequence[str] = ("bias", "norm"),
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate {lr}: must be >= 0")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps {eps}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: both must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay {weight_decay}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fraction=fraction)
        super().__init__(params, defaults)
        self.dense_keywords = tuple(dense_keywords)
        for group in self.param_groups:
            if not 0.0 < group["fraction"] <= 1.0:
                raise ValueError(
                    f"Invalid fraction {group['fraction']}: must be in (0, 1] (the paper advises 0.05-0.2; "
                    "1.0 is AdamW)"
                )
        self._buffers: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._index: dict[tuple, Tensor] = {}
        self._hints: dict[tuple, list[tuple[float, float, float, float]]] = {}  # (τ, density, mean, band)

    # ----------------------------------------------------------------------------------------- state
    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the moments stay fp32 for low-precision parameters
        (the base class casts every floating state tensor to the parameter's dtype)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            if i in saved and p.dtype != torch.float32:
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ step
    def _buffers_for(self, device: torch.device, numel: int) -> tuple[Tensor, Tensor, Tensor]:
        """Persistent flat fp32 buffers (Adam steps, |m| then masks, count flags), shared by all tensors
        of a device and grown on demand: about 3 x min(_STACK_CAP, total) entries."""
        bufs = self._buffers.get(device)
        if bufs is None or bufs[0].numel() < numel:
            bufs = tuple(torch.empty(numel, dtype=torch.float32, device=device) for _ in range(3))
            self._buffers[device] = bufs
        return bufs

    def _index_for(self, device: torch.device, n: int) -> Tensor:
        key = (device, n)
        if key not in self._index:
            self._index[key] = _sample_index(n, device)
        return self._index[key]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - the Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names")
            beta1, beta2 = group["betas"]
            lr, eps, wd, fraction = group["lr"], group["eps"], group["weight_decay"], group["fraction"]
            by_kind: dict[tuple, list[tuple[Tensor, int]]] = {}
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoFO does not support sparse gradients")
                dense = fraction >= 1.0 or _is_dense(names[j] if names else None, p, self.dense_keywords)
                k = p.numel() if dense else max(1, int(p.numel() * fraction))
                by_kind.setdefault((p.device, p.dtype), []).append((p, k))
            for (_, dtype), members in by_kind.items():
                self._update(members, dtype, lr, beta1, beta2, eps, wd)
        return loss

    def _thresholds(self, absm: Tensor, k: int, scratch: Tensor, key: tuple) -> list[float]:
        """Per row of |m| (a stack of same-size tensors), the top-k threshold; ``key`` names the stack
        so the next step's search starts from this one's result."""
        index = self._index_for(absm.device, absm.shape[1]) if absm.shape[1] > _SMALL_ROW else None
        tau, self._hints[key] = topk_threshold(absm, k, scratch, index, self._hints.get(key))
        return tau

    def _update(
        self, members: list[tuple[Tensor, int]], dtype: torch.dtype, lr: float, beta1: float, beta2: float,
        eps: float, wd: float,
    ) -> None:
        """One step for tensors sharing device and dtype, in chunks of at most ``_STACK_CAP`` entries (so
        the scratch stays bounded); filtered tensors with the same (numel, k) are adjacent so their
        threshold searches share each pass."""
        states = [self._init_state(p) for p, _ in members]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        if wd != 0:
            torch._foreach_mul_([p for p, _ in members], 1 - lr * wd)
        order = sorted(range(len(members)), key=lambda i: (members[i][1] == members[i][0].numel(),
                                                           members[i][0].numel(), members[i][1]))
        chunk, total = [], 0
        for i in order:
            n = members[i][0].numel()
            if chunk and total + n > _STACK_CAP:
                self._update_chunk([members[j] for j in chunk], [states[j] for j in chunk], dtype, lr, beta1,
                                   beta2, eps)
                chunk, total = [], 0
            chunk.append(i)
            total += n
        if chunk:
            self._update_chunk([members[j] for j in chunk], [states[j] for j in chunk], dtype, lr, beta1,
                               beta2, eps)

    def _update_chunk(
        self, members: list[tuple[Tensor, int]], states: list[dict[str, Tensor]], dtype: torch.dtype,
        lr: float, beta1: float, beta2: float, eps: float,
    ) -> None:
        """u = −lr·m̂/(√v̂ + ε) for every entry (moments updated densely), then θ += u ⊙ [|m| >= τ]."""
        params = [p for p, _ in members]
        device, numels = params[0].device, [p.numel() for p in params]
        step_buf, abs_buf, flag_buf = self._buffers_for(device, sum(numels))
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        step_buf[: offsets[-1]].zero_()
        updates = [step_buf[o : o + n].view(p.shape) if p.is_contiguous() else torch.zeros_like(p, dtype=torch.float32)
                   for p, o, n in zip(params, offsets[:-1], numels, strict=True)]
        grads = [p.grad if dtype == torch.float32 else p.grad.float() for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        _adam_step_into(updates, grads, exp_avgs, [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                        lr, beta1, beta2, eps)
        del grads
        groups: dict[tuple[int, int], list[int]] = {}  # filtered tensors by (numel, k); adjacent by the order
        for i, (p, k) in enumerate(members):
            if k == p.numel():
                p.add_(updates[i])
            else:
                groups.setdefault((p.numel(), k), []).append(i)
        for (n, k), rows in groups.items():
            start = offsets[rows[0]]
            absm = abs_buf[start : start + len(rows) * n].view(len(rows), n)
            for r, i in enumerate(rows):
                torch.abs(exp_avgs[i].reshape(-1), out=absm[r])
            scratch = flag_buf[start : start + len(rows) * n].view(len(rows), n)
            tau = self._thresholds(absm, k, scratch, tuple(id(exp_avgs[i]) for i in rows))
            for r, i in enumerate(rows):
                mask = torch.ge(absm[r], tau[r], out=absm[r])  # 1.0 on the selected entries, in place
                params[i].addcmul_(updates[i], mask.view(params[i].shape))


def _adam_step_into(
    out: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float,
) -> None:
    """Adam's moments updated in place and its step −lr/(1−β1^t)·m/(√v/√(1−β2^t) + ε) written into the
    zeroed ``out``. On CPU and CUDA this is torch's fused AdamW kernel run on the zero buffers as its
    "parameters" (one pass instead of foreach's nine); elsewhere the same math with foreach ops."""
    device = out[0].device
    if device.type in ("cpu", "cuda"):
        steps_here = steps if device.type == "cpu" else [s.to(device) for s in steps]
        torch._fused_adamw_(out, grads, exp_avgs, exp_avg_sqs, [], steps_here, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** s.item()) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(out, exp_avgs, denom, [-(lr / (1 - beta1 ** s.item())) for s in steps])


def mofo_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay_keywords: Sequence[str] = ("norm", "ln_f"),
) -> list[dict[str, Any]]:
    """Named param groups for :class:`MoFO` from a model's trainable parameters.

    Names carry the dense rule into the optimizer (``*bias*`` / ``*norm*`` take the full Adam step).
    As in the official code, names containing ``norm`` / ``ln_f`` get no weight decay.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(key in name for key in no_decay_keywords) else decay).append((name, p))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
