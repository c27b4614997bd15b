"""The job secret (comm.secret_file, run/secret.py): the preflight's challenge-response, in
process on the local transport, and under a real mpirun where one client holds another secret."""

from __future__ import annotations

import sys
import time

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


def test_the_secret_file_must_be_private_and_long_enough(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(JOB + b"\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644, others may read it; expected 0600 \(chmod 600"):
        secret.read_secret(str(f))
    f.chmod(0o600)
    assert secret.read_secret(str(f)) == JOB
    f.write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds 5 bytes; expected a secret of at least 16"):
        secret.read_secret(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        secret.read_secret(str(tmp_path / "none"))


def test_a_client_with_another_secret_is_refused_by_rank_and_the_secret_never_shows(tmp_path):
    """mpirun, 1 server + 2 clients, client 2 with another secret: exit 2, one line naming rank
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
    assert elapsed < 10, elapsed
    written = b"".join(f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file())
    for s in (JOB, OTHER):
        assert s.decode() not in r.stdout + r.stderr and s not in written
