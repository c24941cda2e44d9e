"""FKL / RKL / AKL (arXiv 2404.02657, official ``AKL.py``): the head/tail split, the limits, the weights, the
closed-form gradient, masking and reduction, permutation invariance, parity with an independent numpy
re-derivation, chunked = unchunked, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from effitrain.methods.distillation import (
    AdaptiveKL,
    adaptive_kl,
    akl_weights,
    forward_kl,
    head_mask,
    reverse_kl,
)

P = torch.tensor([10, 6, 5, 4, 4, 3], dtype=torch.float64) / 32
CHUNKS = [None, 2]  # the plain autograd form and the chunked closed-form gradient


def logits(probs) -> torch.Tensor:
    return torch.as_tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize("probs, head", [
    (P, [True, True, False, False, False, False]),            # C_2 = 0.5 exactly: head (inclusive)
    ([0.4, 0.3, 0.2, 0.1], [True, False, False, False]),       # the token that crosses mu is tail
    ([0.7, 0.1, 0.1, 0.1], [True, False, False, False]),       # rank 1 is always head
])
def test_head_tail_split_follows_akl_py(probs, head):
    probs = torch.as_tensor(probs, dtype=torch.float64)
    assert head_mask(probs).tolist() == head
    perm = torch.randperm(len(probs), generator=torch.Generator().manual_seed(0))
    assert head_mask(probs[perm]).tolist() == [head[i] for i in perm.tolist()]  # mask in vocabulary order


@pytest.mark.parametrize("chunk", CHUNKS)
def test_akl_is_fkl_without_tail_gap_and_rkl_without_head_gap(chunk):
    p = logits(P)[None]
    q_no_tail_gap = logits(torch.tensor([11, 5, 5, 4, 4, 3]) / 32)[None]
    q_no_head_gap = logits(torch.tensor([10, 6, 4, 5, 4, 3]) / 32)[None]
    assert akl_weights(q_no_tail_gap, p)[1].item() < 1e-14  # softmax(log p) rounds
    assert akl_weights(q_no_head_gap, p)[0].item() < 1e-14
    akl = adaptive_kl(q_no_tail_gap, p, chunk_size=chunk)
    assert abs(akl.item() - forward_kl(q_no_tail_gap, p, chunk_size=chunk).item()) < 1e-12
    akl = adaptive_kl(q_no_head_gap, p, chunk_size=chunk)
    assert abs(akl.item() - reverse_kl(q_no_head_gap, p, chunk_size=chunk).item()) < 1e-12
    assert abs(forward_kl(q_no_tail_gap, p).item() - reverse_kl(q_no_tail_gap, p).item()) > 1e-4  # distinct limits


def test_weights_are_a_convex_pair_without_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    w_head, w_tail = akl_weights(s * 3, t * 3)
    assert not w_head.requires_grad and not w_tail.requires_grad
    assert ((w_head >= 0) & (w_head <= 1) & (w_tail >= 0) & (w_tail <= 1)).all()
    torch.testing.assert_close(w_head + w_tail, torch.ones_like(w_head), rtol=0, atol=1e-15)
    assert w_head.std() > 0.05  # the weights do vary per token


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gradient_matches_the_closed_form(chunk):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(adaptive_kl(s, t, chunk_size=chunk), s)
    with torch.no_grad():
        q, p = s.softmax(-1), t.softmax(-1)
        rkl = (q * (q.log() - p.log())).sum(-1, keepdim=True)
        w_h, w_t = (w.unsqueeze(-1) for w in akl_weights(s, t))
        expected = (w_h * (q - p) + w_t * q * (q.log() - p.log() - rkl)) / s.shape[0]  # token mean over 3
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)


def test_chunked_fkl_and_rkl_pass_gradcheck():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: forward_kl(x, t, chunk_size=2), (s,))
    assert torch.autograd.gradcheck(lambda x: reverse_kl(x, t, chunk_size=2), (s,))


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl, adaptive_kl])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_equal_distributions_give_zero_and_finite_gradients(loss, chunk):
    z = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z[1, 2:] = 0.0  # padding positions with identical (uniform) logits on both sides
    labels = torch.ones(2, 4, dtype=torch.long)
    labels[1, 2:] = -100
    s = z.clone().requires_grad_(True)
    for lab in (labels, None):
        value = loss(s, z, lab, chunk_size=chunk)
        (grad,) = torch.autograd.grad(value, s)
        assert value.item() == pytest.approx(0.0, abs=1e-15) and torch.isfinite(grad).all()
        assert grad.abs().max() < 1e-15
    w_head, w_tail = akl_weights(z, z)
    assert torch.isfinite(w_head).all() and (w_head == 0.5).all() and (w_tail == 0.5).all()


def per_token_akl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.stack([adaptive_kl(s[i:i + 1], t[i:i + 1], chunk_size=None) for i in range(len(s))])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ignored_positions_change_nothing_and_the_reduction_is_a_token_mean(chunk):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[0, 2:] = -100  # lengths 2 and 5
    s1 = s.clone().requires_grad_(True)
    value = adaptive_kl(s1, t, labels, chunk_size=chunk)
    (grad,) = torch.autograd.grad(value, s1)
    s2, t2 = s.clone(), t.clone()
    s2[0, 2:] += 7 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    t2[0, 2:] = torch.randn(3, 6, generator=g, dtype=torch.float64)
    s2.requires_grad_(True)
    value2 = adaptive_kl(s2, t2, labels, chunk_size=chunk)
    (grad2,) = torch.autograd.grad(value2, s2)
    assert value.item() == value2.item() and torch.equal(grad, grad2) and (grad[0, 2:] == 0).all()
    tokens = torch.cat([per_token_akl(s[0, :2], t[0, :2]), per_token_akl(s[1], t[1])])
    assert abs(value.item() - tokens.mean().item()) < 1e-12  # mean over 7 tokens ...
    sequence_mean = (tokens[:2].mean() + tokens[2:].mean()) / 2
    assert abs(value.item() - sequence_mean.item()) > 1e-3  # ... not over the 2 sequences


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl, adaptive_kl])
def test_a_vocabulary_permutation_changes_nothing(loss):
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2, torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2
    perm = torch.randperm(9, generator=g)
    for chunk in CHUNKS:
        a, b = loss(s, t, chunk_size=chunk), loss(s[..., perm], t[..., perm], chunk_size=chunk)
        assert abs(a.item() - b.item()) < 1e-13


def akl_numpy(student: np.ndarray, teacher: np.ndarray, mu: float = 0.5) -> float:
    """An independent re-derivation of ``AKL.py``: get_ratio (sorted descending, tail iff C_k > mu, rank 1 head,
    L1 gaps), then head ratio × KL(teacher ‖ student) + tail ratio × KL(student ‖ teacher), token mean."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher), softmax(student)
    order = np.argsort(-p, axis=-1, kind="stable")
    p_sorted, q_sorted = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
    tail = np.cumsum(p_sorted, -1) > mu
    tail[..., 0] = False
    errors = np.abs(p_sorted - q_sorted)
    s1, s2 = (errors * ~tail).sum(-1), (errors * tail).sum(-1)
    fkl = (p * (np.log(p) - np.log(q))).sum(-1)
    rkl = (q * (np.log(q) - np.log(p))).sum(-1)
    return float((s1 / (s1 + s2) * fkl + s2 / (s1 + s2) * rkl).mean())


@pytest.mark.parametrize("chunk", CHUNKS)
def test_parity_with_a_numpy_rederivation_and_bf16(chunk):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2, torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    expected = akl_numpy(s.numpy(), t.numpy())
    assert abs(adaptive_kl(s, t, chunk_size=chunk).item() - expected) < 1e-12
    low = adaptive_kl(s.bfloat16().requires_grad_(True), t.bfloat16(), chunk_size=chunk)
    assert low.dtype == torch.float32 and torch.isfinite(low) and abs(low.item() - expected) < 1e-2


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl, adaptive_kl])
def test_chunked_equals_unchunked(loss):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 17, 50, generator=g, requires_grad=True)
    t = torch.randn(3, 17, 50, generator=g)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[:, :4] = -100
    values, grads = [], []
    for chunk in (None, 1, 7, 1024):
        value = loss(s, t, labels, chunk_size=chunk)
        values.append(value)
        grads.append(torch.autograd.grad(value, s)[0])
    for value, grad in zip(values[1:], grads[1:], strict=True):
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-8)


def test_bad_inputs_fail_with_a_clear_message():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 9)
    with pytest.raises(ValueError, match="same vocabulary"):
        adaptive_kl(s, t)
    with pytest.raises(ValueError, match=r"labels\[:, 1:\]"):
        forward_kl(s, s, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mu"):
        AdaptiveKL(mu=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        reverse_kl(s, s, chunk_size=0)
    with pytest.raises(TypeError, match="floating point"):
        forward_kl(s.long(), s)
