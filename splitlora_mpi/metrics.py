"""This rank's counters: always kept (summary.json needs them), exported to Prometheus when
`metrics.enabled`. The only importer of prometheus_client (DESIGN §5 fixes names and labels), and
only when the series are exported.

A leaf module: the protocol counts bytes and times waits into it, the roles record steps.
With metrics off, recording is a dict increment and nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

KINDS = ("activations", "gradients", "labels", "adapters", "control")
COMM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOST_REASONS = ("timeout", "killed", "stopped", "link", "evicted")  # exported at 0 from the start (on a server)


class Metrics:
    """Bytes and messages by (peer, kind), communication and step times, progress gauges, and
    (on the server) clients live, lost and joined: elastic runs lose clients."""

    def __init__(self, rank: int = 0, role: str = "server", export: bool = False) -> None:
        """`export`: also keep the Prometheus series (to serve and/or push them)."""
        self.rank, self.role = str(rank), role
        self.sent_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.received_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.sent_messages: dict[tuple[str, str], int] = defaultdict(int)
        self.live: int | None = None  # None: never set (no clients: the central baseline)
        self.lost_by_reason: dict[str, int] = defaultdict(int)
        self.joined = 0
        self._prom = _Prometheus(self.rank, role) if export else None
        self._server: Any = None

    # ------------------------------------------------------------ recording

    def sent(self, peer: int | str, kind: str, nbytes: int) -> None:
        key = (str(peer), kind)
        self.sent_bytes[key] += nbytes
        self.sent_messages[key] += 1
        if self._prom:
            self._prom.sent(key, nbytes)

    def received(self, peer: int | str, kind: str, nbytes: int) -> None:
        key = (str(peer), kind)
        self.received_bytes[key] += nbytes
        if self._prom:
            self._prom.received(key, nbytes)

    @property
    def timing(self) -> bool:
        """Whether callers should time their waits (only worth it when exported)."""
        return self._prom is not None

    def comm(self, op: str, seconds: float) -> None:
        if self._prom:
            self._prom.comm[op].observe(seconds)

    def step(self, step: int, seconds: float, tokens: int, train_loss: float | None = None) -> None:
        if self._prom:
            self._prom.step_seconds.observe(seconds)
            self._prom.tokens.inc(tokens)
            self._prom.step.set(step)
            if train_loss is not None:
                self._prom.train_loss.labels(self.rank, self.role).set(train_loss)

    def val_loss(self, loss: float) -> None:
        if self._prom:
            self._prom.val_loss.labels(self.rank, self.role).set(loss)

    def clients_live(self, n: int) -> None:
        """The server: how many clients take part now (elastic runs lose and gain them)."""
        self.live = n
        if self._prom:
            self._prom.clients_live.labels(self.rank, self.role).set(n)

    def client_lost(self, reason: str) -> None:
        """The server dropped a client; `reason` as in LOST_REASONS (any string is kept)."""
        self.lost_by_reason[reason] += 1
        if self._prom:
            self._prom.clients_lost.labels(self.rank, self.role, reason).inc()

    def client_joined(self) -> None:
        """A client joined the running job."""
        self.joined += 1
        if self._prom:
            self._prom.clients_joined.labels(self.rank, self.role).inc()

    # ------------------------------------------------------------ reading

    def state(self) -> dict[str, Any]:
        """The byte counts, for a checkpoint (a resumed run's summary.json continues them)."""
        return {
            "sent": dict(self.sent_bytes),
            "received": dict(self.received_bytes),
            "messages": dict(self.sent_messages),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sent_bytes.update(state["sent"])
        self.received_bytes.update(state["received"])
        self.sent_messages.update(state["messages"])

    def sent_by_kind(self) -> dict[str, int]:
        return _by_kind(self.sent_bytes)

    def received_by_kind(self) -> dict[str, int]:
        return _by_kind(self.received_bytes)

    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())

    def total_received(self) -> int:
        return sum(self.received_bytes.values())

    def received_from_ranks(self) -> int:
        """Bytes that other ranks sent this one point to point (not collectives' results)."""
        return sum(n for (peer, _), n in self.received_bytes.items() if peer.isdigit())

    # ------------------------------------------------------------ export

    def serve(self, addr: str, port: int) -> None:
        """Start the /metrics endpoint (raises OSError when the port is taken)."""
        assert self._prom is not None, "Metrics(export=True) to serve"
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self._prom.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def push(self, gateway: str, job: str) -> None:
        """Push final values to a Pushgateway (short jobs end between two scrapes)."""
        assert self._prom is not None, "Metrics(export=True) to push"
        from prometheus_client import push_to_gateway

        push_to_gateway(gateway, job=job, registry=self._prom.registry, grouping_key={"rank": self.rank})


def _by_kind(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    return {k: sum(n for (_, kind), n in counts.items() if kind == k) for k in KINDS}


class _Prometheus:
    """The DESIGN §5 series of one rank, in a registry of their own (+ process metrics)."""

    def __init__(self, rank: str, role: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
            disable_created_metrics,
        )

        disable_created_metrics()  # *_created series would only double the payload
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        mine = (rank, role)
        by_peer = ["rank", "role", "peer", "kind"]
        self._sent_bytes = Counter("splitlora_sent_bytes", "Bytes sent", by_peer, registry=r)
        self._received_bytes = Counter("splitlora_received_bytes", "Bytes received", by_peer, registry=r)
        self._sent_messages = Counter("splitlora_sent_messages", "Messages sent", by_peer, registry=r)
        comm = Histogram("splitlora_comm_seconds", "Time waiting for sends, receives and the Allreduce",
                         ["rank", "role", "op"], buckets=COMM_BUCKETS, registry=r)  # fmt: skip
        self.comm = {op: comm.labels(*mine, op) for op in ("send", "recv", "allreduce")}
        labels = ["rank", "role"]
        self.step_seconds = Histogram("splitlora_step_seconds", "Wall time of one training step", labels,
                                      buckets=STEP_BUCKETS, registry=r).labels(*mine)  # fmt: skip
        self.tokens = Counter("splitlora_tokens", "Non-padding tokens processed", labels, registry=r).labels(*mine)
        self.step = Gauge("splitlora_step", "Last completed step", labels, registry=r).labels(*mine)
        # loss series appear only on ranks that compute a loss (the server, central): labels() on first set
        self.train_loss = Gauge("splitlora_train_loss", "Training loss of the last step", labels, registry=r)
        self.val_loss = Gauge("splitlora_val_loss", "Last validation loss", labels, registry=r)
        # clients live, lost, joined: the server's. Live appears on first set; on a server the counters exist
        # at 0 from the start, so that increase() sees the first loss or join (a series born at 1 shows none)
        self.clients_live = Gauge("splitlora_clients_live", "Clients taking part in training", labels, registry=r)
        self.clients_lost = Counter("splitlora_clients_lost", "Clients lost, by reason", [*labels, "reason"],
                                    registry=r)  # fmt: skip
        self.clients_joined = Counter("splitlora_clients_joined", "Clients that joined a running job", labels,
                                      registry=r)  # fmt: skip
        if role == "server":
            for reason in LOST_REASONS:
                self.clients_lost.labels(*mine, reason)
            self.clients_joined.labels(*mine)
        self._mine = mine
        self._sent: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._received: dict[tuple[str, str], Any] = {}

    def sent(self, key: tuple[str, str], nbytes: int) -> None:
        if key not in self._sent:
            labels = (*self._mine, *key)
            self._sent[key] = (self._sent_bytes.labels(*labels), self._sent_messages.labels(*labels))
        nbytes_child, messages_child = self._sent[key]
        nbytes_child.inc(nbytes)
        messages_child.inc()

    def received(self, key: tuple[str, str], nbytes: int) -> None:
        if key not in self._received:
            self._received[key] = self._received_bytes.labels(*self._mine, *key)
        self._received[key].inc(nbytes)
