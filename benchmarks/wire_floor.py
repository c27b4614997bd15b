"""Where the wire's time goes: a round trip of one tensor message built up step by step, from
raw mpi4py to the Transport, at the message sizes of benchmarks/systems.py.

Each row adds one thing the Transport must do per tensor (cumulative), so the differences say
what each costs; three rows drive the same two MPI messages from C (benchmarks/wire_floor.c,
built with the mpicc beside python; left out when it cannot be built) to separate the MPI
design from the interpreter. mpirun -n 2; rows alternate; best of --repeats.

    python benchmarks/wire_floor.py            # -> benchmarks/results/wire_floor.{json,md}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import MPIRUN, machine
from systems import WIRE_SIZES, raw_round_trip, timed, transport_round_trip

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "raw": "raw mpi4py: blocking Send / Recv of the tensor's memory",
    "c": "C: header + payload as two messages (Improbe / Imrecv, Testall spin)",
    "c_python": "C + the Python a message needs (header packed and read, tensor over the bytes, bytes counted)",
    "c_tensor": "C with the header and the byte counts in C too; Python builds the tensor only",
    "python": "Python: the same two messages through mpi4py (spin with sched_yield)",
    "header": "+ header packed and read (struct)",
    "tensor": "+ a torch tensor over the received bytes",
    "counted": "+ bytes counted by kind (Metrics)",
    "pooled": "+ pooled receive buffers (BufferPool)",
    "transport": "the Transport (splitlora_mpi/wire/mpi.py)",
}  # fmt: skip
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
STEPS = ["python", "header", "tensor", "counted", "pooled"]


def build_c(out_dir: Path) -> str:
    """wire_floor.c as an extension module in `out_dir`; returns why not, or ""."""
    mpicc = shutil.which("mpicc", path=str(Path(sys.executable).parent)) or shutil.which("mpicc")
    if not mpicc:
        return "no mpicc"
    cmd = [mpicc, "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
           str(Path(__file__).with_suffix(".c")), "-o", str(out_dir / f"wire_floor_c{SUFFIX}")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    return f"mpicc failed: {r.stderr.strip()[-300:]}" if r.returncode else ""


def load_c(build_dir: Path) -> Any:
    so = build_dir / f"wire_floor_c{SUFFIX}"
    if not so.exists():
        return None
    spec = importlib.util.spec_from_file_location("wire_floor_c", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(repeats: int, shape: list[int], build_dir: str, messages: int = 400) -> None:
    """Under mpirun -n 2: rank 1 sends, rank 0 answers with a message of the same size."""
    import numpy as np
    import torch
    from mpi4py import MPI

    from splitlora_mpi.metrics import Metrics
    from splitlora_mpi.wire import HEADER_BYTES, TRAIN, Message
    from splitlora_mpi.wire.mpi import HEADER, BufferPool, MpiTransport, _header, _tensor

    comm = MPI.COMM_WORLD
    comm_f, rank, peer = comm.py2f(), comm.Get_rank(), 1 - comm.Get_rank()
    x = torch.randn(*shape)
    nbytes, address = x.nbytes, x.data_ptr()
    got = np.empty(nbytes, np.uint8)
    header_in, status = bytearray(HEADER_BYTES), MPI.Status()
    metrics, pool = Metrics(rank), BufferPool()
    fast = load_c(Path(build_dir))

    def spin(requests: list) -> None:
        while not MPI.Request.Testall(requests):
            os.sched_yield()

    def send(level: int, step: int) -> None:
        header = _header(step, x, 0) if level >= 1 else bytes(HEADER_BYTES)
        spin([comm.Isend(MPI.buffer.fromaddress(address, nbytes), peer, 9), comm.Isend(header, peer, 8)])
        if level >= 3:
            count_sent()

    def count_sent() -> None:
        metrics.sent(peer, "control", HEADER_BYTES)
        metrics.sent(peer, "activations", nbytes)

    def recv(level: int) -> None:
        requests = [comm.Irecv(header_in, peer, 8)]
        while (message := comm.Improbe(peer, 9, status)) is None:
            os.sched_yield()
        n = status.Get_count(MPI.BYTE)
        buf = pool.take((TRAIN, peer, 0), n)[:n] if level >= 4 else got
        requests.append(message.Irecv(buf))
        spin(requests)
        finish(level, buf, n)

    def finish(level: int, buf: np.ndarray, n: int) -> None:
        if level >= 1:
            h = HEADER.unpack(header_in)
        if level >= 2:
            Message(h[0], _tensor(buf, h[1], h[3 : 3 + h[2]]), h[7])
        if level >= 3:
            metrics.received(peer, "control", HEADER_BYTES)
            metrics.received(peer, "activations", n)

    def c_send(level: int, step: int) -> None:
        header = _header(step, x, 0) if level else bytes(HEADER_BYTES)
        fast.send(comm_f, peer, 8, header, address, nbytes)
        if level:
            count_sent()

    def c_recv(level: int) -> None:
        n = fast.recv(comm_f, peer, 8, header_in, got)
        if level:
            finish(3, got, n)

    def round_trip(send: Callable[[int, int], None], recv: Callable[[int], None], level: int) -> Callable[[int], None]:
        def one(step: int) -> None:
            if rank == 1:
                send(level, step)
                recv(level)
            else:
                recv(level)
                send(level, step)

        return one

    counts = np.zeros(2, np.int64)
    dims = (*x.shape, *(0,) * (4 - x.dim()))

    def c_send_message(level: int, step: int) -> None:
        fast.send_message(comm_f, peer, 8, (step, 0, x.dim(), *dims, 0), address, nbytes, counts)

    def c_recv_message(level: int) -> None:
        h = fast.recv_message(comm_f, peer, 8, got, counts)
        Message(h[0], _tensor(got, h[1], h[3 : 3 + h[2]]), h[7])

    rows: dict[str, Callable[[int], None]] = {"raw": raw_round_trip(comm, x.numpy(), got)}
    if fast is not None:
        rows |= {"c": round_trip(c_send, c_recv, 0), "c_python": round_trip(c_send, c_recv, 1),
                 "c_tensor": round_trip(c_send_message, c_recv_message, 0)}  # fmt: skip
    rows |= {name: round_trip(send, recv, level) for level, name in enumerate(STEPS)}
    rows["transport"] = transport_round_trip(MpiTransport(60.0, Metrics(rank)), x)

    best: dict[str, float] = {}  # µs per round trip
    for _ in range(repeats):
        for name, fn in rows.items():
            best[name] = min(best.get(name, math.inf), timed(comm, fn, messages) / messages * 1e6)
    if rank == 0:
        us = {name: round(v, 2) for name, v in best.items()}
        ratio = {name: round(best["raw"] / v, 3) for name, v in best.items()}
        print(json.dumps({"shape": shape, "bytes_per_message": nbytes, "round_trip_us": us, "ratio_to_raw": ratio}))


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    head = " | ".join(f"{label} ({r['bytes_per_message'] / 1e3:,.0f} kB)" for label, r in sizes.items())
    lines = [f"| round trip of one tensor message, µs (ratio to raw) | {head} |", "|---|" + "---|" * len(sizes)]
    for name, text in ROWS.items():
        cells = [f"{r['round_trip_us'][name]:,.1f} ({r['ratio_to_raw'][name]:.3f})" if name in r["round_trip_us"]
                 else "not built" for r in sizes.values()]  # fmt: skip
        lines.append(f"| {text} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(int(sys.argv[2]), [int(v) for v in sys.argv[4:]], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    result: dict = {"benchmark": "wire_floor", "machine": machine(), "command": " ".join(sys.argv),
                    "best_of": args.repeats, "sizes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as build_dir:
        result["c_not_built"] = build_c(Path(build_dir))
        for label, shape in WIRE_SIZES.items():
            cmd = [MPIRUN, "-n", "2", sys.executable, __file__, "_worker", str(args.repeats), build_dir,
                   *map(str, shape)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            result["sizes"][label] = json.loads(r.stdout.strip().splitlines()[-1])
            print(label, result["sizes"][label]["ratio_to_raw"], flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "wire_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "wire_floor.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
