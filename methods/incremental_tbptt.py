"""Unbiased incremental TBPTT for a memory RNN (UIO-LLMs, arXiv 2406.18173, §3.3, Eq. 9-12, App. B).

The model is an RNN over segments, J_t, m_t = f(x_t, [m_1..m_{t-1}] | Θ) (Eq. 3), where every memory m_s
is produced by an encoder graph that depends on x_s only. The full gradient (Eq. 5) is
Σ_s (Σ_{t>s} ∂J_t/∂m_s) · ∂m_s/∂Θ plus the direct term of each J_t. Incremental TBPTT swaps the sums:

1. every memory enters the decoders as a detached leaf m̃_s, so ∂J_t/∂m̃_s accumulates in ``m̃_s.grad``;
2. the encoder graph of m_s is back-propagated exactly once ("flushed": m_s.backward(m̃_s.grad)) when the
   retention policy drops it, so the cost is linear in the number of segments for any window S;
3. with a reservoir policy each fresh ∂J_t/∂m̃_s is scaled by max(1, (t-1)/S), the inverse of the
   probability that m_s is still alive at step t, which makes the estimate unbiased (Eq. 12).

Per segment t the caller runs: ``loss = decoder(x_t, tbptt.memories)``; ``tbptt.backward_loss(loss)``;
``tbptt.add_memory(encoder(x_t))``; and ``tbptt.finish()`` after the last segment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .reservoir import RecencyWindow


def _autograd_backward(tensor: Tensor, gradient: Tensor | None = None) -> None:
    torch.autograd.backward(tensor, gradient)


class IncrementalTBPTT:
    """Memory leaves and live encoder graphs of one sequence.

    Args:
        policy: which graphs stay alive (``ReservoirSampler`` for UIO, ``RecencyWindow`` for plain TBPTT).
        compensate: scale fresh leaf gradients by ``policy.compensation(t-1)`` (App. B); the released code
            leaves it out (``False``).
        backward: how a loss is back-propagated (e.g. ``LightningModule.manual_backward``); encoder graphs
            are always flushed with plain autograd so a loss scaler is never applied twice.
    """

    def __init__(self, policy: RecencyWindow, compensate: bool = True,
                 backward: Callable[[Tensor], None] = _autograd_backward):
        self.policy, self.compensate, self.backward = policy, compensate, backward
        self.reset()

    def reset(self) -> None:
        """Drop every graph and leaf (call before a new sequence)."""
        self.graphs: list[Tensor | None] = []
        self.leaves: list[Tensor] = []
        self.policy.reset()

    @property
    def memories(self) -> list[Tensor]:
        """The leaves m̃_1..m̃_{t-1} that the decoder at step t reads."""
        return self.leaves

    def backward_loss(self, loss: Tensor) -> None:
        """Back-propagate J_t; its gradients into the memory leaves are scaled by max(1, (t-1)/S)."""
        if not loss.requires_grad:  # e.g. the first segment: no memory, and the decoder's own path is frozen
            return
        stashed = [leaf.grad for leaf in self.leaves]
        for leaf in self.leaves:
            leaf.grad = None
        self.backward(loss)
        factor = self.policy.compensation(len(self.leaves)) if self.compensate else 1.0
        for leaf, old in zip(self.leaves, stashed, strict=True):
            fresh = leaf.grad
            if fresh is not None and factor != 1.0:
                fresh = fresh * factor
            leaf.grad = old if fresh is None else (fresh if old is None else old + fresh)

    def add_memory(self, memory: Tensor) -> Tensor:
        """Register m_t (keeping its graph) and return its leaf m̃_t; flushes the graphs the policy drops."""
        leaf = memory.detach().requires_grad_(memory.requires_grad)
        self.graphs.append(memory if memory.requires_grad else None)
        self.leaves.append(leaf)
        for index in self.policy.offer(len(self.leaves) - 1):
            self.flush(index)
        return leaf

    def flush(self, index: int) -> None:
        """Back-propagate the encoder graph of memory ``index`` with its accumulated leaf gradient, once."""
        graph, leaf = self.graphs[index], self.leaves[index]
        if graph is not None and leaf.grad is not None:
            torch.autograd.backward(graph, leaf.grad)
        self.graphs[index] = None
        # A flushed memory can no longer train its encoder: stop computing gradients into it.
        leaf.grad = None
        leaf.requires_grad_(False)

    def finish(self) -> None:
        """Flush every graph still alive (end of the sequence)."""
        for index, graph in enumerate(self.graphs):
            if graph is not None:
                self.flush(index)
