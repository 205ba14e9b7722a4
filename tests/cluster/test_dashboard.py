"""``gossip dashboard`` as a person uses it: real nodes, the real command, a real headless Chromium.

Four real nodes train a tiny model (``tests/support/nodehost.py``): three in one
process, among them one whose id is an attempt at script injection, and a fourth,
the victim, alone in its own so a SIGKILL takes only it. ``gossip dashboard``
runs as a subprocess polling every 0.5 s; Debian's chromium (driven by
Playwright, no browser download) opens the page once for the whole module. The
tests that need the four nodes alive come before the one that kills.

Chromium: ``.ci/run`` installs it; without it the module fails where it could be
installed (root with apt-get) and skips only where it cannot.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import grpc.aio
import pytest

from gossip.core.status import MemberView, NodeStatus
from gossip.observe.dashboard import BackgroundDashboard, Dashboard
from gossip.transport import serde

# Membership of the nodes (nodehost's flags): a SIGKILLed node is dead 2.5 s after its
# last heartbeat, so the whole test stays short.
DEAD_AFTER = 2.5
MEMBERSHIP = ["--member-interval", "0.2", "--suspect-after", "1.0", "--dead-after", str(DEAD_AFTER)]
INTERVAL = 0.5  # the dashboard's polls
XSS = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
IDS = ["n0", "n1", XSS]
VICTIM = "victim"
T = TypeVar("T")
START_TIMEOUT = 120.0  # torch's import on a loaded 2-core machine


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("chromium is missing: apt-get install chromium (.ci/run installs it)")
    pytest.skip("no chromium, and it cannot be installed here (needs apt-get as root)")


@dataclass
class Cluster:
    hosts: list[subprocess.Popen[bytes]]
    victim: subprocess.Popen[bytes]
    addresses: dict[str, str]
    dashboard: subprocess.Popen[str]
    url: str


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _host(folder: Path, name: str, ids: list[str], *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tests.support.nodehost", "--ids", ",".join(ids)]
    cmd += ["--ready", str(folder / f"{name}.ready"), *MEMBERSHIP, *extra]
    log = (folder / f"{name}.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env())


def _ready(folder: Path, name: str, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, str]:
    ready = folder / f"{name}.ready"
    while not ready.exists():
        log = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
        assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{log}"
        assert time.monotonic() < deadline, f"{name} did not start in time\n{log}"
        time.sleep(0.05)
    addresses: dict[str, str] = json.loads(ready.read_text())["addresses"]
    return addresses


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from the dashboard in {timeout} s"
    return proc.stdout.readline()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("dashboard")
    procs: list[subprocess.Popen[Any]] = []
    try:
        # Both start at once (torch loads in parallel); the victim joins once the others serve.
        main = _host(folder, "main", IDS)
        procs.append(main)
        victim = _host(folder, "victim", [VICTIM], "--seed", "7", "--peer-file", str(folder / "main.ready"))
        procs.append(victim)
        deadline = time.monotonic() + START_TIMEOUT
        addresses = _ready(folder, "main", main, deadline) | _ready(folder, "victim", victim, deadline)
        cmd = [sys.executable, "-m", "gossip", "dashboard", "--peer", addresses["n0"]]
        cmd += ["--listen", "127.0.0.1:0", "--interval", str(INTERVAL)]
        # Ctrl-C reaches it also where this test runs with SIGINT ignored (a background job
        # without job control passes SIG_IGN on to everything it starts).
        board = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        procs.append(board)
        line = _first_line(board, 60.0)
        assert board.poll() is None, board.communicate()
        url = line.split(" at ")[1].split()[0]
        yield Cluster([main], victim, addresses, board, url)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(30)


DIALOGS: list[str] = []  # alert(), confirm() or prompt() the page opened: none, ever


def on_dialog(dialog: Any) -> None:
    DIALOGS.append(dialog.message)
    dialog.dismiss()


@pytest.fixture(scope="module")
def page(cluster: Cluster) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    exe = chromium()
    with sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=args)
        try:
            # The page's CSP forbids eval, which Playwright's waits use. Bypassing it also means
            # that the injection test below proves the DOM building safe without the CSP's help.
            pg = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
            pg.on("dialog", on_dialog)
            pg.goto(cluster.url)
            pg.wait_for_function("document.querySelectorAll('#graph g.node').length === 4", timeout=20_000)
            yield pg
        finally:
            browser.close()


READ = """() => {
  const out = {};
  for (const tr of document.querySelectorAll('#nodes tbody tr')) {
    const id = tr.dataset.nodeId;
    const points = (chart) => {
      const line = [...document.querySelectorAll(chart + ' polyline')].find((p) => p.dataset.nodeId === id);
      return line ? line.getAttribute('points').trim().split(/\\s+/).length : 0;
    };
    const g = [...document.querySelectorAll('#graph g.node')].find((e) => e.dataset.nodeId === id);
    out[id] = {
      step: Number(tr.querySelector('td[data-field=step]').textContent),
      loss_points: points('#chart-loss'),
      accuracy_points: points('#chart-accuracy'),
      grey: g ? g.classList.contains('unreachable') : null,
    };
  }
  return out;
}"""


def rounds_pass(page: Any, n: int) -> None:
    """Wait until the page has redrawn from ``n`` more of the dashboard's polls."""
    now = int(page.evaluate("Number(document.body.dataset.round)"))
    page.wait_for_function(f"Number(document.body.dataset.round) >= {now + n}", timeout=20_000)


@pytest.mark.timeout(180)
def test_the_page_shows_four_nodes_whose_steps_and_curves_advance(page: Any) -> None:
    # Every node has evaluated once (the last one to start may still be on its first steps).
    page.wait_for_function(
        "document.querySelectorAll('#chart-accuracy polyline').length === 4", timeout=60_000
    )
    first = page.evaluate(READ)
    rounds_pass(page, 3)
    second = page.evaluate(READ)
    assert sorted(first) == sorted([*IDS, VICTIM])
    for node_id in first:
        a, b = first[node_id], second[node_id]
        assert not a["grey"] and not b["grey"], node_id
        assert b["step"] > a["step"], (node_id, a, b)
        assert b["loss_points"] > a["loss_points"] > 0, (node_id, a, b)
        assert b["accuracy_points"] > a["accuracy_points"] > 0, (node_id, a, b)


@pytest.mark.timeout(180)
def test_a_node_id_with_markup_shows_as_text_and_runs_nothing(page: Any) -> None:
    rounds_pass(page, 1)
    cells = page.eval_on_selector_all(
        "#nodes tbody td[data-field=node_id]", "tds => tds.map((td) => td.textContent)"
    )
    titles = page.eval_on_selector_all("#graph g.node title", "ts => ts.map((t) => t.textContent)")
    assert XSS in cells
    assert any(t.startswith(XSS + " at ") for t in titles)
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.scripts.length") == 1  # app.js only
    assert DIALOGS == []
    csp = page.request.get(page.url).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


@pytest.mark.timeout(180)
def test_a_sigkilled_node_turns_grey_within_the_death_timeout(
    cluster: Cluster, page: Any, tmp_path: Path
) -> None:
    victim = f"[...document.querySelectorAll('#graph g.node')].find((g) => g.dataset.nodeId === '{VICTIM}')"
    assert not page.evaluate(f"{victim}.classList.contains('unreachable')")
    os.kill(cluster.victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    page.wait_for_function(f"{victim}.classList.contains('unreachable')", timeout=DEAD_AFTER * 4000)
    greyed = time.monotonic() - t0
    dead = f"[...document.querySelectorAll('#events li')].some((li) => li.dataset.nodeId === '{VICTIM}' && li.dataset.what === 'declared dead')"
    page.wait_for_function(dead, timeout=20_000)
    rounds_pass(page, 1)
    after = page.evaluate(READ)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert greyed < DEAD_AFTER, f"grey after {greyed:.2f} s"
    assert after[VICTIM]["step"] > 0  # its last values stay
    assert [n for n, r in after.items() if r["grey"]] == [VICTIM]
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


# --- bad input to the command --------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused(cluster: Cluster) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """``gossip dashboard`` against each kind of bad input, all at once (each run is a process start)."""
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    with socket.socket() as closed, socket.socket() as mute, socket.socket() as busy:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        mute.bind(("127.0.0.1", 0))
        mute.listen()  # the kernel accepts; nobody ever speaks
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = {name: s.getsockname()[1] for name, s in (("closed", closed), ("mute", mute), ("busy", busy))}
        runs = {
            "unreachable": ["--peer", f"127.0.0.1:{port['closed']}"],
            "http": ["--peer", f"127.0.0.1:{http_server.server_address[1]}"],
            "mute": ["--peer", f"127.0.0.1:{port['mute']}", "--timeout", "0.5"],
            "port in use": ["--peer", cluster.addresses["n0"], "--listen", f"127.0.0.1:{port['busy']}"],
            "bad address": ["--peer", "no-port-here"],
        }
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "gossip", "dashboard", "--listen", "127.0.0.1:0", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            for name, args in runs.items()
        }
        try:
            out = {}
            for name, p in procs.items():
                stdout, stderr = p.communicate(timeout=60)
                out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
            yield out
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(30)
            http_server.shutdown()
            http_server.server_close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("unreachable", 1, "cannot reach"),
        ("http", 1, "cannot reach"),  # a web server, not a gossip node
        ("mute", 1, "DEADLINE_EXCEEDED"),  # accepts, never answers
        ("port in use", 1, "cannot listen on"),
        ("bad address", 2, "is not HOST:PORT"),
    ],
)
def test_bad_input_is_one_line_and_the_right_exit_code(
    refused: dict[str, subprocess.CompletedProcess[str]], case: str, code: int, says: str
) -> None:
    out = refused[case]
    assert out.returncode == code, out
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gossip dashboard: "), out.stderr
    assert says in lines[0], lines[0]


# --- malformed replies, in process ---------------------------------------------------------------


def in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a thread of its own: the module's sync Playwright holds this thread's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def fake_node(reply: list[bytes]) -> tuple[grpc.aio.Server, str]:
    """A gRPC server whose Status answers ``reply[0]``: raw bytes, maybe not a StatusReply at all."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply[0]

    handler = grpc.method_handlers_generic_handler(
        "gossip.proto.Gossip", {"Status": grpc.unary_unary_rpc_method_handler(answer)}
    )
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def node_status(node_id: str, address: str, members: list[tuple[str, str]]) -> bytes:
    views = tuple(MemberView(i, a, "alive", -1, 1, 0.0) for i, a in [(node_id, address), *members])
    status = NodeStatus(
        node_id=node_id,
        address=address,
        phase="running",
        step=5,
        rank=-1,
        topology="random",
        strategy="pairwise",
        parameters=10,
        fingerprint=b"\x01",
        weight=1.0,
        uptime_seconds=1.0,
        exchanges_ok=0,
        exchanges_failed=0,
        exchanges_declined=0,
        exchanges_served=0,
        bytes_in=0,
        bytes_out=0,
        members=views,
    )
    return serde.status_to_bytes(status)


GARBAGE = b"\x0a\xff\xff\xff\xff"  # field 1 (node_id) claims more bytes than follow


@pytest.mark.timeout(60)
def test_malformed_replies_and_hostile_addresses_are_unreachable_nodes_and_foreign_hosts_refused() -> None:
    async def main() -> tuple[dict[str, Any], int, int]:
        seed_reply = [b""]
        seed, seed_at = await fake_node(seed_reply)
        garbled, garbled_at = await fake_node([GARBAGE])
        members = [("garbled", garbled_at), ("<b>hostile</b>", "evil<script>:80")]
        seed_reply[0] = node_status("seed", seed_at, members)  # its table names both
        try:
            async with Dashboard(seed_at, "127.0.0.1:0", interval=0.1, timeout=2.0) as board:
                while board.state.round < 3:
                    await asyncio.sleep(0.05)
                async with aiohttp.ClientSession() as http:
                    async with http.get(board.url + "api/state") as res:
                        state, code = await res.json(), res.status
                    # A page that rebound its own DNS name to 127.0.0.1 sends its own Host.
                    rebound = {"Host": "attacker.example:" + board.url.rsplit(":", 1)[1].strip("/")}
                    async with http.get(board.url + "api/state", headers=rebound) as res:
                        return state, code, res.status
        finally:
            await asyncio.gather(seed.stop(None), garbled.stop(None))

    state, code, rebound = in_thread(main())
    nodes = {n["node_id"]: n for n in state["nodes"]}
    assert (code, rebound) == (200, 403)
    assert nodes["seed"]["reachable"]
    assert not nodes["garbled"]["reachable"] and "not a gossip status" in nodes["garbled"]["error"]
    assert not nodes["<b>hostile</b>"]["reachable"]
    assert nodes["<b>hostile</b>"]["error"] == "its address is not HOST:PORT: not asked"


@pytest.mark.timeout(60)
def test_a_peer_whose_status_is_malformed_is_refused_at_start() -> None:
    async def main() -> None:
        server, at = await fake_node([GARBAGE])
        try:
            with pytest.raises(ConnectionError, match="not a gossip status"):
                await Dashboard(at, "127.0.0.1:0").start()
        finally:
            await server.stop(None)

    in_thread(main())


@pytest.mark.timeout(60)
def test_a_background_dashboard_serves_for_synchronous_callers(cluster: Cluster) -> None:
    board = BackgroundDashboard(cluster.addresses["n0"], interval=0.2)
    url = board.start()
    try:
        while board.board.state.round < 3:
            time.sleep(0.05)
        with urllib.request.urlopen(url + "api/state", timeout=10) as res:
            state = json.loads(res.read())
    finally:
        board.stop()
    assert {n["node_id"] for n in state["nodes"]} == {*IDS, VICTIM}
    assert not board._thread.is_alive()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = BackgroundDashboard(f"127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(ConnectionError, match="cannot reach"):
            refused.start()
    assert not refused._thread.is_alive()


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_command_cleanly(cluster: Cluster) -> None:
    cluster.dashboard.send_signal(signal.SIGINT)
    out, err = cluster.dashboard.communicate(timeout=15)
    assert cluster.dashboard.returncode == 0, err
    assert (out, err) == ("", "")
