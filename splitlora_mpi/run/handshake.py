"""Before step 1: every client must be ready and configured like the server, or every rank
stops with one reason. Rank 0 then tells every client where to resume and what its mode shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..wire import HANDSHAKE, SERVER, Transport


def client_handshake(
    transport: Transport, fingerprint: dict[str, Any], hello: dict[str, Any], error: str | None, phase: int = HANDSHAKE
) -> dict[str, Any]:
    """Send the server this client's fingerprint and facts (or its set-up error); returns the
    verdict: `resume` (the step to resume from, None: start afresh) and what the mode shares.
    `phase`: the tag (the preflight before the heavy imports has its own)."""
    transport.send_object(SERVER, phase, {"fingerprint": fingerprint, "error": error, **hello})
    verdict = transport.recv_objects([SERVER], phase)[SERVER]
    if verdict["error"] is not None:
        raise ConfigError(verdict["error"])
    return verdict


def server_handshake(
    transport: Transport,
    clients: list[int],
    fingerprint: dict[str, Any],
    error: str | None,
    share: Callable[[dict[int, Any]], dict[str, Any]],
    shared_val: bool = True,
    phase: int = HANDSHAKE,
    refuse: Callable[[dict[int, Any]], str | None] = lambda hellos: None,
) -> dict[int, Any]:
    """Every client's hello; the verdict (an error, or `share(hellos)`) goes to every client.
    Raises the error on rank 0 too (its own set-up error included), so all ranks stop alike.
    `shared_val`: every client reads one validation file (else each its own). `refuse`: the
    job secret's check, before anything a client said is looked at."""
    hellos = transport.recv_objects(clients, phase)
    error = error or refuse(hellos) or verdict(fingerprint, hellos, shared_val)
    reply = {"error": error, **(share(hellos) if error is None else {})}
    for c in clients:
        transport.send_object(c, phase, reply)
    if error is not None:
        raise ConfigError(error)
    return hellos


def verdict(mine: dict[str, Any], hellos: dict[int, dict[str, Any]], shared_val: bool = True) -> str | None:
    """None when every client is ready and configured like the server, else the one-line reason."""
    for rank in sorted(hellos):
        if hellos[rank]["error"]:
            return hellos[rank]["error"]
    for rank in sorted(hellos):
        theirs = hellos[rank]["fingerprint"]
        for key in sorted((set(mine) | set(theirs)) - {"tokenizer"}):
            if mine.get(key) != theirs.get(key):
                return (
                    f"handshake refused: rank {rank} was started with {key}={theirs.get(key)!r}, "
                    f"the server with {key}={mine.get(key)!r}; every rank needs the same config"
                )
        if mine.get("tokenizer") != theirs.get("tokenizer"):
            return (
                f"handshake refused: rank {rank}'s tokenizer differs from the server's (sha256 "
                f"{str(theirs.get('tokenizer'))[:12]} vs {str(mine.get('tokenizer'))[:12]}: vocabulary, special "
                "tokens or chat template); every rank needs the same tokenizer files"
            )
    rows = sorted({h["val_rows"] for h in hellos.values()}) if shared_val else []
    if len(rows) > 1:
        return f"config key 'data.val_path': the clients read {rows} validation rows; expected the same file everywhere"
    return None
