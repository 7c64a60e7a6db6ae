"""Which image embeddings the model runner keeps, counted in embeddings (placeholder tokens).

An image is encoded whole, once, and its embeddings stay while any request still has
placeholders of it to compute. A request holds a reference from the step that needs the
image until its placeholders are computed (or it is preempted or finishes). Unreferenced
entries are not dropped at once: they wait in LRU order and are evicted only when space is
needed, so a repeated image, or a preempted request coming back, finds them again.

Invariants (checked by `check_invariants`):
- an entry is in `freeable` iff no request references it;
- `num_free` = capacity - sizes of all entries (referenced or freeable), and is >= 0.
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    """Space accounting for image embeddings; the tensors themselves live in the runner."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_free = capacity
        self.sizes: dict[str, int] = {}  # identifier -> embeddings it holds
        self.users: dict[str, set[str]] = {}  # identifier -> request ids referencing it
        self.freeable: OrderedDict[str, None] = OrderedDict()  # unreferenced, oldest first
        self.freed: list[str] = []  # evicted since the runner last heard
        # reserved in the step being scheduled, not encoded yet: given up whole if the
        # request that reserved it is not scheduled after all
        self.pending: set[str] = set()
        # images a request needed: found encoded (hits) or reserved to encode; a request
        # waiting for room before an image is not counted again each step it waits
        self.queries = 0
        self.hits = 0

    def __contains__(self, identifier: str) -> bool:
        return identifier in self.sizes

    def lookup(self, identifier: str, request_id: str) -> bool:
        """True (and the request now references it) if the image is already encoded."""
        if identifier not in self.sizes:
            return False
        self.queries += 1
        self.hits += 1
        self._add_user(identifier, request_id)
        return True

    def can_allocate(self, size: int) -> bool:
        """Room for `size` embeddings, evicting unreferenced entries (oldest first) if needed."""
        if size > self.num_free + sum(self.sizes[i] for i in self.freeable):
            return False
        while self.num_free < size:
            identifier, _ = self.freeable.popitem(last=False)
            self.num_free += self.sizes.pop(identifier)
            del self.users[identifier]
            self.freed.append(identifier)
        return True

    def allocate(self, identifier: str, size: int, request_id: str) -> None:
        """Reserve an entry (after can_allocate) that this step encodes."""
        self.queries += 1
        self.sizes[identifier] = size
        self.users[identifier] = set()
        self.num_free -= size
        self.pending.add(identifier)
        self._add_user(identifier, request_id)

    def _add_user(self, identifier: str, request_id: str) -> None:
        self.users[identifier].add(request_id)
        self.freeable.pop(identifier, None)

    def release(self, identifier: str, request_id: str) -> None:
        """The request needs this image no more."""
        users = self.users.get(identifier)
        if users is None or request_id not in users:
            return
        users.discard(request_id)
        if users:
            return
        if identifier in self.pending:  # never encoded: nothing to keep, nothing was queried
            self.pending.discard(identifier)
            self.num_free += self.sizes.pop(identifier)
            del self.users[identifier]
            self.queries -= 1
        else:
            self.freeable[identifier] = None

    def end_step(self) -> None:
        """The step is scheduled: its reservations will be encoded."""
        self.pending.clear()

    def holds(self, identifier: str, request_id: str) -> bool:
        return request_id in self.users.get(identifier, ())

    def take_freed(self) -> list[str]:
        """Identifiers evicted since the last call: the runner drops their tensors."""
        freed, self.freed = self.freed, []
        return freed

    def reset(self) -> bool:
        """Forget every unreferenced entry; False while some request references one."""
        if any(self.users.values()):
            return False
        self.freed.extend(self.sizes)
        self.pending.clear()
        self.sizes.clear()
        self.users.clear()
        self.freeable.clear()
        self.num_free = self.capacity
        return True

    @property
    def num_referenced(self) -> int:
        """Entries some live request still needs (0 once every request is done)."""
        return sum(1 for users in self.users.values() if users)

    def check_invariants(self) -> None:
        assert set(self.sizes) == set(self.users) and self.pending <= set(self.sizes)
        for identifier, users in self.users.items():
            assert (identifier in self.freeable) == (not users), identifier
        assert self.num_free == self.capacity - sum(self.sizes.values()) >= 0
