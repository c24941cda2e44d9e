"""Exact top-k thresholds of large non-negative rows by counting, without ``topk`` or a sort.

For each row of ``a`` [T, N], :func:`topk_threshold` finds a τ with ``{a >= τ}`` exactly the k largest
entries plus those tied with the k-th. It is built for values that change a little from call to call
(Adam's |m| in MoFO, |W| under training in dynamic sparsity), where the previous τ is a good guess: a
band around it is counted at both ends (two compare-and-count passes) and the k-th largest is taken
directly among the few values inside. ``torch.topk`` / ``kthvalue`` cost several times more on CPU.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["topk_threshold"]

_SMALL_ROW = 4096  # rows this short take torch.kthvalue directly
_SAMPLE = 2048  # sample size per row for the cold-start guess
_END_GAME = 16  # bracket holding this few values: plain interpolation of their order
_EXTRACT = 64  # a bracket holding this few values (or under 1/_EXTRACT_SHARE of the row): take the k-th directly
_EXTRACT_SHARE = 8
_BAND = 64  # the narrowest warm band, in counts either side of the guess
_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")
_NUMPY_ON_CPU = True  # count with NumPy on CPU tensors (tests turn it off to exercise the torch path)


@functools.lru_cache(maxsize=256)
def _sample_index(numel: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random positions (sorted, for locality); the same on every rank and every step, and
    cached, since every caller's rows keep their size."""
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


def _kth_in_bracket(a: Tensor, i: int, r: _RowSearch, j: int, scratch: Tensor) -> tuple[float, int]:
    """The j-th largest (1-based) value v of row i among those in the bracket [r.lo, r.hi), and how many
    of those are >= v (j, or more when v is tied), by extracting them: cheaper than the counts that would
    pin down the last values at random places. On CPU the band is the difference of the two counts'
    flags when both are still in the scratch."""
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
        v = np.partition(values, values.size - j)[values.size - j]
        return float(v), int(np.count_nonzero(values >= v))
    row = a[i]
    values = row[(row >= lo) & (row < hi)].sort().values
    v = values[values.numel() - j]
    return float(v), int((values >= v).sum())


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
    hint: list[tuple[float, float, float, float]] | None = None,
    counts: list[int] | None = None,
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
        hint: what the previous call returned, for the same rows.
        counts: if given, filled with ``#{a[i] >= τ[i]}`` per row: k, or more when the k-th value is tied.
    """
    n_rows, n = a.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n or n <= _SMALL_ROW:
        tau = (a.amin(1) if k == n else a.kthvalue(n - k + 1, dim=1).values).tolist()
        if counts is not None:
            counts[:] = (a >= torch.tensor(tau, device=a.device).unsqueeze(1)).sum(1).tolist()
        return tau, [(t, math.nan, math.nan, math.nan) for t in tau]
    if scratch is None:
        scratch = torch.empty_like(a)
    # the scale of each row, to carry a hint over: the mean of a strided subsample (about 16K values, ~1%
    # noise; an odd stride, so it does not alias with power-of-two row widths) costs a small part of a full
    # pass, which matters while m ramps up over the first steps
    means = a[:, :: max(1, n // 16384) | 1].mean(1, dtype=torch.float64).tolist()
    hint = hint if hint is not None and len(hint) == n_rows else [(math.nan,) * 4] * n_rows
    cold = {i for i, ((tau, slope, mean, band), now) in enumerate(zip(hint, means, strict=True))
            if not (0 < tau < math.inf and 0 < slope < math.inf and 0 < mean < math.inf and 0 < now < math.inf
                    and math.isfinite(tau * now / mean) and band >= 0)}
    if cold:  # a sorted sample of each row: its quantile at k/N and a band of ±3σ of that estimate around it
        index = _sample_index(n, a.device)
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
        found = _count_ge(a, points, scratch, None if len(active) == n_rows else active, slot)
        for i in active:
            r = searches[i]
            r.flag_slot = {t: sl for t, sl in r.flag_slot.items() if sl != slot}
            r.flag_slot[points[i]] = slot
            r.update(found[i])
            if not r.done() and r.lo_counted and math.isfinite(r.hi) and r.c_lo - r.c_hi <= extract:
                # few values left between the bracket's ends: take the k-th largest directly
                v, c = _kth_in_bracket(a, i, r, k - r.c_hi, scratch)
                r.lo, r.c_lo, r.hi = v, r.c_hi + c, _next_up(v)  # the k-th value: done
        active = [i for i in active if not searches[i].done()]
        if not active:
            break
    else:  # pragma: no cover
        raise RuntimeError("MoFO threshold search did not converge")
    tau = [r.lo for r in searches]
    if counts is not None:
        counts[:] = [r.c_lo for r in searches]
    slopes = [r.wide_slope if r.wide_slope else r.slope for r in searches]
    # next band: twice this guess's miss in counts, so a steadily drifting threshold stays inside it
    bands = [min(max(_BAND, 2 * abs(t - g) * sl), extract / 2) if math.isfinite(sl) else _BAND
             for t, g, sl in zip(tau, guesses, slopes, strict=True)]
    return tau, list(zip(tau, slopes, means, bands, strict=True))


def sharded_topk_threshold(shards: Sequence[Tensor], ks: Sequence[int], group=None) -> list[float]:  # noqa: ANN001
    """Per tensor split across the ranks of ``group`` (each rank holds ``shards[i]``, its local part of the
    non-negative fp32 tensor i), the threshold τ_i of :func:`topk_threshold` over the **whole** tensor: the
    k_i-th largest value v, so that ``{a >= τ}`` on every shard is, together, the global top-k plus ties.

    Search: bisection on the fp32 bit patterns of [0, global max] (non-negative floats order like their bits),
    for the largest τ with ``#{a >= τ} >= k`` over all shards; each of the ≤ 32 rounds counts every tensor
    on its local shard and sums the counts of all tensors in one ``all_reduce``. The result is the same
    value one process finds on the gathered tensor, and it is the same on every rank.
    """
    import torch.distributed as dist

    n = len(shards)
    if n == 0:
        return []
    device = shards[0].device
    top = torch.stack([s.max() if s.numel() else torch.zeros((), device=device) for s in shards]).float()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    lo = [0] * n  # count(>= from_bits(lo)) >= k always holds at 0 (the whole tensor)
    hi = [_bits(_f32(t)) + 1 for t in top.tolist()]  # count(>= from_bits(hi)) = 0 < k
    while any(b - a > 1 for a, b in zip(lo, hi, strict=True)):
        mids = [(a + b) // 2 for a, b in zip(lo, hi, strict=True)]
        counts = torch.tensor([int((s >= _from_bits(m)).sum()) if b - a > 1 else 0
                               for s, m, a, b in zip(shards, mids, lo, hi, strict=True)], dtype=torch.int64,
                              device=device)
        dist.all_reduce(counts, group=group)
        for i, c in enumerate(counts.tolist()):
            if hi[i] - lo[i] > 1:
                if c >= ks[i]:
                    lo[i] = mids[i]
                else:
                    hi[i] = mids[i]
    return [_from_bits(b) for b in lo]
