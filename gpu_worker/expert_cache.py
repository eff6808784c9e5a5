"""The soft tier's bookkeeping: which (layer, expert) sits in which of N VRAM slots, and what to evict.

`SoftTier` maps experts to slots shared by all layers. A step looks each routed expert up (a hit),
and calls `admit` for each one it did not find (a miss): the answer is a slot to stream the expert
into, with the expert evicted from it, or None, meaning the expert is computed where it lives. The
experts a step is using are pinned so that admitting the next one cannot evict them.

Two policies sit behind `EvictionPolicy`: `LRUPolicy` and `DecayedLFUPolicy`, which counts every
access with exponential decay (for every expert, resident or not: even DeepSeek-V3 has fewer than
15,000) and admits a miss only when it has been used more than the expert it would evict.
Each operation is O(1) (LRU) or amortised O(log n) (decayed LFU).

The default is decayed LFU. On decode traces of the fp32 oracle over generated `small` models (4 layers
x 32 experts, top-4; bench/cache_policy.md), with 5 / 10 / 25 / 50% of the experts in slots, it hits
32.4 / 51.7 / 72.5 / 87.0% at routing skew 1.2 where LRU hits 0.0 / 0.4 / 59.4 / 81.4%; at skew 0.8,
22.8 / 36.8 / 57.5 / 77.0% against 0.0 / 1.4 / 41.0 / 68.2%; with uniform routing 4.8 / 10.1 / 25.0 /
50.1% against 0.0 / 0.8 / 22.6 / 46.9%. With skew it is within a point of the best fixed set chosen in
hindsight. LRU fails outright while the slots are fewer than the experts one step touches (layers x k):
each is evicted before its layer comes round again. Behind a hard tier the order is the same. Counting
without decay gains under a point on steady routing, but when the hot set moves it falls to 7.6 / 24.4
/ 53.7 / 77.5% where the chosen half-life keeps 31.6 / 50.7 / 71.3 / 86.4%.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import NamedTuple

from shared.config import SOFT_POLICIES

Key = tuple[int, int]  # (layer, expert)

DEFAULT_POLICY = "decayed-lfu"
# In accesses per expert of the model (layers x experts): long enough to rank experts as well as
# counting forever does on steady routing, short enough to follow a moved hot set within a few
# hundred tokens (bench/cache_policy.md).
HALF_LIFE_PER_EXPERT = 16


class EvictionPolicy(ABC):
    """Chooses victims among the resident, unpinned ("evictable") experts. `SoftTier` drives it."""

    @abstractmethod
    def touch(self, key: Key) -> None:
        """`key` is being used: a hit, or a miss about to be offered a slot."""

    @abstractmethod
    def insert(self, key: Key) -> None:
        """`key` became resident or was unpinned: it may be evicted from now on."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """`key` was pinned: it must not be chosen until it is inserted again."""

    @abstractmethod
    def victim(self, candidate: Key) -> Key | None:
        """Take the evictable key to make room for `candidate` out of the policy, or None to keep them all."""


class LRUPolicy(EvictionPolicy):
    """Evicts the expert used longest ago; always admits."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # evictable keys, least recently used first

    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)  # pinned means in use: it comes back as the most recent

    def remove(self, key: Key) -> None:
        del self._order[key]

    def victim(self, candidate: Key) -> Key | None:
        return self._order.popitem(last=False)[0] if self._order else None


class DecayedLFUPolicy(EvictionPolicy):
    """Scores each expert by its accesses, each weighing half as much every `half_life` accesses later;
    evicts the lowest-scoring evictable expert, and only for a candidate scoring higher than it.

    Decay is the same for every key, so scores are kept as log2 of the sum of 2^(t_i / half_life) over
    access times t_i: only a touched key's score changes, the order of the others stays, and nothing
    overflows. Evictable keys sit in a heap with stale entries skipped when popped.
    """

    def __init__(self, half_life: float) -> None:
        if half_life <= 0:
            raise ValueError(f"half-life must be positive, got {half_life}")
        self._rate = 1.0 / half_life
        self._clock = 0
        self._score: dict[Key, float] = {}  # every key ever touched: a returning expert keeps its history
        self._evictable: dict[Key, float] = {}  # key -> its score when its live heap entry was pushed
        self._heap: list[tuple[float, Key]] = []

    def touch(self, key: Key) -> None:
        now = self._clock * self._rate
        self._clock += 1
        old = self._score.get(key)
        if old is None:
            new = now
        else:
            hi, lo = max(old, now), min(old, now)
            new = hi + math.log2(1.0 + 2.0 ** (lo - hi))
        self._score[key] = new
        if key in self._evictable:
            self._push(key, new)

    def insert(self, key: Key) -> None:
        self._push(key, self._score.get(key, self._clock * self._rate))

    def remove(self, key: Key) -> None:
        del self._evictable[key]

    def victim(self, candidate: Key) -> Key | None:
        while self._heap:
            score, key = self._heap[0]
            if self._evictable.get(key) != score:
                heapq.heappop(self._heap)  # stale: touched, pinned or evicted since this entry went in
                continue
            if self._score.get(candidate, -math.inf) <= score:
                return None  # a one-off does not push out an expert used as much or more
            heapq.heappop(self._heap)
            del self._evictable[key]
            return key
        return None

    def _push(self, key: Key, score: float) -> None:
        self._evictable[key] = score
        heapq.heappush(self._heap, (score, key))
        if len(self._heap) > 2 * len(self._evictable) + 64:  # rebuild now and then: amortised O(1) per push
            self._heap = [(s, k) for k, s in self._evictable.items()]
            heapq.heapify(self._heap)


def make_policy(name: str, n_experts: int) -> EvictionPolicy:
    """Policy `name` (one of SOFT_POLICIES) for a model with `n_experts` routed experts over all its layers."""
    if name == "lru":
        return LRUPolicy()
    if name == "decayed-lfu":
        return DecayedLFUPolicy(HALF_LIFE_PER_EXPERT * n_experts)
    raise ValueError(f"unknown soft-tier policy {name!r}; choose from {', '.join(SOFT_POLICIES)}")


class Admission(NamedTuple):
    slot: int
    evicted: Key | None  # the expert whose slot this was, None if the slot was free


class SoftTier:
    """`n_slots` VRAM slots shared by all layers, filled with experts streamed in and evicted by `policy`."""

    def __init__(self, n_slots: int, policy: EvictionPolicy) -> None:
        if n_slots < 1:
            raise ValueError(f"the soft tier needs at least one slot, got {n_slots}")
        self.n_slots, self.policy = n_slots, policy
        self._slot: dict[Key, int] = {}
        self._free = list(range(n_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._pins: dict[Key, int] = {}
        self.hits = self.misses = self.evictions = self.refusals = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key`, counted as a hit, or None, counted as a miss: whether or not the expert is then
        admitted (one the cost model leaves to a host's CPU was looked up and not found all the same)."""
        slot = self._slot.get(key)
        if slot is None:
            self.misses += 1
        else:
            self.hits += 1
            self.policy.touch(key)
        return slot

    def admit(self, key: Key) -> Admission | None:
        """Give `key`, just missed, a slot, evicting if none is free; None when the policy keeps every resident
        expert or all of them are pinned."""
        if key in self._slot:
            raise ValueError(f"expert {key} is already in slot {self._slot[key]}")
        self.policy.touch(key)
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self.policy.victim(key)
            if evicted is None:
                self.refusals += 1
                return None
            slot = self._slot.pop(evicted)
            self.evictions += 1
        self._slot[key] = slot
        self.policy.insert(key)
        return Admission(slot, evicted)

    def pin(self, key: Key) -> None:
        """Keep `key` resident until as many `unpin` calls; pins nest."""
        if key not in self._slot:
            raise KeyError(f"expert {key} is not in the soft tier")
        count = self._pins.get(key, 0)
        if count == 0:
            self.policy.remove(key)
        self._pins[key] = count + 1

    def unpin(self, key: Key) -> None:
        count = self._pins.get(key, 0)
        if count == 0:
            raise KeyError(f"expert {key} is not pinned")
        if count == 1:
            del self._pins[key]
            self.policy.insert(key)
        else:
            self._pins[key] = count - 1

    def discard(self, key: Key) -> None:
        """Give up `key`'s slot (one whose copy failed: it holds no weights of `key`'s), free for the next admission."""
        if self._pins.get(key):
            raise ValueError(f"expert {key} is pinned")
        self._free.append(self._slot.pop(key))
        self.policy.remove(key)
