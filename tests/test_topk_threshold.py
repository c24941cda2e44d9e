"""topk_threshold: the exact top-k threshold by counting (selection equals torch.topk, ties and zero piles,
the GPU count path, the warm two-count search, overflowing rows) and its strict bound for hardshrink."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from effitrain.methods import topk_threshold as search
from effitrain.methods.topk_threshold import topk_strict_bound, topk_threshold


@pytest.mark.parametrize("n,k", [(5000, 1), (5000, 750), (70000, 10500), (70000, 69999), (300000, 45000)])
def test_threshold_selects_exactly_the_top_k(n: int, k: int):
    gen = torch.Generator().manual_seed(n + k)
    a = torch.randn(3, n, generator=gen).abs()
    a[1] *= 1e-6  # scale does not matter
    a[2, : n // 2] = 0.0  # a pile of zeros below the threshold
    tau, _ = topk_threshold(a, k)
    selected = a >= torch.tensor(tau).unsqueeze(1)
    # the top-k set plus the entries tied with the k-th value (the zeros of row 2 when k reaches them)
    assert torch.equal(selected, a >= a.topk(k, dim=1).values[:, -1:])
    assert selected[:2].sum(1).tolist() == [k, k]  # no ties among continuous values: exactly k


def test_threshold_keeps_ties_and_zero_piles():
    a = torch.zeros(2, 50000)
    a[0, :100] = 1.0  # fewer non-zeros than k: every entry (ties at 0) is selected
    a[1] = torch.randint(0, 4, (50000,), generator=torch.Generator().manual_seed(0)).float()
    tau, _ = topk_threshold(a, 20000)
    assert tau[0] == 0.0
    assert tau[1] == float(a[1].topk(20000).values[-1])


def test_torch_count_path_selects_the_same_set(monkeypatch):
    """The GPU code path (torch compare-and-sum instead of NumPy), run on CPU."""
    monkeypatch.setattr(search, "_NUMPY_ON_CPU", False)
    a = torch.randn(4, 70000, generator=torch.Generator().manual_seed(3)).abs()
    tau, hint = topk_threshold(a, 9000)
    assert torch.equal(a >= torch.tensor(tau).unsqueeze(1), a >= a.topk(9000, dim=1).values[:, -1:])
    b = a * 1.1 + 0.01 * torch.rand_like(a)  # a warm start from the previous call's hint
    tau, _ = topk_threshold(b, 9000, hint=hint)
    assert torch.equal(b >= torch.tensor(tau).unsqueeze(1), b >= b.topk(9000, dim=1).values[:, -1:])


def test_warm_search_takes_two_counts_and_zero_piles_stay_cheap(monkeypatch):
    """Speed is a property of the search path: a drifting row (Adam's m) costs two counts and one
    extraction once warm; a row with fewer non-zeros than k (embedding rows of unseen tokens) one count."""
    calls = []
    count_ge = search._count_ge
    monkeypatch.setattr(search, "_count_ge", lambda *a, **kw: calls.append(1) or count_ge(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 200_000, generator=gen).abs()
    a[1, 1000:] = 0.0  # 1000 non-zeros < k: τ = 0, every entry selected
    k = 30_000
    _, hint = topk_threshold(a, k)
    for step in range(4):
        a[0] = 0.9 * a[0] + 0.1 * torch.randn(200_000, generator=gen).abs()  # one Adam-like drift
        calls.clear()
        tau, hint = topk_threshold(a, k, hint=hint)
        assert torch.equal(a >= torch.tensor(tau).unsqueeze(1), a >= a.topk(k, dim=1).values[:, -1:])
        assert tau[1] == 0.0
        assert len(calls) <= (3 if step == 0 else 2)  # the first band comes from the cold sample


def test_threshold_survives_overflowing_and_infinite_rows():
    a = torch.full((1, 10000), 3e34)
    a[0, :100] = torch.arange(100, dtype=torch.float32) * 1e34
    tau, hint = topk_threshold(a, 50)
    b = a * 1.5  # sums past fp32's range (an fp32 mean overflows), and a few infinite entries
    b[0, :3] = float("inf")
    tau, _ = topk_threshold(b, 50, hint=hint)
    assert torch.equal(b >= torch.tensor(tau).unsqueeze(1), b >= b.topk(50, dim=1).values[:, -1:])


def test_strict_bound_keeps_exactly_k_through_hardshrink_and_flags_ties():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 9000, generator=gen)
    a = w.abs()
    a[1, :4000] = 1.0  # the k-th value of row 1 is tied: no strict bound exists
    bounds, _ = topk_strict_bound(a, 3000)
    kept = F.hardshrink(w[0], bounds[0]) != 0
    assert torch.equal(kept, a[0] >= a[0].topk(3000).values[-1]) and int(kept.sum()) == 3000
    assert bounds[1] is None
