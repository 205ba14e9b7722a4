"""Process-level helpers shared by node processes, the launcher and benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc() -> bool:
    """Keep large buffers in the heap instead of mmap-ing and unmapping them per message.

    glibc gives every block over 128 KiB back to the kernel on free, so each
    1 MiB gRPC frame is page-faulted in anew; measured on a 2-core VM this made
    a 1 MiB exchange 3x slower. With a 32 MiB mmap threshold and a lazy trim the
    frames reuse warm memory. A no-op off glibc.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
            and libc.mallopt(_M_TOP_PAD, 64 << 20)
        )
    except (OSError, AttributeError):
        return False
    _done = ok
    if not ok:
        log.debug("mallopt refused the settings; keeping the allocator's defaults")
    return ok


def raise_open_files(cap: int = 1 << 20) -> int:
    """Raise this process's soft limit on open files to its hard limit (at most ``cap``); the
    soft limit now.

    A node keeps a connection to every member it probes and one from every member that
    probes it: two descriptors per member, so a node of a few hundred members passes the
    1024 that many systems set as the soft limit, and then fails to accept or dial.
    Servers raise it as a matter of course (Go's runtime does it at start); an unprivileged
    process may raise it up to the hard limit. A no-op where the platform has no such limit.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    # An infinite hard limit can still stop below ``cap`` (macOS: kern.maxfilesperproc, and
    # OPEN_MAX 10240): try smaller steps before giving up.
    for step in (want, 65536, 10240):
        if soft == resource.RLIM_INFINITY or step <= soft or step > want:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (step, hard))
        except (OSError, ValueError) as exc:
            log.debug("open files: could not raise the soft limit of %d to %d: %s", soft, step, exc)
            continue
        log.debug("open files: soft limit raised from %d to %d", soft, step)
        return step
    return soft


def freeze_heap() -> None:
    """Move every object alive now (torch, grpc, the dataset's Python objects) out of the collector's reach.

    They live as long as the process anyway; without this, each full collection
    walks the hundreds of thousands of objects the imports created, a pause that
    lands in the middle of an exchange. Call it once the node is built, before it
    serves.
    """
    gc.collect()
    gc.freeze()


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
