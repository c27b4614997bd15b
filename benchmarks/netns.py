"""Hosts on one machine for multi-host MPI: one network namespace per host, real TCP between
them; the harness behind benchmarks/multihost.py and tests/test_multihost.py.

Public API: `unavailable()` (why namespaces cannot be made here, or None), `network(clients,
links)` (a context manager yielding a `Network` of `Host`s with optional `Link` rate / delay /
loss, whose `run` launches an mpirun job across them as a `Job`), `wire_vs_counted` and
`overhead` (bytes on a link vs the ranks' byte counters), `splitlora(*sets)` / `WIRE_SETS`
(the training command a job runs), `overlay` / `Overlay` (a WireGuard network over the hosts,
made by `python -m splitlora_mpi.links`), `leftovers()` / `cleanup_stale()`, `sh`, `socket_in`.

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

import ctypes
import fcntl
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

from common import MPIRUN

ROOT = Path(__file__).resolve().parents[1]
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
    _aliases: dict[str, str] = field(default_factory=dict)

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
        self._write_launcher()
        self._mount_namespaces()

    def alias(self, address: str, host: str) -> None:
        """Another address of a host (e.g. on an overlay) that hostfiles and mpiexec may use."""
        self._aliases[address] = host
        self._write_launcher()

    def _write_launcher(self) -> None:
        names = {h.addr: h.name for h in self.hosts} | self._aliases
        launcher = self.workdir / "launch-in-netns.sh"
        launcher.write_text(LAUNCHER.format(cases="\n".join(f"  {a}) host={n} ;;" for a, n in names.items())))
        launcher.chmod(0o755)

    def _mount_namespaces(self) -> None:
        """Each host its own mount namespace, with a private /run/wireguard: userspace WireGuard
        (wireguard-go) and `wg` find an interface by its socket there, and every host's interface
        has the same name. `on` runs a command in a host's network and mount namespaces."""
        mnt = self.workdir / "mnt"  # a private mount point: it holds the namespaces' bind mounts
        mnt.mkdir()
        sh("mount", "--bind", str(mnt), str(mnt))
        self._undo.append(lambda: sh("umount", "--lazy", str(mnt), check=False))
        sh("mount", "--make-private", str(mnt))
        Path("/run/wireguard").mkdir(exist_ok=True)
        for h in self.hosts:
            (mnt / h.name).touch()
            sh("unshare", f"--mount={mnt / h.name}", "--propagation", "private",
               "mount", "-t", "tmpfs", "tmpfs", "/run/wireguard")  # fmt: skip
            self._undo.append(lambda h=h: sh("umount", str(mnt / h.name), check=False))

    def on(self, host: str, *cmd: str) -> list[str]:
        """`cmd` run in the host (its network and mount namespaces), as from a shell there."""
        return ["nsenter", f"--net=/run/netns/{host}", f"--mount={self.workdir / 'mnt' / host}", *cmd]

    @contextmanager
    def capture(self, directory: Path) -> Iterator[dict[str, Path]]:
        """Every packet on every host's link (at its root end) while the block runs, one pcap
        file per host (tcpdump; read them after the block)."""
        files = {h.name: directory / f"{h.name}.pcap" for h in self.hosts}
        procs = []
        try:
            for host, file in files.items():
                log = file.with_suffix(".log").open("w+")
                procs.append((subprocess.Popen(["tcpdump", "-i", host, "-n", "-s", "0", "-U", "-Z", "root", "-w",
                                                str(file)], stdout=log, stderr=log), log))  # fmt: skip
            deadline = time.monotonic() + 10
            for proc, log in procs:  # capturing only once it says so
                while "listening on" not in Path(log.name).read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"tcpdump did not start: {Path(log.name).read_text().strip()}")
                    time.sleep(0.05)
            yield files
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, log in procs:
                proc.wait(timeout=10)
                log.close()

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
        that went away with it comes back with it, and the neighbour entries that failed while
        it was down are forgotten (else connects fail with "No route to host" for a while)."""
        sh("ip", "link", "set", "dev", host, "up" if up else "down")
        if up:
            self._routes(next(h for h in self.hosts if h.name == host))
            sh("ip", "neigh", "flush", "dev", host)
            sh("ip", "-n", host, "neigh", "flush", "dev", IFACE)

    def counters(self, host: str) -> dict[str, int]:
        """Bytes and packets of the host's eth0 so far, as the host sees them."""
        paths = [f"/sys/class/net/{IFACE}/statistics/{k}" for k in COUNTERS]
        values = sh("ip", "netns", "exec", host, "cat", *paths).stdout.split()
        return dict(zip(COUNTERS, map(int, values)))

    def mpirun(self, args: Sequence[str], env: Mapping[str, str] = TRANSPORT_ENV, hostfile: Path | None = None,
               localhost: str = ROUTER) -> list[str]:  # fmt: skip
        """mpirun for one rank per host, in hostfile order: rank 0 = the server's host. mpiexec
        runs where `localhost` is (default: the root namespace, for `run`; else wrap it in `on`)."""
        cmd = [MPIRUN, "-f", str(hostfile or self.workdir / "hosts"), "-n", str(len(self.hosts)), "-launcher", "ssh",
               "-launcher-exec", str(self.workdir / "launch-in-netns.sh"), "-localhost", localhost]  # fmt: skip
        for key, value in env.items():
            cmd += ["-genv", key, value]
        return cmd + list(args)

    def run(self, cmd: Sequence[str], timeout: float, every: Callable[[], object] | None = None) -> Job:
        """Run a job under a hard timeout (calling `every` about twice a second while it runs);
        afterwards no process of it is left in any host (what ran there before it still runs)."""
        out, err = self.workdir / "stdout", self.workdir / "stderr"
        running = {h.name: _pids(h.name) for h in self.hosts}  # not the job's (e.g. wireguard-go)
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
                _kill_all(h.name, spare=running[h.name])
            pidfile.unlink()
        return Job(proc.returncode, out.read_text(), err.read_text(), time.monotonic() - start)

    def scrape(self, host: str, port: int = 9400) -> str | None:
        """The Prometheus text of the rank on `host`, fetched over that host's own loopback (so
        the scrape is not on the link being counted); None if nothing answers."""
        try:
            s = socket_in(host)
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
    with lock():
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
def lock() -> Iterator[None]:
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
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return (
        [n for n in names if n.startswith(PREFIX)]
        + [f"mount {m}" for m in mounts if m.startswith(f"{STATE}/")]
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
    stale = leftovers()
    for mount in sorted((x[6:] for x in stale if x.startswith("mount ")), reverse=True):  # inner ones first
        sh("umount", "--lazy", mount, check=False)
    for workdir in STATE.glob("net-*"):
        shutil.rmtree(workdir, ignore_errors=True)
    _remove_rules(_rules())
    for name in stale:
        if name in sh("ip", "netns", "list").stdout.split():
            _remove_namespace(name)
        elif not name.startswith(("rule ", "mount ")):
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


def _pids(ns: str) -> set[int]:
    return {int(pid) for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split()}


def _kill_all(ns: str, spare: set[int] = frozenset()) -> None:
    """SIGKILL every process in the namespace (ranks orphaned by a killed proxy included) but `spare`."""
    for pid in _pids(ns) - spare:
        try:
            os.kill(pid, signal.SIGKILL)
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


def socket_in(ns: str) -> socket.socket:
    """A TCP socket created inside namespace `ns`: setns moves only this thread, and back."""
    with open(f"/run/netns/{ns}") as target, open("/proc/thread-self/ns/net") as home:
        if _libc.setns(target.fileno(), _CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if _libc.setns(home.fileno(), _CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")


# ---------------------------------------------------------------- the WireGuard overlay


@dataclass(frozen=True)
class Overlay:
    """The hosts' overlay as `links init` wrote it (nothing is up until `links(host, "up")`)."""

    net: Network
    dirs: dict[str, Path]  # host -> its directory (host-I/)
    addresses: list[str]  # on the overlay, server first
    env: dict[str, str]  # TRANSPORT_ENV with the overlay's MPI settings (mpi.env)

    def links(self, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`python -m splitlora_mpi.links ARGS HOST_DIR`, run in the host."""
        cmd = self.net.on(host, sys.executable, "-m", "splitlora_mpi.links", *args, str(self.dirs[host]))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def mpirun(self, args: Sequence[str]) -> list[str]:
        """mpirun in the server's host over the overlay: its hostfile, its address for the proxies."""
        hostfile = self.dirs[self.net.server] / "hostfile"
        return self.net.on(self.net.server, *self.net.mpirun(args, self.env, hostfile, self.addresses[0]))


def overlay(net: Network, out: Path) -> Overlay:
    """`links init` for the network's hosts (server first) into `out`; the launcher learns each
    host's overlay address."""
    (net.workdir / "hosts.links").write_text("".join(f"{h.addr}\n" for h in net.hosts))
    made = subprocess.run([sys.executable, "-m", "splitlora_mpi.links", "init", str(net.workdir / "hosts.links"),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)  # fmt: skip
    if made.returncode:
        raise RuntimeError(f"links init: {made.stderr.strip()}")
    dirs = {h.name: out / f"host-{i}" for i, h in enumerate(net.hosts)}
    addresses = (dirs[net.server] / "hostfile").read_text().split()
    for h, address in zip(net.hosts, addresses):
        net.alias(address, h.name)
    env = dict(line.split("=", 1) for line in (dirs[net.server] / "mpi.env").read_text().split())
    return Overlay(net, dirs, addresses, {**TRANSPORT_ENV, **env})


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


def splitlora(*sets: str) -> list[str]:
    """The training command a job runs on every host: `python -m splitlora_mpi --set ...`."""
    return [sys.executable, "-m", "splitlora_mpi", *[a for s in sets for a in ("--set", s)]]


# a few steps of the default tiny model, with evaluation, FedAvg rounds and the metrics endpoint
WIRE_SETS = ("train.steps=6", "train.log_every=1", "train.aggregate_every=3", "train.eval_every=3",
             "metrics.enabled=true", "metrics.linger_s=3")  # fmt: skip
