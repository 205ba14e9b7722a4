"""The zygote process: imports what a node needs once, then forks ``gossip node`` processes.

The launcher's side, the protocol and why are :mod:`gossip.cluster.zygote`; this is
the process it starts (``python -m gossip.cli.zygote``), in the CLI layer because
each child runs ``gossip node``'s own entry point.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from gossip.cluster.zygote import STOP_GRACE

_POLL_SECONDS = 0.05  # the zygote's wait between looks at its children and its pipe


def _child(argv: list[str], log: str, env: Mapping[str, str], cwd: str, zygote: int) -> None:
    """In the forked child: become ``gossip node argv`` writing to ``log``; never returns."""
    code = 1
    try:
        # What a fresh interpreter has: Ctrl-C a KeyboardInterrupt, a reset socket an
        # EPIPE error rather than a death, SIGTERM and SIGCHLD their defaults.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _term_with_parent()
        if os.getppid() != zygote:  # it died before the line above: nobody would report this node
            os._exit(1)
        os.chdir(cwd)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        if env.get("PYTHONUNBUFFERED"):  # read at interpreter start-up, which a fork skips
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        import random

        import numpy as np

        random.seed()
        np.random.seed()
        sys.argv = ["gossip", *argv]
        from gossip.cli.main import main
        from gossip.cli.output import print_error
        from gossip.config import ConfigError
        from gossip.node import faults

        try:
            faults.rearm()  # imported here with the zygote's environment, not the node's
            code = main(argv)
        except ConfigError as exc:  # a bad GOSSIP_FAILPOINTS, as a process of its own would say it
            print_error(argv[0] if argv else "node", str(exc))
            code = 2
        except SystemExit as exc:  # argparse's usage errors
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _term_with_parent() -> None:
    """SIGTERM when the zygote dies (Linux): a node never outlives the process that reports it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve() -> int:
    # What every node imports, loaded once here.
    import gc

    import gossip.cli.commands
    import gossip.cli.main
    import gossip.cluster.runner  # noqa: F401

    gc.collect()
    gc.freeze()  # the imports' objects: no collection in a child touches (and copies) their pages
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the nodes and the launcher
    zygote = os.getpid()
    children: set[int] = set()
    out = sys.stdout
    stdin = sys.stdin.buffer
    buf = b""
    closing_since: float | None = None

    def report(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    while children or closing_since is None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            report({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if closing_since is not None:
            if time.monotonic() - closing_since > STOP_GRACE:
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(_POLL_SECONDS)
            continue
        ready, _, _ = select.select([stdin], [], [], _POLL_SECONDS)
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the launcher is done (or gone): stop what runs
            closing_since = time.monotonic()
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:  # one bad request or failed fork must not end the nodes already running
                req = json.loads(line)
                argv, log, env, cwd = list(req["argv"]), str(req["log"]), dict(req["env"]), str(req["cwd"])
                out.flush()
                pid = os.fork()
            except (ValueError, KeyError, TypeError, OSError) as exc:
                report({"error": f"{type(exc).__name__}: {exc}"})
                continue
            if pid == 0:
                _child(argv, log, env, cwd, zygote)
            children.add(pid)
            report({"pid": pid})
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
