"""Image states, as Glance names them, and the one table of legal moves.

queued  - known, no data stored yet
saving  - data being converted and stored
active  - stored and verified
killed  - refused or failed (the record says why); may be submitted again
deleted - removed from the store

A record that ends carries a machine-readable `outcome`, so nothing parses
the human `reason`: active | refused (the image or its source: unsafe,
malformed, not allowed) | failed (the infrastructure: store, Ceph, Redis,
network, or a bug) | cancelled.

Every record store checks moves against `LEGAL` (and does the move as an
atomic compare-and-set), so no code path can skip a state.
"""

from __future__ import annotations

QUEUED, SAVING, ACTIVE, KILLED, DELETED = "queued", "saving", "active", "killed", "deleted"
NEW = ""  # no record yet

LEGAL: dict[str, frozenset[str]] = {
    NEW: frozenset({QUEUED}),
    QUEUED: frozenset({SAVING, KILLED, DELETED}),
    # saving -> saving: another worker takes over an expired lease.
    SAVING: frozenset({SAVING, ACTIVE, KILLED}),
    ACTIVE: frozenset({DELETED}),
    KILLED: frozenset({QUEUED, DELETED}),
    DELETED: frozenset(),
}
FINAL = frozenset({ACTIVE, KILLED, DELETED})

OUTCOME_ACTIVE, REFUSED, FAILED, CANCELLED = "active", "refused", "failed", "cancelled"
OUTCOMES = frozenset({OUTCOME_ACTIVE, REFUSED, FAILED, CANCELLED})


class IllegalTransition(ValueError):
    def __init__(self, image_id: str, current: str, wanted: str) -> None:
        self.image_id = image_id
        self.current = current
        self.wanted = wanted
        super().__init__(f"image {image_id}: cannot go from {current or 'nothing'} to {wanted}")


class StaleAttempt(IllegalTransition):
    """The record has moved on to a newer attempt: the delivery asking lost
    its lease, another took the job over, and this one must write nothing
    more (its attempt number is its fencing token)."""

    def __init__(self, image_id: str, wanted: str, attempt: int, found: object) -> None:
        super().__init__(image_id, SAVING, wanted)
        self.attempt = attempt
        self.found = found
        self.args = (f"image {image_id}: attempt {attempt} is stale, the record is at attempt {found}",)


def check_transition(image_id: str, current: str, wanted: str) -> None:
    if wanted not in LEGAL.get(current, frozenset()):
        raise IllegalTransition(image_id, current, wanted)
