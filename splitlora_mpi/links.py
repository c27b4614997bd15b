"""An encrypted overlay network for a job's hosts: `python -m splitlora_mpi.links init|up|down|check`.

Why: MPI has no TLS, and MPICH connects on dynamic ports, so no per-port tunnel can carry it; a
WireGuard network under MPI encrypts and authenticates every packet between the hosts, whatever
the port. `init` writes, for every host, a key pair and a wg-quick config (a full mesh: clients
average their adapters among themselves), the job secret (`comm.secret_file`), the hostfile of
overlay addresses and the MPI settings that keep MPI's data on the overlay interface. `up` and
`down` run wg-quick on one host (kernel WireGuard where the module exists, else wireguard-go),
`check` says for each peer whether its handshake is fresh. The protocol and its keys are
wireguard-tools' (`wg`, `wg-quick`); this module only writes their files and reads their state.
Exit codes: 0 done; 1 a peer without a fresh handshake (`check`) or a tool that failed; 2 bad
input (one `error:` line).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .fsutil import atomic_dir

INTERFACE = "splitlora"  # the same name on every host: FI_TCP_IFACE names it for all ranks
CONFIG = f"{INTERFACE}.conf"  # wg-quick names the interface after its config file
PORT = 51820
NET = "10.77.0.0/24"
KEEPALIVE_S = 25  # clients behind NAT keep their mapping open and the server learns their address
FRESH_S = 180  # WireGuard rekeys every 120 s while traffic flows; after 180 s a session is dead
# MPICH (PyPI wheel, ch4): the libfabric TCP provider, bound to the overlay interface, for every
# rank (also ranks on one host: NOLOCAL would keep them off shared memory; not needed here)
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": INTERFACE}
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Member:
    """One host of the overlay (what every other host knows of it: nothing secret)."""

    name: str  # host-0 (the server), host-1, ...
    host: str  # as in the hosts file: where its WireGuard listens
    address: str  # on the overlay
    public_key: str

    @property
    def endpoint(self) -> str:
        try:
            v6 = ipaddress.ip_address(self.host).version == 6
        except ValueError:
            v6 = False
        return f"[{self.host}]:{PORT}" if v6 else f"{self.host}:{PORT}"


def read_hosts(path: Path) -> list[str]:
    """Host names or addresses, one per line, the server first ('#' starts a comment)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"hosts file {path}: cannot read it: {e.strerror or e}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        host = line.split("#", 1)[0].strip()
        if not host:
            continue
        if not (HOSTNAME.match(host) or _is_address(host)):
            raise ConfigError(f"hosts file {path}:{number}: {host!r} is no host name or IP address")
        if host in hosts:
            raise ConfigError(f"hosts file {path}:{number}: {host} is listed twice; expected each host once")
        hosts.append(host)
    if len(hosts) < 2:
        raise ConfigError(f"hosts file {path}: {len(hosts)} host(s); expected the server and at least one client")
    return hosts


def overlay_addresses(net: str, count: int) -> list[str]:
    """The first `count` host addresses of a private range (the server gets the first)."""
    try:
        network = ipaddress.ip_network(net)
    except ValueError as e:
        raise ConfigError(f"--net {net}: {e}") from None
    if not network.is_private:
        raise ConfigError(f"--net {net}: not a private range; expected e.g. 10.77.0.0/24 (RFC 1918 / ULA)")
    addresses = [str(a) for _, a in zip(range(count), network.hosts())]
    if len(addresses) < count:
        raise ConfigError(f"--net {net}: room for {len(addresses)} hosts; the hosts file has {count}")
    return addresses


def init(hosts_file: Path, out: Path, net: str = NET) -> list[Member]:
    """Keys, configs, hostfile, MPI settings and job secret for every host, under `out/host-I/`."""
    hosts = read_hosts(hosts_file)
    addresses = overlay_addresses(net, len(hosts))
    if out.exists():
        raise ConfigError(f"--out {out}: exists; expected a new directory (its keys would be replaced)")
    wg = _tool("wg")
    private = [_run([wg, "genkey"]).strip() for _ in hosts]
    members = [
        Member(f"host-{i}", host, addr, _run([wg, "pubkey"], key).strip())
        for i, (host, addr, key) in enumerate(zip(hosts, addresses, private))
    ]
    prefix = ipaddress.ip_network(net).prefixlen
    secret = base64.b64encode(os.urandom(32)).decode() + "\n"
    hostfile = "".join(f"{m.address}\n" for m in members)
    mpi_env = "".join(f"{k}={v}\n" for k, v in MPI_ENV.items())
    old_umask = os.umask(0o077)  # keys and secret are never readable by others, not even for a moment
    try:
        with atomic_dir(out) as tmp:
            for i, me in enumerate(members):
                d = tmp / me.name
                d.mkdir()
                (d / CONFIG).write_text(_wg_quick_config(i, members, private[i], prefix))
                (d / "job.secret").write_text(secret)
                for name, text in (("hostfile", hostfile), ("mpi.env", mpi_env), ("links.json", _card(me, members))):
                    (d / name).write_text(text)
                    (d / name).chmod(0o644)
                d.chmod(0o755)
            tmp.chmod(0o755)
    finally:
        os.umask(old_umask)
    return members


def _wg_quick_config(index: int, members: list[Member], private_key: str, prefix: int) -> str:
    me = members[index]
    role = "the server" if index == 0 else "a client"
    lines = [f"# splitlora_mpi overlay: {me.name} ({role}, {me.host}); written by `links init`, keep it 0600",
             "[Interface]", f"Address = {me.address}/{prefix}", f"ListenPort = {PORT}",
             f"PrivateKey = {private_key}"]  # fmt: skip
    for peer in members:
        if peer is me:
            continue
        lines += ["", "[Peer]", f"# {peer.name} ({peer.host})", f"PublicKey = {peer.public_key}",
                  f"Endpoint = {peer.endpoint}", f"AllowedIPs = {peer.address}/32"]  # fmt: skip
        if index != 0:
            lines.append(f"PersistentKeepalive = {KEEPALIVE_S}")
    return "\n".join(lines) + "\n"


def _card(me: Member, members: list[Member]) -> str:
    """What `check` needs to name the peers (public facts only)."""
    return json.dumps({"interface": INTERFACE, "me": asdict(me),
                       "peers": [asdict(m) for m in members if m is not me]}, indent=1) + "\n"  # fmt: skip


def host_dir(path: Path) -> Path:
    """A host's directory (the one holding its wg-quick config), checked before wg-quick sees it."""
    config = path / CONFIG
    if not config.is_file():
        raise ConfigError(f"{path}: no {CONFIG}; expected one host's directory written by `links init` (host-I/)")
    mode = config.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{config} has mode {mode:04o}: its private key is readable by others; "
                          f"expected 0600 (chmod 600 {config})")  # fmt: skip
    return path.resolve()


def up(path: Path) -> str:
    """Bring this host's interface up; returns which WireGuard runs it."""
    config = host_dir(path) / CONFIG
    env = dict(os.environ)
    go = shutil.which("wireguard-go")
    if go and "WG_QUICK_USERSPACE_IMPLEMENTATION" not in env:
        env["WG_QUICK_USERSPACE_IMPLEMENTATION"] = go  # used only where the kernel has no module
    _run([_tool("wg-quick"), "up", str(config)], env=env)
    userspace = Path(f"/var/run/wireguard/{INTERFACE}.sock").exists()
    return "userspace wireguard-go" if userspace else "kernel WireGuard"


def down(path: Path) -> None:
    _run([_tool("wg-quick"), "down", str(host_dir(path) / CONFIG)])


@dataclass(frozen=True)
class PeerState:
    peer: Member
    handshake_age_s: float | None  # None: no handshake yet

    @property
    def fresh(self) -> bool:
        return self.handshake_age_s is not None and self.handshake_age_s < FRESH_S


def check(path: Path, wait_s: float = 5.0) -> list[PeerState]:
    """Each peer's handshake; a peer without a fresh one is sent a datagram over the overlay
    (which makes WireGuard handshake) and given `wait_s` to answer."""
    card = json.loads((host_dir(path) / "links.json").read_text())
    peers = [Member(**p) for p in card["peers"]]
    wg = _tool("wg")
    deadline = time.monotonic() + wait_s
    poked = False
    while True:
        seen = {}  # public key -> seconds since epoch of the latest handshake (0: none)
        for line in _run([wg, "show", INTERFACE, "latest-handshakes"]).splitlines():
            key, _, when = line.partition("\t")
            seen[key] = int(when or 0)
        now = time.time()
        states = [PeerState(p, now - seen[p.public_key] if seen.get(p.public_key) else None) for p in peers]
        if all(s.fresh for s in states) or time.monotonic() >= deadline:
            return states
        if not poked:
            for s in states:
                if not s.fresh:
                    with socket.socket(socket.AF_INET6 if ":" in s.peer.address else socket.AF_INET,
                                       socket.SOCK_DGRAM) as udp:  # fmt: skip
                        udp.sendto(b"splitlora links check", (s.peer.address, 9))  # discard port
            poked = True
        time.sleep(0.2)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"`{name}` not found; expected wireguard-tools (apt-get install wireguard-tools; "
                          "wireguard-go too where the kernel has no WireGuard module)")  # fmt: skip
    return path


def _run(cmd: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """A wireguard-tools command; its failure ends the command (exit 1) with its own message."""
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env)
    if r.returncode:
        raise ToolFailed(f"{Path(cmd[0]).name} {' '.join(cmd[1:2])}: {r.stderr.strip() or f'exit code {r.returncode}'}")
    return r.stdout


class ToolFailed(RuntimeError):
    """wg or wg-quick failed (not the user's input): exit code 1."""


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitlora_mpi.links", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="keys, configs, hostfile and job secret for every host")
    i.add_argument("hosts_file", type=Path, help="one host name or address per line, the server first")
    i.add_argument("--out", type=Path, required=True, help="a new directory; host-I/ in it goes to host I")
    i.add_argument("--net", default=NET, help=f"the overlay's private range (default {NET})")
    for name, text in (("up", "bring this host's interface up"), ("down", "take it down"),
                       ("check", "is every peer's handshake fresh?")):  # fmt: skip
        c = sub.add_parser(name, help=text)
        c.add_argument("dir", type=Path, help="this host's directory (host-I/ of `links init --out`)")
        if name == "check":
            c.add_argument("--wait", type=float, default=5.0, help="seconds to wait for handshakes (default 5)")
    args = p.parse_args(argv)
    try:
        if args.command == "init":
            members = init(args.hosts_file, args.out, args.net)
            for m in members:
                print(f"{m.name}  {m.address:<15}  {m.host}{'  (server)' if m is members[0] else ''}")
            print(f"copy {args.out}/host-I/ to host I (the same path DIR on every host), run `python -m "
                  "splitlora_mpi.links up DIR` there; then on the server: set -a; . DIR/mpi.env; set +a; mpirun -f "
                  f"DIR/hostfile -localhost {members[0].address} -n {len(members)} python -m splitlora_mpi "
                  "--set comm.secret_file=DIR/job.secret")  # fmt: skip
        elif args.command == "up":
            print(f"{INTERFACE}: up ({up(args.dir)})")
        elif args.command == "down":
            down(args.dir)
            print(f"{INTERFACE}: down")
        else:
            states = check(args.dir, args.wait)
            for s in states:
                age = "no handshake" if s.handshake_age_s is None else f"handshake {s.handshake_age_s:.0f} s ago"
                verdict = "fresh" if s.fresh else f"NOT fresh (is `links up` done there, UDP {PORT} open?)"
                print(f"{s.peer.name}  {s.peer.address:<15}  {s.peer.endpoint}  {age}: {verdict}")
            return 0 if all(s.fresh for s in states) else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ToolFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
