"""Traffic accounting: every byte the protocol moves, by peer and kind, on each side.

A leaf module: the protocol counts into a `Traffic`, the runner reads it for summary.json.
"""

from __future__ import annotations

from collections import defaultdict

KINDS = ("activations", "gradients", "labels", "adapters", "control")


class Traffic:
    """Bytes and messages sent / received by this rank, keyed by (peer, kind)."""

    def __init__(self) -> None:
        self.sent_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.received_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.sent_messages: dict[tuple[str, str], int] = defaultdict(int)

    def sent(self, peer: int | str, kind: str, nbytes: int) -> None:
        assert kind in KINDS, kind
        self.sent_bytes[(str(peer), kind)] += nbytes
        self.sent_messages[(str(peer), kind)] += 1

    def received(self, peer: int | str, kind: str, nbytes: int) -> None:
        assert kind in KINDS, kind
        self.received_bytes[(str(peer), kind)] += nbytes

    def sent_by_kind(self) -> dict[str, int]:
        return {k: sum(n for (_, kind), n in self.sent_bytes.items() if kind == k) for k in KINDS}

    def received_by_kind(self) -> dict[str, int]:
        return {k: sum(n for (_, kind), n in self.received_bytes.items() if kind == k) for k in KINDS}

    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())

    def total_received(self) -> int:
        return sum(self.received_bytes.values())
