"""Multi-host MPI on one machine: one network namespace per host, real TCP between them.

    python benchmarks/multihost.py bench [--profiles 200,50,10,2,50/25] [--steps 32]   # time to target per link
    python benchmarks/multihost.py wire         # bytes on each client's veth vs the job's byte counters
    python benchmarks/multihost.py transport    # which netmod settings cross the links; eager threshold
    python benchmarks/multihost.py cleanup      # remove what a harness killed with -9 left behind

Each host (server `slm-srv`, clients `slm-c1`, `slm-c2`, ...) is a network namespace with one
veth link `eth0` to the root namespace, which routes between the links (net.ipv4.ip_forward:
a Linux bridge does not forward in this sandbox) and runs mpiexec. Addresses are RFC 5737
documentation range 198.51.100.0/24 (TEST-NET-2; 192.0.2.0/24 is this sandbox's own LAN):
host i has 198.51.100.(10+i), the root end of every link 198.51.100.1. mpiexec starts its
proxies through hydra's ssh launcher with a script that runs `ip netns exec HOST unshare
--uts` instead of ssh; the hostfile names hosts by address, so nothing waits for DNS. Links
can be rate limited (tc tbf), lossy (a classic-BPF random drop on the clsact egress hook) and
slow (a user-space delay line on a TUN device in the router, see DelayLine): netem, the usual
tool for loss and delay, is not built into this kernel.
Everything created is removed on exit, also on exceptions, SIGINT and SIGTERM; a harness
killed with -9 is cleaned up by the next one (or by `cleanup`).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
PREFIX = "slm-"
NET = "198.51.100."  # RFC 5737 TEST-NET-2; must be unused on this machine
ROUTER = NET + "1"  # the root end of every link: the hosts' gateway and mpiexec's address
IFACE = "eth0"  # each host's link, inside its namespace
RULES = 20000  # policy rule preferences (and table ids) of the delay lines: RULES .. RULES + 999
STATE = Path("/run/slm-multihost")  # lock + the ip_forward value to restore after a kill -9
# What makes MPICH use the links: its default netmod (UCX) sees namespaces on one kernel as
# one machine and moves data through shared memory. OMP_NUM_THREADS: 1 thread per rank,
# what mpirun on one 2-core host gives 3 ranks (each rank sees 1 local rank here).
TRANSPORT_ENV = {
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "MPIR_CVAR_NOLOCAL": "1",
    "FI_TCP_IFACE": IFACE,
    "OMP_NUM_THREADS": "1",
}
COUNTERS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
LAUNCHER = """#!/bin/sh
# hydra's ssh launcher calls: <this> -x ADDRESS 'PROXY COMMAND'; run it in that host's namespace
# with the host's name (own UTS namespace), as `ssh ADDRESS` would. exec: the proxy stays
# mpiexec's child, so mpiexec sees it end.
[ "$1" = -x ] && shift
case "$1" in
{cases}
  *) echo "launch-in-netns: unknown host $1" >&2; exit 255 ;;
esac
shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host && exec $*"
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a system command; a failure raises with its stderr (set-up errors must be loud)."""
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be created here; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2 util-linux)"
    probe = f"{PREFIX}probe{os.getpid()}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Link:
    """How one host's link is shaped, the same in both directions."""

    rate_mbit: float = 0.0  # 0 = unshaped (veth: several Gbit/s here)
    loss_pct: float = 0.0  # packets dropped at random
    delay_ms: float = 0.0  # added to every packet, each way (round trip: twice this)


@dataclass(frozen=True)
class Host:
    name: str  # namespace, hostname, hostfile entry and the root end's interface name
    addr: str


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


@dataclass
class Network:
    """The hosts of one job, and the undo log of everything created for them."""

    clients: int
    workdir: Path
    hosts: list[Host] = field(init=False)
    _undo: list[Callable[[], object]] = field(default_factory=list)
    _delays: dict[str, DelayLine] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ["srv"] + [f"c{i}" for i in range(1, self.clients + 1)]
        self.hosts = [Host(PREFIX + n, f"{NET}{10 + i}") for i, n in enumerate(names)]

    @property
    def server(self) -> str:
        return self.hosts[0].name

    @property
    def client_hosts(self) -> list[str]:
        return [h.name for h in self.hosts[1:]]

    def create(self) -> None:
        """Namespaces, veth links, routes through the root namespace, hostfile, launcher."""
        used = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
        if NET in used:
            raise RuntimeError(f"{NET}0/24 is already in use on this machine; multihost needs it for its hosts")
        _forward_on()
        self._undo.append(_forward_restore)
        for h in self.hosts:
            sh("ip", "netns", "add", h.name)
            self._undo.append(lambda h=h: _remove_namespace(h.name))
            sh("ip", "link", "add", h.name, "type", "veth", "peer", "name", IFACE, "netns", h.name)
            self._undo.append(lambda h=h: sh("ip", "link", "del", h.name, check=False))
            for ns, dev, addr in ((None, h.name, ROUTER), (h.name, IFACE, h.addr)):
                # no IPv6 link-local chatter on the counted links; gso_max_segs 1: TCP hands the
                # veth MTU-sized frames, so its counters see the headers a real 1500-byte wire carries
                _ip(ns, "link", "set", dev, "addrgenmode", "none", "gso_max_segs", "1")
                _ip(ns, "addr", "add", f"{addr}/32", "dev", dev)
                _ip(ns, "link", "set", dev, "up")
            _ip(h.name, "link", "set", "lo", "up")
            _ip(h.name, "route", "add", ROUTER, "dev", IFACE)
            _ip(h.name, "route", "add", "default", "via", ROUTER, "dev", IFACE)
            self._routes(h)
        (self.workdir / "hosts").write_text("".join(f"{h.addr}:1\n" for h in self.hosts))
        launcher = self.workdir / "launch-in-netns.sh"
        launcher.write_text(LAUNCHER.format(cases="\n".join(f"  {h.addr}) host={h.name} ;;" for h in self.hosts)))
        launcher.chmod(0o755)

    def _routes(self, h: Host) -> None:
        """The root namespace's route to a host: its link, or its delay line when it has one."""
        if h.name in self._delays:
            self._delays[h.name].routes()
        else:
            sh("ip", "route", "replace", f"{h.addr}/32", "dev", h.name)

    def destroy(self) -> list[str]:
        """Undo everything in reverse order; returns what could not be undone."""
        failed = []
        while self._delays:
            self._delays.popitem()[1].close()
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep undoing the rest
                failed.append(str(e))
        return failed

    def shape(self, host: str, link: Link) -> None:
        """Rate limit, random loss and delay on the host's link, both directions (replacing any)."""
        if host in self._delays:
            self._delays.pop(host).close()
        h = next(h for h in self.hosts if h.name == host)
        if link.delay_ms:
            self._delays[host] = DelayLine(h, self.hosts.index(h), link.delay_ms / 1e3)
        self._routes(h)
        for ns, dev in ((None, host), (host, IFACE)):
            _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
            _tc(ns, "qdisc", "del", "dev", dev, "clsact", check=False)
            if link.rate_mbit:
                burst = max(32_000, int(link.rate_mbit * 1e6 / 8 * 0.004))  # >= 4 ms of traffic
                _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{link.rate_mbit:g}mbit",
                    "burst", str(burst), "latency", "100ms")  # fmt: skip
            if link.loss_pct:
                _tc(ns, "qdisc", "add", "dev", dev, "clsact")
                _tc(ns, "filter", "add", "dev", dev, "egress", "bpf", "da", "bytecode", _drop_program(link.loss_pct))

    def set_link(self, host: str, up: bool) -> None:
        """Cut or restore a host's link at its root end (a switch port going down); the route
        that went away with it comes back with it."""
        sh("ip", "link", "set", "dev", host, "up" if up else "down")
        if up:
            self._routes(next(h for h in self.hosts if h.name == host))

    def counters(self, host: str) -> dict[str, int]:
        """Bytes and packets of the host's eth0 so far, as the host sees them."""
        paths = [f"/sys/class/net/{IFACE}/statistics/{k}" for k in COUNTERS]
        values = sh("ip", "netns", "exec", host, "cat", *paths).stdout.split()
        return dict(zip(COUNTERS, map(int, values)))

    def mpirun(self, args: Sequence[str], env: Mapping[str, str] = TRANSPORT_ENV) -> list[str]:
        """mpirun for one rank per host, in hostfile order: rank 0 = the server's host."""
        cmd = [MPIRUN, "-f", str(self.workdir / "hosts"), "-n", str(len(self.hosts)), "-launcher", "ssh",
               "-launcher-exec", str(self.workdir / "launch-in-netns.sh"), "-localhost", ROUTER]  # fmt: skip
        for key, value in env.items():
            cmd += ["-genv", key, value]
        return cmd + list(args)

    def run(self, cmd: Sequence[str], timeout: float, every: Callable[[], object] | None = None) -> Job:
        """Run a job under a hard timeout (calling `every` about twice a second while it runs);
        afterwards no process of it is left in any host."""
        out, err = self.workdir / "stdout", self.workdir / "stderr"
        start = time.monotonic()
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(list(cmd), stdout=o, stderr=e, start_new_session=True, text=True)
        pidfile = self.workdir / f"job-{proc.pid}.pid"  # for cleanup_stale, should this harness be killed
        pidfile.write_text(str(proc.pid))
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    raise subprocess.TimeoutExpired(list(cmd), timeout, out.read_text(), err.read_text())
                if every:
                    every()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for h in self.hosts:
                _kill_all(h.name)
            pidfile.unlink()
        return Job(proc.returncode, out.read_text(), err.read_text(), time.monotonic() - start)

    def scrape(self, host: str, port: int = 9400) -> str | None:
        """The Prometheus text of the rank on `host`, fetched over that host's own loopback (so
        the scrape is not on the link being counted); None if nothing answers."""
        try:
            s = _socket_in(host)
            with s:
                s.settimeout(2)
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                data = b"".join(iter(lambda: s.recv(65536), b""))
        except OSError:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        return body.decode() if head.split(b" ")[1:2] == [b"200"] else None


class DelayLine:
    """A fixed delay on one host's link, without netem: the root namespace routes the host's
    packets, both ways, through a TUN device whose reader holds each packet `delay_s` and writes
    it back; the kernel then forwards it as if it had arrived on the TUN device, where a policy
    rule by incoming interface sends it on to its destination instead of round again."""

    def __init__(self, host: Host, index: int, delay_s: float) -> None:
        self.host, self.name, self.delay_s = host, f"{host.name}-d", delay_s
        self.inbound, self.outbound = RULES + 2 * index, RULES + 2 * index + 1  # rule pref = table id
        self._stop = threading.Event()
        self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)  # the device lives while this fd does
        try:
            fcntl.ioctl(self._fd, _TUNSETIFF, struct.pack("16sH", self.name.encode(), _IFF_TUN | _IFF_NO_PI))
            sh("ip", "link", "set", self.name, "addrgenmode", "none")
            sh("ip", "link", "set", self.name, "up")
            conf = Path(f"/proc/sys/net/ipv4/conf/{self.name}")
            (conf / "rp_filter").write_text("0\n")  # packets of any source come out of the line,
            (conf / "accept_local").write_text("1\n")  # the router's own (mpiexec's) included
            sh("ip", "route", "add", "default", "dev", self.name, "table", str(self.outbound))
            sh("ip", "rule", "add", "pref", str(self.outbound), "iif", host.name, "lookup", str(self.outbound))
            sh("ip", "rule", "add", "pref", str(self.inbound), "iif", self.name, "lookup", str(self.inbound))
            self.routes()
        except Exception:
            self.close()
            raise
        self._thread = threading.Thread(target=self._relay, name=self.name, daemon=True)
        self._thread.start()

    def routes(self) -> None:
        """Towards the host: into the line; out of the line: the host's link (which takes its
        routes with it when it goes down)."""
        sh("ip", "route", "replace", f"{self.host.addr}/32", "dev", self.name)
        sh("ip", "route", "replace", f"{self.host.addr}/32", "dev", self.host.name, "table", str(self.inbound))

    def _relay(self) -> None:
        held: deque[tuple[float, bytes]] = deque()  # one fixed delay: due times stay in arrival order
        while not self._stop.is_set():
            wait = held[0][0] - time.monotonic() if held else 0.1
            if select.select([self._fd], [], [], max(wait, 0.0))[0]:
                due = time.monotonic() + self.delay_s
                with suppress(BlockingIOError):
                    while True:
                        held.append((due, os.read(self._fd, 65536)))
            now = time.monotonic()
            while held and held[0][0] <= now:
                with suppress(OSError):  # a packet the kernel refuses is lost, as on a wire
                    os.write(self._fd, held.popleft()[1])

    def close(self) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()
        _remove_rules((self.inbound, self.outbound))
        os.close(self._fd)


@contextmanager
def network(clients: int, links: Mapping[str, Link] | None = None) -> Iterator[Network]:
    """A server host and `clients` client hosts, removed again whatever happens inside."""
    with _lock():
        cleanup_stale()
        originals = _catch_signals()
        with tempfile.TemporaryDirectory(prefix="net-", dir=STATE) as tmp:
            net = Network(clients, Path(tmp))
            try:
                net.create()
                for host, link in (links or {}).items():
                    net.shape(host, link)
                yield net
            finally:
                _set_signals(dict.fromkeys(originals, signal.SIG_IGN))  # nothing interrupts the undoing
                failed = net.destroy()
                _set_signals(originals)
                if failed:
                    print("multihost: could not remove: " + "; ".join(failed), file=sys.stderr)


@contextmanager
def _lock() -> Iterator[None]:
    """One harness at a time: they share the names, addresses and ip_forward."""
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another multihost harness holds {STATE / 'lock'}") from None
        yield


def leftovers() -> list[str]:
    """Namespaces and interfaces of ours that still exist (empty after a clean exit)."""
    names = sh("ip", "netns", "list").stdout.split()
    links = sh("ip", "-o", "link", "show").stdout.splitlines()
    return (
        [n for n in names if n.startswith(PREFIX)]
        + [line.split(":")[1].strip().split("@")[0] for line in links if line.split(":")[1].strip().startswith(PREFIX)]
        + [f"rule {pref}" for pref in _rules()]
    )


def cleanup_stale() -> list[str]:
    """Remove what a harness killed with -9 left: its mpirun, our namespaces and links, its
    work directory, the ip_forward change. (Callers hold the lock: no live harness owns them.)"""
    for pidfile in STATE.glob("net-*/job-*.pid"):
        pid = int(pidfile.read_text())
        try:  # the job's own process group (start_new_session): mpiexec and its local children
            if str(pidfile.parent) in Path(f"/proc/{pid}/cmdline").read_text():  # not a reused pid
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    for workdir in STATE.glob("net-*"):
        shutil.rmtree(workdir, ignore_errors=True)
    stale = leftovers()
    _remove_rules(_rules())
    for name in stale:
        if name in sh("ip", "netns", "list").stdout.split():
            _remove_namespace(name)
        elif not name.startswith("rule "):
            sh("ip", "link", "del", name, check=False)
    _forward_restore()
    return stale


# ---------------------------------------------------------------- helpers


def _ip(ns: str | None, *args: str) -> None:
    sh("ip", *(["-n", ns] if ns else []), *args)


def _tc(ns: str | None, *args: str, check: bool = True) -> None:
    sh(*(["ip", "netns", "exec", ns] if ns else []), "tc", *args, check=check)


def _rules() -> list[int]:
    """Preferences of our policy rules (delay lines) in the root namespace."""
    prefs = [int(line.split(":")[0]) for line in sh("ip", "rule", "list").stdout.splitlines()]
    return [p for p in prefs if RULES <= p < RULES + 1000]


def _remove_rules(prefs: Sequence[int]) -> None:
    for pref in prefs:
        sh("ip", "rule", "del", "pref", str(pref), check=False)
        sh("ip", "route", "flush", "table", str(pref), check=False)


def _drop_program(loss_pct: float) -> str:
    """Classic BPF for cls_bpf direct-action: TC_ACT_SHOT (2) when a random u32 falls below
    loss_pct % of 2^32, else TC_ACT_OK (0). (gact/netem are not built into this kernel.)"""
    threshold = int(loss_pct / 100 * 2**32)
    ld_random = "32 0 0 4294963256"  # BPF_LD|BPF_W|BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM
    return f"4,{ld_random},53 1 0 {threshold},6 0 0 2,6 0 0 0"  # jge threshold: keep; else drop


def _forward_on() -> None:
    """net.ipv4.ip_forward=1, remembering the old value on disk (restored even after a kill -9)."""
    saved = STATE / "ip_forward"
    if not saved.exists():
        saved.write_text(Path("/proc/sys/net/ipv4/ip_forward").read_text())
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def _forward_restore() -> None:
    saved = STATE / "ip_forward"
    if saved.exists():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(saved.read_text())
        saved.unlink()


def _kill_all(ns: str) -> None:
    """SIGKILL every process in the namespace (ranks orphaned by a killed proxy included)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _remove_namespace(ns: str) -> None:
    """A namespace outlives `ip netns del` while processes are in it: kill them first."""
    _kill_all(ns)
    sh("ip", "netns", "del", ns)


def _catch_signals() -> dict[int, object]:
    """SIGTERM / SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt already), so the
    undoing runs; returns the handlers to put back. Only the main thread may set handlers."""
    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    originals = {s: signal.getsignal(s) for s in sigs}
    _set_signals({signal.SIGTERM: _exit_on_signal, signal.SIGHUP: _exit_on_signal})
    return originals


def _set_signals(handlers: Mapping[int, object]) -> None:
    if threading.current_thread() is threading.main_thread():
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _socket_in(ns: str) -> socket.socket:
    """A TCP socket created inside namespace `ns`: setns moves only this thread, and back."""
    with open(f"/run/netns/{ns}") as target, open("/proc/thread-self/ns/net") as home:
        if _libc.setns(target.fileno(), _CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if _libc.setns(home.fileno(), _CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")


# ---------------------------------------------------------------- measurements


def wire_vs_counted(net: Network, args: Sequence[str], timeout: float) -> tuple[Job, dict[str, dict]]:
    """Run a job (`args` after mpirun; it must set metrics.enabled=true and metrics.linger_s
    of a few seconds) and, per host, what crossed its link against what its rank counted:
    the eth0 counters before and after, and the byte counters of its /metrics (scraped over
    the host's loopback, the last scrape falling in the linger window after the last send)."""
    before = {h.name: net.counters(h.name) for h in net.hosts}
    scraped: dict[str, str] = {}

    def scrape_all() -> None:
        for h in net.hosts:
            text = net.scrape(h.name)
            if text is not None:
                scraped[h.name] = text

    job = net.run(net.mpirun(args), timeout, every=scrape_all)
    hosts = {}
    for h in net.hosts:
        after = net.counters(h.name)
        wire = {k: after[k] - before[h.name][k] for k in COUNTERS}
        hosts[h.name] = {"wire": wire, **counted_bytes(scraped.get(h.name, ""))}
    return job, hosts


def counted_bytes(metrics_text: str) -> dict[str, dict[str, int]]:
    """{"sent": {kind: bytes}, "received": {kind: bytes}} from one rank's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, int]] = {"sent": {}, "received": {}}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            for way in out:
                if sample.name == f"splitlora_{way}_bytes_total":
                    kind = sample.labels["kind"]
                    out[way][kind] = out[way].get(kind, 0) + int(sample.value)
    return out


def overhead(host: dict) -> dict[str, float]:
    """Wire bytes / counted bytes - 1, per direction and both together."""
    sent, received = sum(host["sent"].values()), sum(host["received"].values())
    tx, rx = host["wire"]["tx_bytes"], host["wire"]["rx_bytes"]
    return {"tx": tx / sent - 1, "rx": rx / received - 1, "total": (tx + rx) / (sent + received) - 1}


def pingpong(sizes: Sequence[int], seconds: float = 0.3) -> None:
    """Rank program (under mpirun): ranks 0 and 1 bounce a message of each size for about
    `seconds`, three times; rank 0 prints one JSON line per size with the median round trip."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    peer = 1 - comm.rank

    def bounce(buf: np.ndarray, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            if comm.rank == 0:
                comm.Send(buf, peer)
                comm.Recv(buf, peer)
            elif comm.rank == 1:
                comm.Recv(buf, peer)
                comm.Send(buf, peer)
        return (time.perf_counter() - start) / n

    for size in sizes:
        buf = np.zeros(size, dtype=np.uint8)
        bounce(buf, 2)  # opens the connection, warms the buffers
        reps = comm.bcast(max(5, min(1000, int(seconds / bounce(buf, 3)))))
        trials = sorted(bounce(buf, reps) for _ in range(3))
        if comm.rank == 0:
            print(json.dumps({"size": size, "rtt_s": trials[1], "reps": reps}), flush=True)


def splitlora(*sets: str) -> list[str]:
    """The training command a job runs on every host: `python -m splitlora_mpi --set ...`."""
    return [sys.executable, "-m", "splitlora_mpi", *[a for s in sets for a in ("--set", s)]]


# a few steps of the default tiny model, with evaluation, FedAvg rounds and the metrics endpoint
WIRE_SETS = ("train.steps=6", "train.log_every=1", "train.aggregate_every=3", "train.eval_every=3",
             "metrics.enabled=true", "metrics.linger_s=3")  # fmt: skip


def wire(args: argparse.Namespace) -> None:
    """Framing overhead on the wire: the bytes on each client's link against its rank's
    counters, for a short training job and for a job that only starts MPI (the fixed cost)."""
    with tempfile.TemporaryDirectory() as tmp, network(2) as net:
        job, hosts = wire_vs_counted(net, splitlora(f"run.out_dir={tmp}/run", *WIRE_SETS), timeout=300)
        if job.returncode:
            sys.exit(f"job failed ({job.returncode}):\n{job.stderr[-3000:]}")
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
        before = {h: net.counters(h) for h in net.client_hosts}
        null = net.run(net.mpirun([sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"]), 60)
        fixed = {h: {k: net.counters(h)[k] - before[h][k] for k in COUNTERS} for h in net.client_hosts}
    for h in net.client_hosts:
        hosts[h]["overhead"] = overhead(hosts[h])
        print(h, {k: f"{v:+.2%}" for k, v in hosts[h]["overhead"].items()})
    write_json(args.out_dir / "multihost_wire.json", {
        "benchmark": "multihost_wire", "machine": machine(), "job": splitlora("run.out_dir=RUN", *WIRE_SETS),
        "summary_bytes": summary["bytes"], "hosts": hosts, "mpi_init_only": {"returncode": null.returncode,
                                                                            "wire": fixed},
    })  # fmt: skip


NETMODS: dict[str, dict[str, str]] = {
    "defaults (ch4:ucx)": {},
    "ucx, UCX_TLS=tcp": {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp"},
    "ofi (provider chosen by libfabric)": {"MPIR_CVAR_CH4_NETMOD": "ofi"},
    "ofi, FI_PROVIDER=sockets": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "sockets"},
    "ofi, FI_PROVIDER=tcp": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
    "TRANSPORT_ENV (ofi, tcp, NOLOCAL=1, FI_TCP_IFACE=eth0)": TRANSPORT_ENV,
}
THRESHOLDS = (None, 16384, 65536, 262144, 1048576)  # MPIR_CVAR_CH4_OFI_EAGER_THRESHOLD; None = default
SIZES = (64, 16384, 131072, 262144, 1048576, 4194304)  # 131072: an activation message of WIRE_SETS' job


def transport(args: argparse.Namespace) -> None:
    """Which netmod settings put the traffic on the links, and the eager/rendezvous threshold
    against round-trip time (ping-pong between the server host and one client host)."""
    pong = [sys.executable, str(Path(__file__).resolve()), "pingpong"]
    netmods, rtt = {}, {}
    with network(1) as net:
        client = net.client_hosts[0]
        for name, env in NETMODS.items():
            before = net.counters(client)
            job = net.run(net.mpirun([*pong, "--sizes", "4194304", "--seconds", "0.2"], env=env), 120)
            after = net.counters(client)
            reps = [json.loads(line)["reps"] for line in job.stdout.splitlines() if line.startswith("{")]
            payload = 2 * 4194304 * (2 + 3 + 3 * reps[0]) if reps else 0
            wire_bytes = after["tx_bytes"] + after["rx_bytes"] - before["tx_bytes"] - before["rx_bytes"]
            ratio = wire_bytes / payload if payload else None
            netmods[name] = {"env": env, "returncode": job.returncode, "payload_bytes": payload,
                             "wire_bytes": wire_bytes, "wire_per_payload": ratio}  # fmt: skip
            print(name, netmods[name], flush=True)
        for trial in range(3):  # interleaved, so a burst of load elsewhere hits every setting alike
            for threshold in THRESHOLDS:
                extra = {} if threshold is None else {"MPIR_CVAR_CH4_OFI_EAGER_THRESHOLD": str(threshold)}
                cmd = net.mpirun([*pong, "--sizes", ",".join(map(str, SIZES))], env={**TRANSPORT_ENV, **extra})
                job = net.run(cmd, 120)
                for line in job.stdout.splitlines():
                    if line.startswith("{"):
                        r = json.loads(line)
                        rtt.setdefault(str(threshold or "default"), {}).setdefault(r["size"], []).append(r["rtt_s"])
                print(f"trial {trial} threshold {threshold}: exit {job.returncode}", flush=True)
    medians = {t: {size: sorted(v)[len(v) // 2] for size, v in by.items()} for t, by in rtt.items()}
    write_json(args.out_dir / "multihost_transport.json", {
        "benchmark": "multihost_transport", "machine": machine(), "netmods": netmods,
        "eager_threshold_rtt_s": {"median_of_3": medians, "trials": rtt},
    })  # fmt: skip


MODES = ("splitlora", "fedlora", "sl")


def profile(text: str) -> Link:
    """A link profile as written on the command line: RATE (Mbit/s) or RATE/DELAY (ms, each way)."""
    rate, _, delay = text.partition("/")
    return Link(rate_mbit=float(rate), delay_ms=float(delay or 0))


def profile_name(link: Link) -> str:
    return f"{link.rate_mbit:g}mbit" + (f"-{link.delay_ms:g}ms" if link.delay_ms else "")


def bench(args: argparse.Namespace) -> None:
    """splitlora, fedlora and sl on real E2E data with every client link shaped by each
    profile: wall time, time to a target validation loss, bytes per client per round
    (counted and on the wire)."""
    profiles = [profile(p) for p in args.profiles.split(",")]
    keep = args.out_dir / "multihost_runs"  # one directory per profile, replaced when run again
    if not args.reuse:
        with tempfile.TemporaryDirectory() as tmp, network(args.clients) as net:
            from paper_convergence import fast_bpe_tokenizer, test_subset

            tok, val = fast_bpe_tokenizer(Path(tmp)), test_subset(Path(tmp), args.test_every)
            for link in profiles:
                for host in net.client_hosts:
                    net.shape(host, link)
                for mode in MODES:
                    _bench_run(net, args, mode, link, tok, val, Path(tmp) / f"{mode}-{profile_name(link)}", keep)
    _bench_report(args, profiles, keep)


def _bench_run(net: Network, args: argparse.Namespace, mode: str, link: Link, tok: Path, val: Path, out: Path,
               keep: Path) -> None:  # fmt: skip
    # paper_convergence's GPT-2 without dropout: every mode follows the same losses at every link
    from paper_convergence import MODEL_NO_DROPOUT, SHARED

    n = args.clients
    steps, per_eval = (n * args.steps, n * args.eval_every) if mode == "sl" else (args.steps, args.eval_every)
    cmd = splitlora(
        f"run.mode={mode}", f"run.out_dir={out}", f"model.config={MODEL_NO_DROPOUT}", f"model.tokenizer={tok}",
        f"data.train_path={SHARED / 'e2e' / 'valid.txt'}", f"data.val_path={val}", f"data.max_seq_len={args.seq_len}",
        f"train.steps={steps}", f"train.batch_size={args.batch_size}", f"train.warmup_steps={steps // 12}",
        f"train.aggregate_every={args.aggregate_every}", f"train.eval_every={per_eval}", "train.log_every=1",
    )  # fmt: skip
    before = {h: net.counters(h) for h in net.client_hosts}
    load_before = os.getloadavg()[0]
    where = f"{mode} at {profile_name(link)}"
    print(f"{where}: running", flush=True)
    job = net.run(net.mpirun(cmd), timeout=1800)
    if job.returncode:
        sys.exit(f"{where} failed ({job.returncode}):\n{job.stderr[-3000:]}")
    wire_bytes = {h: sum(net.counters(h)[k] - before[h][k] for k in ("tx_bytes", "rx_bytes")) for h in before}
    dest = keep / profile_name(link) / mode
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(out / name, dest / name)
    info = {
        "job_wall_s": job.wall_s,
        "client_link_bytes": wire_bytes,
        "command": " ".join(net.mpirun(cmd)),
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }  # fmt: skip  (the job's 3 ranks alone: ~2-3)
    (dest / "job.json").write_text(json.dumps(info, indent=2) + "\n")
    s = json.loads((out / "summary.json").read_text())
    print(f"{where}: val {s['final_val_loss']:.4f}, {s['wall_s']:.1f} s training, "
          f"{job.wall_s:.1f} s job", flush=True)  # fmt: skip
    shutil.rmtree(out)


def _bench_report(args: argparse.Namespace, profiles: list[Link], keep: Path) -> None:
    from splitlora_mpi.plot import paper_name, time_to_target

    def load(link: Link, mode: str, name: str) -> dict:
        return json.loads((keep / profile_name(link) / mode / name).read_text())

    fastest = profiles[0]
    target = max(load(fastest, m, "summary.json")["final_val_loss"] for m in MODES)
    rows = []
    for link in profiles:
        for mode in MODES:
            s, job = load(link, mode, "summary.json"), load(link, mode, "job.json")
            hit = time_to_target(keep / profile_name(link) / mode, target)
            rounds = max(1, s["steps"] // args.aggregate_every)
            rows.append({
                "mode": mode, "link_mbit": link.rate_mbit, "delay_ms": link.delay_ms,
                "final_val_loss": s["final_val_loss"], "tokens": s["tokens"],
                "train_wall_s": s["wall_s"], "job_wall_s": job["job_wall_s"],
                "time_to_target_s": hit["wall_s"] if hit else None, "rounds": rounds,
                "counted_bytes_per_client_per_round": sum(s["bytes"].values()) / args.clients / rounds,
                "link_bytes_per_client_per_round": sum(job["client_link_bytes"].values()) / args.clients / rounds,
                "bytes": s["bytes"], "command": job["command"],
            })  # fmt: skip
    png = args.out_dir / "multihost.png"
    _bench_plot(rows, target, png, paper_name)
    table = _bench_table(rows, target, paper_name)
    (args.out_dir / "multihost.md").write_text(table)
    print(table)
    rule = f"worst final validation loss among the modes at {profile_name(fastest)}"
    write_json(args.out_dir / "multihost.json", {
        "benchmark": "multihost", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
        "target_val_loss": target, "target_rule": rule,
        "runs": rows, "figure": png.name,
    })  # fmt: skip


def _bench_table(rows: list[dict], target: float, name: Callable[[str], str]) -> str:
    lines = [f"| scheme | link Mbit/s | delay ms (each way) | final val loss | training s | to val {target:.4f}: s "
             "| job s (with start-up) | kB / client / round (counted) | kB / client / round (on the link) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        tt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        lines.append(f"| {name(r['mode'])} | {r['link_mbit']:g} | {r['delay_ms']:g} | {r['final_val_loss']:.4f} "
                     f"| {r['train_wall_s']:.1f} | {tt} | {r['job_wall_s']:.1f} "
                     f"| {r['counted_bytes_per_client_per_round'] / 1e3:.1f} "
                     f"| {r['link_bytes_per_client_per_round'] / 1e3:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _bench_plot(rows: list[dict], target: float, png: Path, name: Callable[[str], str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, mode in enumerate(MODES):
        for j, delay in enumerate(sorted({r["delay_ms"] for r in rows})):
            same = [r for r in rows if (r["mode"], r["delay_ms"]) == (mode, delay) and r["time_to_target_s"]]
            pts = sorted((r["link_mbit"], r["time_to_target_s"]) for r in same)
            label = name(mode) + (f", +{delay:g} ms each way" if delay else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^"[j % 3], ls=("-", "--", ":")[j % 3],
                    color=f"C{i}", label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("client link rate, Mbit/s (tc tbf, each direction)")
    ax.set_ylabel(f"time to validation loss {target:.4f}, s")
    ax.set_title("Time to target over shaped client links (2 clients, TCP)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "load_avg_1m_at_start": os.getloadavg()[0]}  # fmt: skip


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cleanup", help="remove namespaces/links left by a killed harness")
    sub.add_parser("wire", help="bytes on each client's link vs its rank's byte counters")
    sub.add_parser("transport", help="netmod settings and eager threshold over TCP")
    b = sub.add_parser("bench", help="splitlora / fedlora / sl per link rate: time to target, bytes")
    b.add_argument("--clients", type=int, default=2)
    b.add_argument(
        "--profiles",
        default="200,50,10,2,50/25,10/25",
        help="client links, fastest first: RATE in Mbit/s, or RATE/DELAY with DELAY in ms each way",
    )
    b.add_argument("--steps", type=int, default=32, help="splitlora / fedlora steps (sl: clients x)")
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--aggregate-every", type=int, default=8)
    b.add_argument("--eval-every", type=int, default=8)
    b.add_argument("--test-every", type=int, default=100, help="evaluate on every k-th line of test.txt")
    b.add_argument("--reuse", action="store_true", help="no training: re-analyse the kept runs")
    pp = sub.add_parser("pingpong", help="rank program of `transport` (run under mpirun)")
    pp.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], required=True)
    pp.add_argument("--seconds", type=float, default=0.3, help="per size and trial")
    args = p.parse_args()
    if args.cmd == "pingpong":
        return pingpong(args.sizes, args.seconds)
    if args.cmd == "cleanup":
        with _lock():
            return print("removed:", cleanup_stale() or "nothing")
    if reason := unavailable():
        sys.exit(f"multihost: {reason}")
    {"wire": wire, "transport": transport, "bench": bench}[args.cmd](args)


if __name__ == "__main__":
    main()
