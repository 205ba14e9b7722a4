"""A lab of K hosts as network namespaces, with degraded links, for multi-host tests.

Shape: one *switch* namespace holds a bridge; every host is a namespace whose
``eth0`` (10.77.0.<i+1>/24) is a veth pair into that bridge. Nothing is created
in the root namespace, so deleting the namespaces removes every link, address,
qdisc and iptables rule, and the processes are ours to kill by pid.

Degradations (this kernel has no ``netem``):

- bandwidth: a ``tbf`` qdisc on every host's ``eth0`` egress; a host given a rate
  of its own (``rates``) is shaped to it both ways, on its switch port too;
- loss: an iptables ``statistic`` rule in every host namespace that drops that
  fraction of the packets arriving on ``eth0`` (so each direction loses about it);
- latency: every node listens on the host's loopback and is reached through a
  delaying TCP relay on ``eth0`` (``python tests/support/netns.py relay``), which holds
  each piece of data for ``delay`` seconds in each direction, pipelined, so it
  adds latency without capping bandwidth.

``NetLab`` is a context manager; its ``close`` kills what it started and deletes
its namespaces, and a new lab first removes namespaces left by a lab whose
process died without closing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "gsplab"
SUBNET = "10.77.0"
NODE_PORT = 7000  # the node, on the host's loopback
RELAY_PORT = 7001  # the delaying relay, on eth0: the address peers dial


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


_CC = Path("/proc/sys/net/ipv4")


def congestion_control_problem(cc: str) -> str | None:
    """Why the lab's hosts cannot use TCP congestion control ``cc``, or None when they can.

    A namespace other than the machine's own may choose only the ones the machine allows.
    """
    available = (_CC / "tcp_available_congestion_control").read_text().split()
    if cc not in available:
        return f"TCP congestion control {cc!r} is not available here (available: {' '.join(available)})"
    allowed = (_CC / "tcp_allowed_congestion_control").read_text().split()
    if cc not in allowed:
        return (
            f"TCP congestion control {cc!r} is not allowed in network namespaces here; as root: "
            f"sysctl -w net.ipv4.tcp_allowed_congestion_control='{' '.join([*allowed, cc])}'"
        )
    return None


def congestion_control() -> str:
    """The TCP congestion control new connections of this thread's network namespace use."""
    return (_CC / "tcp_congestion_control").read_text().strip()


def _sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _namespaces() -> list[str]:
    out = _sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill what still runs inside (it was started by a lab) and delete the namespace."""
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _sh("ip", "netns", "del", ns, check=False)


def remove_stale_labs() -> list[str]:
    """Delete namespaces of labs whose owning process is gone; returns their names."""
    removed = []
    for ns in _namespaces():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


@dataclass
class Host:
    index: int
    ns: str
    ip: str
    veth: str  # the switch-side end of this host's link

    @property
    def address(self) -> str:
        """What peers dial: the relay on this host's eth0."""
        return f"{self.ip}:{RELAY_PORT}"

    @property
    def local(self) -> str:
        """Where the node listens, inside the host."""
        return f"127.0.0.1:{NODE_PORT}"


@dataclass
class Proc:
    name: str
    host: Host
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.name} ({self.host.ns}) ---\n" + "\n".join(text)


def node_argv(host: Host, hosts: Sequence[Host]) -> list[str]:
    """``gossip node`` on ``host`` of a lab: listening on the host's loopback, advertised at its
    relay, node id ``n<index>`` with that rank among ``hosts``, joined through host 0."""
    argv = [sys.executable, "-m", "gossip", "node", "--listen", host.local, "--advertise", host.address]
    argv += ["--node-id", f"n{host.index}", "--rank", str(host.index), "--world-size", str(len(hosts))]
    return argv + (["--peers", hosts[0].address] if host.index else [])


@dataclass
class NetLab:
    hosts_count: int
    workdir: Path
    delay: float = 0.02  # seconds, each direction
    loss: float = 0.01  # fraction of packets dropped on arrival
    rate: str = "100mbit"
    rates: dict[int, str] = field(default_factory=dict)  # host index -> its own rate, both ways
    cc: str = ""  # every host's TCP congestion control; "" leaves the machine's default
    hosts: list[Host] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    _adopted: list[subprocess.Popen[str]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.hosts_count <= 200:
            raise ValueError("hosts_count must be 1..200")
        if self.cc and (why := congestion_control_problem(self.cc)) is not None:
            raise ValueError(why)
        tag = f"{PREFIX}-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.switch = f"{tag}-sw"
        self._tag = tag

    # --- building ------------------------------------------------------------

    def __enter__(self) -> NetLab:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> None:
        remove_stale_labs()
        self._add_ns(self.switch)
        _sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _sh("ip", "link", "set", "br0", "up", ns=self.switch)
        for i in range(self.hosts_count):
            host = Host(i, f"{self._tag}-h{i}", f"{SUBNET}.{i + 1}", f"v{i}")
            self._add_ns(host.ns)
            # Both ends are born inside the namespaces: nothing touches the root one.
            _sh(
                "ip",
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                host.veth,
                "netns",
                self.switch,
                ns=host.ns,
            )
            _sh("ip", "link", "set", host.veth, "master", "br0", ns=self.switch)
            _sh("ip", "link", "set", host.veth, "up", ns=self.switch)
            _sh("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0", ns=host.ns)
            _sh("ip", "link", "set", "eth0", "up", ns=host.ns)
            _sh("ip", "link", "set", "lo", "up", ns=host.ns)
            if self.cc:
                _sh("sh", "-c", f"echo {self.cc} >{_CC}/tcp_congestion_control", ns=host.ns)
            rate = self.rates.get(i, self.rate)
            if rate:
                _sh("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                    "burst", "64kb", "latency", "100ms", ns=host.ns)  # fmt: skip
            if i in self.rates:
                # What the host receives too (its switch port's egress): where rates differ, a
                # fast host's download is otherwise bounded only by the sum of its senders'.
                _sh("tc", "qdisc", "add", "dev", host.veth, "root", "tbf", "rate", rate,
                    "burst", "64kb", "latency", "100ms", ns=self.switch)  # fmt: skip
            if self.loss > 0:
                _sh("iptables", "-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random",
                    "--probability", f"{self.loss}", "-j", "DROP", ns=host.ns)  # fmt: skip
            self.hosts.append(host)
            self.start_relay(host)
        for host in self.hosts:
            self._wait_port(host, host.ip, RELAY_PORT)

    def _add_ns(self, ns: str) -> None:
        _sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)

    def start_relay(self, host: Host) -> Proc:
        argv = [sys.executable, str(Path(__file__).resolve()), "relay", "--listen", host.address,
                "--to", host.local, "--delay", str(self.delay)]  # fmt: skip
        return self.start(host, f"relay{host.index}", argv)

    def _wait_port(self, host: Host, ip: str, port: int, timeout: float = 30.0) -> None:
        probe = f"import socket; socket.create_connection(({ip!r}, {port}), 1).close()"
        deadline = time.monotonic() + timeout
        while _sh(sys.executable, "-c", probe, ns=host.ns, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {ip}:{port} in {host.ns}")
            time.sleep(0.1)

    # --- running ---------------------------------------------------------------

    def start(self, host: Host, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        """Start argv inside the host (``ip netns exec`` execs it: the pid is the program's)."""
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )
        proc = Proc(name, host, popen, log_path, log)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host to completion."""
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def adopt(self, popen: subprocess.Popen[str]) -> None:
        """Kill and reap a process started elsewhere (inside a host) when the lab closes."""
        self._adopted.append(popen)

    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch: its packets go nowhere, silently."""
        _sh("ip", "link", "set", host.veth, "down", ns=self.switch)

    def heal(self, host: Host) -> None:
        _sh("ip", "link", "set", host.veth, "up", ns=self.switch)

    # --- tearing down ----------------------------------------------------------

    def close(self) -> None:
        for a in self._adopted:
            if a.poll() is None:
                a.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.communicate(timeout=30)
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(30)
            p.log.close()
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()


# --- the delaying relay --------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each piece of data leaving ``delay`` s after it arrived."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=4096)

    async def take() -> None:
        while data := await reader.read(1 << 16):
            await line.put((loop.time() + delay, data))
        await line.put((0.0, b""))

    taker = asyncio.create_task(take())
    try:
        while True:
            due, data = await line.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    finally:
        taker.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await taker


async def _relay(listen: str, to: str, delay: float) -> None:
    to_host, _, to_port = to.rpartition(":")

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            w1.close()
            return
        for w in (w1, w2):  # the relay adds its delay, not Nagle's
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [asyncio.create_task(_pipe(r1, w2, delay)), asyncio.create_task(_pipe(r2, w1, delay))]
        try:
            # A reset on either side ends both directions; a clean EOF lets the other finish.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in pipes:
                t.cancel()
            for w in (w1, w2):
                w.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host, int(port), reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="netns.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="a TCP relay that delays both directions")
    r.add_argument("--listen", required=True, metavar="HOST:PORT")
    r.add_argument("--to", required=True, metavar="HOST:PORT")
    r.add_argument("--delay", type=float, default=0.02, help="seconds, each direction")
    sub.add_parser("clean", help="remove namespaces left by labs whose process died")
    args = p.parse_args(argv)
    if args.cmd == "relay":
        asyncio.run(_relay(args.listen, args.to, args.delay))
    else:
        for ns in remove_stale_labs():
            print(f"removed {ns}")


if __name__ == "__main__":
    main()
