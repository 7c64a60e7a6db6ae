"""Which data-parallel replica a request runs on: prefix-aware routing, or round robin.

The router lives in the client and needs no process: it mirrors each replica's prefix cache
from the KV events the replica reports (`KVCacheEvents`: block hashes stored, evicted, cache
reset) and counts the requests it sent to each replica that have not finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvflow.engine.protocol import KVCacheEvents
from kvflow.errors import EngineDeadError

ROUTINGS = ("prefix_aware", "round_robin")

# A replica may take a request while its load is at most the lightest live replica's load
# plus max(LOAD_SLACK, LOAD_SLACK_FRACTION x that load). Small enough that no replica piles
# up work while another idles; wide enough that a conversation's next turn usually finds
# its replica eligible even when a burst of turns arrives in an unlucky order (a miss there
# recomputes the whole history, which costs far more than a few requests' imbalance).
LOAD_SLACK = 4
LOAD_SLACK_FRACTION = 0.25


class ReplicaCacheIndex:
    """The block hashes one replica's prefix cache holds, as its KV events report them."""

    def __init__(self) -> None:
        self.hashes: set[int] = set()

    def apply(self, events: KVCacheEvents) -> None:
        if events.cleared:
            self.hashes.clear()
        self.hashes.difference_update(events.removed)
        self.hashes.update(events.stored)

    def match(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of the request this replica holds (a chained hash names
        its whole prefix, and the core's lookup stops at its first miss too)."""
        count = 0
        for block_hash in block_hashes:
            if block_hash not in self.hashes:
                break
            count += 1
        return count


class Router:
    """Picks a live replica for each request, and keeps the counts the choice needs.

    Prefix-aware rule (the default). Let `load[r]` be the requests sent to replica r that
    have not finished (exactly its running + waiting requests, plus any in transit: counted
    here the moment they are routed, never from stale periodic stats, whose lag is what
    piles requests onto a few of vLLM's replicas), and `min_load` the least load of a live
    replica.
      1. Eligible: live replicas with load[r] <= min_load + max(LOAD_SLACK,
         ceil(LOAD_SLACK_FRACTION * min_load)).
      2. Among them, the one holding the longest cached prefix of the request's blocks
         (mirrored from the replicas' KV events);
      3. ties: the least loaded; then the next in rotation after the last choice.
    So a conversation's next turn goes back to the replica holding its history unless that
    replica is busier than the window allows; requests no replica holds (uniform traffic)
    go to the least loaded, in rotation: no replica ever takes a request while its load
    exceeds the lightest one's by more than the window, so load spreads evenly. Under
    traffic so light that no replica exceeds the window, the cache alone decides: nothing
    waits then.

    Round robin: the next live replica in rotation, whatever it holds.
    """

    def __init__(self, num_replicas: int, routing: str = "prefix_aware") -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {routing!r}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.routing = routing
        self.indexes = [ReplicaCacheIndex() for _ in range(num_replicas)]
        self.load = [0] * num_replicas
        self.alive = [True] * num_replicas
        self.routed = [0] * num_replicas  # requests routed to each replica since start
        self._next = 0  # where the rotation resumes

    @property
    def num_replicas(self) -> int:
        return len(self.load)

    @property
    def prefix_aware(self) -> bool:
        return self.routing == "prefix_aware"

    def choose(self, block_hashes: Sequence[int] = ()) -> int:
        """The replica for a request with these block hashes (EngineDeadError: none live)."""
        live = [r for r in range(self.num_replicas) if self.alive[r]]
        if not live:
            raise EngineDeadError("every data-parallel replica has died")
        n = self.num_replicas
        if self.routing == "round_robin":
            chosen = min(live, key=lambda r: (r - self._next) % n)
        else:
            min_load = min(self.load[r] for r in live)
            window = min_load + max(LOAD_SLACK, math.ceil(LOAD_SLACK_FRACTION * min_load))
            eligible = [r for r in live if self.load[r] <= window]
            matches = {r: self.indexes[r].match(block_hashes) if block_hashes else 0
                       for r in eligible}
            chosen = min(eligible, key=lambda r: (-matches[r], self.load[r],
                                                  (r - self._next) % n))
        self._next = (chosen + 1) % n
        return chosen

    def started(self, replica: int) -> None:
        self.load[replica] += 1
        self.routed[replica] += 1

    def finished(self, replica: int) -> None:
        self.load[replica] = max(0, self.load[replica] - 1)

    def apply_events(self, replica: int, events: KVCacheEvents) -> None:
        self.indexes[replica].apply(events)

    def mark_dead(self, replica: int) -> None:
        """A dead replica takes no request; what it cached is gone."""
        self.alive[replica] = False
        self.load[replica] = 0
        self.indexes[replica].hashes.clear()
