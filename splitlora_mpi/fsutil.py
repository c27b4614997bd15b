"""Files that are either completely written or not there (outputs, checkpoints, caches), and
local paths told apart from hub ids."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError


def write_atomic(path: Path, data: bytes | str) -> None:
    """Temp file + fsync + rename (+ fsync of the directory): the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only once it is completely written."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(out_dir: Path) -> None:
    """Fail before any work (exit 2) if the output directory cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"config key 'run.out_dir': cannot write to {out_dir}: {e.strerror or e}") from None


def say(message: str) -> None:
    """A progress or warning line on stderr (stdout may be a pipe that buffers)."""
    print(message, file=sys.stderr, flush=True)


def local_or_hub(spec: str) -> str:
    """A hub id as given, or a local path expanded. A path that is no directory raises
    FileNotFoundError: the hub client would call it a malformed repo id."""
    if not spec.startswith(("/", ".", "~")):
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError("no such directory")
    return str(path)
