"""What the roles say to each other, as named records, and the one codec that puts them on a
Transport. A record's fields are tensors in a fixed order, each with the byte kind it is
counted as; `wire` fields are activations or gradients, sent in `comm.activation_dtype`
(one or two tensors, see compress.py) and decoded to the compute dtype on arrival.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from ..compress import decode, encode, wire_parts
from . import CONTINUE, Message, Transport


def _part(kind: str, wire: bool = False) -> Any:
    return field(metadata={"kind": kind, "wire": wire})


@dataclass
class Upload:
    """A client's batch at the cut (training or validation) and what the server's loss needs."""

    activations: torch.Tensor = _part("activations", wire=True)
    side: torch.Tensor = _part("labels")  # [2, B, T] int32: attention mask, labels

    @property
    def mask(self) -> torch.Tensor:
        return self.side[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.side[1]


@dataclass
class PrivateUpload:
    """Label privacy: the activations, the attention mask and the batch's number of target
    tokens; the labels stay on the client."""

    activations: torch.Tensor = _part("activations", wire=True)
    attention: torch.Tensor = _part("control")  # [1, B, T] int32
    targets: torch.Tensor = _part("control")  # [1] int64

    @property
    def mask(self) -> torch.Tensor:
        return self.attention[0]


@dataclass
class Labels:
    """Micro-batches: the step's mask and labels, sent before its activations."""

    side: torch.Tensor = _part("labels")  # [2, B, T] int32


@dataclass
class MicroUpload:
    """Micro-batches: the activations of one micro-batch."""

    activations: torch.Tensor = _part("activations", wire=True)


@dataclass
class GradientReply:
    """The gradient of the activations a client sent (its flag: what every client does next)."""

    gradient: torch.Tensor = _part("gradients", wire=True)


@dataclass
class TailInput:
    """Label privacy, training: the server's output rows of one client and the step's target count."""

    output: torch.Tensor = _part("activations", wire=True)
    targets: torch.Tensor = _part("control")  # [1] int64, over every client's rows


@dataclass
class TailReply:
    """Label privacy, training: the gradient of the server's output and the client's loss sum."""

    gradient: torch.Tensor = _part("gradients", wire=True)
    loss_sum: torch.Tensor = _part("control")  # [1] float64


@dataclass
class EvalTailInput:
    """Label privacy, validation: the server's output rows of one client."""

    output: torch.Tensor = _part("activations", wire=True)


@dataclass
class EvalSums:
    """Label privacy, validation: [loss sum, target tokens] of one client's batch."""

    sums: torch.Tensor = _part("control")  # [2] float64


R = TypeVar("R")


@dataclass
class Letter(Generic[R]):
    """A received record with the step and flag it was sent with."""

    step: int
    flag: int
    body: R


class Channel:
    """Records over a Transport: encoded in the wire dtype on the way out, decoded to the
    compute dtype and moved to this rank's device on the way in."""

    def __init__(self, transport: Transport, wire_dtype: str, compute_dtype: torch.dtype, device: torch.device):
        self.transport = transport
        self.wire = wire_dtype
        self.compute_dtype = compute_dtype
        self.device = device

    def send(self, phase: int, step: int, records: dict[int, Any], flag: int = CONTINUE) -> None:
        self.isend(phase, step, records, flag)()

    def isend(
        self, phase: int, step: int, records: dict[int, Any], flag: int = CONTINUE, give_up_s: float = 0
    ) -> Callable[[], list[int]]:
        """Start sending each destination its record; returns the wait for completion (which
        returns the destinations given up on, see Transport.isend_tensors)."""
        encoded = {d: self.encode(r) for d, r in records.items()}
        return self.transport.isend_tensors(phase, step, encoded, flag, give_up_s)

    def recv(self, sources: list[int], phase: int, record: type[R], give_up_s: float = 0) -> dict[int, Letter[R]]:
        """One `record` from each source, in arrival order (`give_up_s`: see Transport.recv_tensors)."""
        raw = self.transport.recv_tensors(sources, phase, self.kinds(record), give_up_s)
        return {s: Letter(msgs[0].step, msgs[0].flag, self.decode(record, msgs)) for s, msgs in raw.items()}

    def encode(self, record: Any) -> list[tuple[torch.Tensor, str]]:
        out = []
        for f in dataclasses.fields(record):
            t = getattr(record, f.name)
            out += [(x, f.metadata["kind"]) for x in (encode(t, self.wire) if f.metadata["wire"] else [t])]
        return out

    def kinds(self, record: type) -> list[str]:
        return [f.metadata["kind"] for f in dataclasses.fields(record)
                for _ in range(wire_parts(self.wire) if f.metadata["wire"] else 1)]  # fmt: skip

    def decode(self, record: type[R], msgs: list[Message]) -> R:
        values, i = {}, 0
        for f in dataclasses.fields(record):  # type: ignore[arg-type]
            if f.metadata["wire"]:
                n = wire_parts(self.wire)
                values[f.name] = decode([m.tensor for m in msgs[i : i + n]], self.compute_dtype).to(self.device)
            else:
                n = 1
                values[f.name] = msgs[i].tensor.to(self.device)
            i += n
        return record(**values)
