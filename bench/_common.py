"""Pieces the benchmarks share: child-process hygiene and the raw TCP yardstick's receive."""

from __future__ import annotations

import os
import socket
import threading
import time


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
