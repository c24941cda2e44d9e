"""Which encoder graphs stay alive during incremental TBPTT (UIO-LLMs, arXiv 2406.18173, §3.3).

Two retention policies over the stream of memories m_1, m_2, ... (1-indexed):

- ``ReservoirSampler`` (Algorithm R, capacity S): after t items every item is held with probability
  min(1, S/t), so at decoder step t segment s < t is still back-propagable with probability
  min(1, S/(t-1)) (Eq. 11). ``compensation(n)`` = max(1, n/S) is the factor that makes the sampled
  gradient unbiased (Eq. 12, App. B).
- ``RecencyWindow`` (plain TBPTT, Eq. 6): the last S items; biased toward short dependencies, factor 1.

``offer(item)`` returns the items that leave the window (possibly the offered one itself); the caller
back-propagates ("flushes") their graphs. The sampler owns a ``torch.Generator`` whose state is part of
``state_dict`` so a resumed run draws the same reservoir decisions.
"""

from __future__ import annotations

from typing import Any

import torch


class RecencyWindow:
    """Keep the ``capacity`` most recent items (truncated BPTT with window S, Eq. 6)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (the TBPTT window S), got {capacity}.")
        self.capacity = capacity
        self.kept: list[int] = []

    def reset(self) -> None:
        self.kept = []

    def offer(self, item: int) -> list[int]:
        self.kept.append(item)
        evicted, self.kept = self.kept[: -self.capacity], self.kept[-self.capacity:]
        return evicted

    def compensation(self, num_seen: int) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ReservoirSampler(RecencyWindow):
    """Algorithm R with capacity S: item number t (1-indexed) replaces a uniform slot j ~ U{0..t-1} if j < S.

    Args:
        capacity: S, the number of encoder graphs kept alive besides the newest.
        seed: seeds the private generator (independent of the global torch RNG).
    """

    def __init__(self, capacity: int, seed: int = 0):
        super().__init__(capacity)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_seen = 0

    def reset(self) -> None:
        self.kept, self.num_seen = [], 0

    def offer(self, item: int) -> list[int]:
        self.num_seen += 1
        if len(self.kept) < self.capacity:
            self.kept.append(item)
            return []
        slot = int(torch.randint(0, self.num_seen, (1,), generator=self.generator))
        if slot >= self.capacity:
            return [item]
        evicted, self.kept[slot] = self.kept[slot], item
        return [evicted]

    def compensation(self, num_seen: int) -> float:
        """max(1, n/S): the inverse of the probability that one of n items is still in the reservoir."""
        return max(1.0, num_seen / self.capacity)

    def state_dict(self) -> dict[str, Any]:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng_state"])
