"""The job secret (`comm.secret_file`): a client proves it holds it before anything else.

Rank 0 sends each client a fresh nonce; the client answers HMAC-SHA256(secret, nonce, its
rank, its config fingerprint); rank 0 compares in constant time and refuses a wrong or
missing answer by rank, before any client has learnt anything of the job but the refusal.
The secret never leaves its file: not in config.yaml (which names the path), a log line, the
summary or a metric. Encrypting what travels is the network's job (a WireGuard overlay, an
encrypting CNI).

Who may read the file: OpenSSH's rule for private keys, widened for files another user owns.
A file this process's user owns must have no group or other bits (0600, 0400); one another
user owns, no bits for others and no group write (0440: a Kubernetes Secret volume in a pod
with `fsGroup`, whose files the kubelet makes root:<fsGroup> and ORs 0440 into).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MIN_BYTES = 16


def read_secret(path: str | None) -> bytes | None:
    """The secret (None: no secret configured). Its file must be private (module docstring)."""
    if path is None:
        return None
    file = Path(path).expanduser()
    try:
        st = file.stat()
        secret = file.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"config key 'comm.secret_file': cannot read {file}: {e.strerror or e}") from None
    problem = permission_problem(file, st.st_mode & 0o777, st.st_uid, os.geteuid())
    if problem:
        raise ConfigError(problem)
    if len(secret) < MIN_BYTES:
        raise ConfigError(f"config key 'comm.secret_file': {file} holds {len(secret)} bytes; expected a secret of "
                          f"at least {MIN_BYTES} (e.g. head -c 32 /dev/urandom | base64 > {file})")  # fmt: skip
    return secret


def permission_problem(file: Path, mode: int, owner: int, reader: int) -> str | None:
    """The one-line refusal of a secret file with these permission bits and owner, read by the
    user `reader` (None: private enough)."""
    if owner == reader:
        if mode & 0o077:
            return (f"config key 'comm.secret_file': {file} has mode {mode:04o}, others may read it; "
                    f"expected 0600 (chmod 600 {file})")  # fmt: skip
        return None
    if mode & 0o027:
        what = "others may access it" if mode & 0o007 else "its group may write it"
        return (f"config key 'comm.secret_file': {file} has mode {mode:04o} and belongs to uid {owner}, not this "
                f"process's uid {reader}: {what}; expected no permission for others and no group write, as in 0440 "
                f"(chmod o-rwx,g-w {file}; a Kubernetes Secret volume: defaultMode 0400)")  # fmt: skip
    return None


def nonce(secret: bytes | None) -> bytes | None:
    """Rank 0's challenge to one client (None: no secret, no challenge)."""
    return os.urandom(32) if secret is not None else None


def answer(secret: bytes | None, challenge: bytes | None, rank: int, fingerprint: dict[str, Any]) -> str | None:
    """A client's proof that it holds the secret (None: it has none, or was not challenged)."""
    if secret is None or challenge is None:
        return None
    message = challenge + str(rank).encode() + json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def refusal(secret: bytes | None, challenges: dict[int, bytes | None], fingerprint: dict[str, Any],
            proofs: dict[int, str | None]) -> str | None:  # fmt: skip
    """None when every client answered its challenge with the secret, else the one-line refusal."""
    if secret is None:
        return None
    for rank in sorted(proofs):
        expected = answer(secret, challenges[rank], rank, fingerprint)
        if proofs[rank] is None or not hmac.compare_digest(proofs[rank], expected):
            what = "no answer (no comm.secret_file)" if proofs[rank] is None else "a wrong answer (another secret)"
            return (f"handshake refused: rank {rank} gave {what} to the job secret challenge; every rank needs the "
                    "job's comm.secret_file")  # fmt: skip
    return None
