"""Pieces the benchmarks share: child-process hygiene, the raw TCP yardstick's receive, CPU time, quartiles."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc (OSError once it is gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def quartiles(xs: list[float]) -> list[float]:
    """The first and third quartiles of ``xs`` (the spread of paired ratios); min and max under 4."""
    if len(xs) < 4:
        return [min(xs), max(xs)]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def watch_parent(ppid: int) -> None:
    """Exit this child as soon as its parent is gone (no orphans, whatever happens)."""

    def loop() -> None:
        while True:
            if os.getppid() != ppid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True).start()


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` with recv_into (no intermediate buffers)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def enter_netns(name: str) -> None:
    """Move this process into the network namespace ``name`` (``ip netns add``'s); needs root.

    Sockets opened afterwards live there; a multiprocessing child calls this first.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    with open(f"/run/netns/{name}") as fh:
        if libc.setns(fh.fileno(), clone_newnet) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")


def _tests_on_path() -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def _lab(n: int, workdir: str, **shape: Any) -> Any:
    """The tests' multi-host lab (``tests/support/netns.py``) with ``n`` hosts and no loss."""
    _tests_on_path()
    from tests.support.netns import NetLab, missing_requirements

    why = missing_requirements()
    if why is not None:
        raise SystemExit(f"shaped links are not available here: {why}")
    return NetLab(n, Path(workdir), loss=0.0, **shape)


def shaped_pair(rate: str, workdir: str, delay: float = 0.0, cc: str = "") -> Any:
    """Two hosts (network namespaces) whose links are shaped to ``rate`` each way, as a context manager.

    Its relays (``host.address``, to ``host.local``) hold data ``delay`` seconds each
    way; ``cc``: the hosts' TCP congestion control (default: the machine's). Yields the
    lab; ``lab.hosts[i].ns`` and ``.ip`` name the hosts.
    """
    return _lab(2, workdir, delay=delay, rate=rate, cc=cc)


def shaped_hosts(rates: list[str], workdir: str, cc: str = "") -> Any:
    """Hosts (network namespaces) on one switch, host ``i``'s link shaped to ``rates[i]`` both
    ways (what it sends and what it receives), as a context manager yielding the lab.

    No relay delay; ``cc`` as in :func:`shaped_pair`; ``lab.hosts[i].ns`` and ``.ip`` name the hosts.
    """
    return _lab(len(rates), workdir, delay=0.0, rate="", rates=dict(enumerate(rates)), cc=cc)


def add_cc_option(ap: argparse.ArgumentParser) -> None:
    """``--cc NAME``: the lab hosts' TCP congestion control (check it with :func:`cc_error`)."""
    ap.add_argument(
        "--cc",
        default="",
        metavar="NAME",
        help="with --link: every host's TCP congestion control, e.g. cubic or bbr (default: the machine's; "
        "the JSON names the one used)",
    )


def cc_error(cc: str, link: str) -> str | None:
    """Why ``--cc cc`` cannot be used with ``--link link`` (None: it can)."""
    if not cc:
        return None
    if not link:
        return "--cc needs --link"
    _tests_on_path()
    from tests.support.netns import congestion_control_problem

    return congestion_control_problem(cc)


def congestion_control() -> str:
    """The TCP congestion control of this thread's network namespace (a lab host's, inside one)."""
    _tests_on_path()
    from tests.support.netns import congestion_control as cc

    return cc()


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """This thread inside the network namespace ``name`` for the block, then back where it was.

    A lab that closes deletes its namespaces after killing every process inside them;
    a process still inside one of them when its lab closes kills itself.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net") as home:
        enter_netns(name)
        try:
            yield
        finally:
            if libc.setns(home.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                err = ctypes.get_errno()
                raise OSError(err, f"setns back out of {name}: {os.strerror(err)}")
