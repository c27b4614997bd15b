"""The job secret (comm.secret_file, run/secret.py): the preflight's challenge-response, in
process on the local transport, and under a real mpirun where one client holds another secret."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import MPIRUN, run_cmd

from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.metrics import Metrics
from splitlora_mpi.run import preflight, secret
from splitlora_mpi.wire.local import LocalWorld

JOB = b"job secret of this test, 32 byte"
OTHER = b"another secret, also of 32 bytes"


def _agree(tmp_path, secrets: dict[int, bytes | None]) -> dict[int, str]:
    """Each rank's error from the preflight's handshake (empty: every rank passed)."""
    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    errors: dict[int, str] = {}

    def rank(t) -> None:
        try:
            preflight.agree(t, cfg, preflight.Checked(secret=secrets[t.rank]))
        except ConfigError as e:
            errors[t.rank] = str(e)

    LocalWorld(len(secrets)).run(rank, 10, lambda r: Metrics(r, "client"))
    return errors


def test_clients_with_the_secret_pass_and_without_it_every_rank_stops_naming_the_rank(tmp_path):
    assert _agree(tmp_path, {0: JOB, 1: JOB, 2: JOB}) == {}
    assert _agree(tmp_path, {0: None, 1: None, 2: None}) == {}  # (no secret: as before)
    wrong = _agree(tmp_path, {0: JOB, 1: JOB, 2: OTHER})
    assert set(wrong) == {0, 1, 2} and len(set(wrong.values())) == 1
    assert "rank 2 gave a wrong answer (another secret)" in wrong[0]
    missing = _agree(tmp_path, {0: JOB, 1: None, 2: JOB})
    assert "rank 1 gave no answer (no comm.secret_file)" in missing[0]


def test_an_answer_is_bound_to_its_challenge_rank_and_config():
    fp = {"model.config": "tiny"}
    challenge = secret.nonce(JOB)
    proof = secret.answer(JOB, challenge, 1, fp)
    assert secret.refusal(JOB, {1: challenge}, fp, {1: proof}) is None
    assert secret.refusal(JOB, {1: secret.nonce(JOB)}, fp, {1: proof})  # a replayed answer
    assert secret.refusal(JOB, {2: challenge}, fp, {2: proof})  # another rank's
    assert secret.refusal(JOB, {1: challenge}, {"model.config": "other"}, {1: proof})  # another config's


POD_UID = POD_GID = 10001  # k8s/base/mpijob.yaml: runAsUser, runAsGroup and fsGroup


def test_the_secret_file_must_be_private_and_long_enough(tmp_path):
    """A file of the reading user's own (here root's, read by root): no group or other bits."""
    f = tmp_path / "secret"
    f.write_bytes(JOB + b"\n")
    assert f.stat().st_uid == os.geteuid()
    for mode in (0o644, 0o640, 0o440, 0o604, 0o620):
        f.chmod(mode)
        expected = f"{f} has mode {mode:04o}, others may read it; expected 0600 (chmod 600 {f})"
        with pytest.raises(ConfigError, match=re.escape(expected)):
            secret.read_secret(str(f))
    for mode in (0o600, 0o400):
        f.chmod(mode)
        assert secret.read_secret(str(f)) == JOB
    f.write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds 5 bytes; expected a secret of at least 16"):
        secret.read_secret(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        secret.read_secret(str(tmp_path / "none"))


def test_a_file_another_user_owns_may_be_group_readable_but_not_group_writable_or_others(tmp_path):
    """A file owned by another user (uid 10001, read here by root): others nothing, the group
    no write; 0440 (a Kubernetes Secret mount's mode) passes."""
    f = tmp_path / "secret"
    f.write_bytes(JOB + b"\n")
    os.chown(f, POD_UID, POD_GID)  # (the tests run as root, here and in CI)
    for mode in (0o440, 0o400, 0o600, 0o640):
        f.chmod(mode)
        assert secret.read_secret(str(f)) == JOB, f"{mode:04o}"
    refusals = {0o444: "others may access it", 0o604: "others may access it", 0o441: "others may access it",
                0o460: "its group may write it", 0o660: "its group may write it"}  # fmt: skip
    for mode, what in refusals.items():
        f.chmod(mode)
        with pytest.raises(ConfigError) as e:
            secret.read_secret(str(f))
        assert str(e.value) == (
            f"config key 'comm.secret_file': {f} has mode {mode:04o} and belongs to uid {POD_UID}, not this "
            f"process's uid {os.geteuid()}: {what}; expected no permission for others and no group write, as in "
            f"0440 (chmod o-rwx,g-w {f}; a Kubernetes Secret volume: defaultMode 0400)"
        )


@pytest.fixture
def shared_dir():
    """A directory uid 10001 can reach (pytest's tmp_path lies under root's 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="splitlora-secret-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d)


def _read_as(path: Path, uid: int, gid: int) -> str:
    """read_secret(path) in a forked child running as uid with gid as its only group (a pod's
    process: runAsUser, runAsGroup = fsGroup): 'ok <secret>' or the ConfigError's message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child: never returns into pytest)
        code = 1
        try:
            os.close(r)
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            assert os.geteuid() == uid and os.getgroups() == [gid]
            try:
                out = "ok " + secret.read_secret(str(path)).decode()
            except ConfigError as e:
                out = str(e)
            os.write(w, out.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_a_kubernetes_secret_mount_is_read_through_the_pod_group(shared_dir):
    """What the kubelet makes of a Secret volume with defaultMode 0400 in a pod with fsGroup
    10001 (root:10001, 0440), read by the pod's uid 10001 (group 10001): accepted. 0444 or a
    group-writable file: refused. Without fsGroup (root:root 0400) uid 10001 cannot read it."""
    f = shared_dir / "job.secret"
    f.write_bytes(JOB + b"\n")
    os.chown(f, 0, POD_GID)
    f.chmod(0o440)
    assert _read_as(f, POD_UID, POD_GID) == "ok " + JOB.decode()
    f.chmod(0o444)
    assert _read_as(f, POD_UID, POD_GID) == (
        f"config key 'comm.secret_file': {f} has mode 0444 and belongs to uid 0, not this process's uid "
        f"{POD_UID}: others may access it; expected no permission for others and no group write, as in 0440 "
        f"(chmod o-rwx,g-w {f}; a Kubernetes Secret volume: defaultMode 0400)"
    )
    f.chmod(0o460)
    assert "0460 and belongs to uid 0" in _read_as(f, POD_UID, POD_GID)
    os.chown(f, 0, 0)
    f.chmod(0o400)
    assert _read_as(f, POD_UID, POD_GID) == f"config key 'comm.secret_file': cannot read {f}: Permission denied"
    os.chown(f, POD_UID, POD_GID)  # (the user's own file again: 0600 / 0400 only)
    f.chmod(0o440)
    assert "has mode 0440, others may read it; expected 0600" in _read_as(f, POD_UID, POD_GID)
    f.chmod(0o400)
    assert _read_as(f, POD_UID, POD_GID) == "ok " + JOB.decode()


def test_a_client_with_another_secret_is_refused_by_rank_and_the_secret_never_shows(tmp_path):
    """mpirun, 1 server + 2 clients, client 2 with another secret: exit 2 within 3 s, one line naming rank
    2, before any rank imported torch; neither secret in the output or the run directory."""
    job, other = tmp_path / "job.secret", tmp_path / "other.secret"
    for f, s in ((job, JOB), (other, OTHER)):
        f.write_bytes(s)
        f.chmod(0o600)
    args = ["-m", "splitlora_mpi", "--set", "train.steps=2", "--set", f"run.out_dir={tmp_path / 'run'}"]
    cmd = [MPIRUN, "-n", "2", sys.executable, *args, "--set", f"comm.secret_file={job}",
           ":", "-n", "1", sys.executable, *args, "--set", f"comm.secret_file={other}"]  # fmt: skip
    start = time.monotonic()
    r = run_cmd(cmd, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "rank 2 gave a wrong answer (another secret)" in lines[0]
    print(f"refused in {elapsed:.1f} s (mpirun start to exit)")
    assert elapsed <= 3.0, f"refused after {elapsed:.1f} s; expected ≤ 3 s (1.3 s measured here)"
    written = b"".join(f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file())
    for s in (JOB, OTHER):
        assert s.decode() not in r.stdout + r.stderr and s not in written
