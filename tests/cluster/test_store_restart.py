"""The durable store across real `python -m gossip node` processes: SIGKILL, restart, count repairs.

Four nodes train one epoch on 1/4 of digits each and publish every 3 steps in 4 KiB
shards (10 per snapshot, R = 3). One of them keeps its store under ``--data-dir``.
It is SIGKILLed and started again on the same address, id and folder: it must
answer for every shard it held within 2 s of its server answering at all, and the
repair counters (``repaired`` in ``gossip status``, ``gossip_store_repaired_total``
in Prometheus: shards pulled to restore a copy) must not move anywhere. A node
without a data dir, killed and restarted the same way, pulls its shards back: the
counter is the right one to watch. The failure detector is slowed (``--dead-after
60``) so that a restart is a restart, not a death and a re-replication.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import Launcher, NodeProc, wait_for

STORE_ARGS = ["--shard-bytes", "4096", "--publish-every", "3", "--replication", "3", "--epochs", "1"]
SLOW_DEATH = ["--suspect-after", "30", "--dead-after", "60"]
N = 4


def node_args(i: int, data_dirs: dict[int, Path]) -> list[str]:
    args = ["--rank", str(i), "--world-size", str(N), *STORE_ARGS, *SLOW_DEATH]
    if i in data_dirs:
        args += ["--data-dir", str(data_dirs[i])]
    return args


def held(p: NodeProc) -> dict[int, list[int]]:
    """version -> the shards ``p`` holds a checked copy of."""
    return {s["version"]: s["shards_held"] for s in p.status()["store"]["snapshots"]}


def settled(nodes: list[NodeProc]) -> bool:
    """Every node knows the same versions, and every shard of them has 3 copies."""
    stores = [p.status()["store"] for p in nodes]
    if len({tuple(s["versions"]) for s in stores}) != 1 or not stores[0]["versions"]:
        return False
    return all(not s["under_replicated"] for s in stores)


def on_disk(root: Path) -> dict[int, list[int]]:
    """version -> the shards whose files sit beside that version's manifest."""
    return {
        int(d.name[1:]): sorted(int(f.name.split(".")[0]) for f in d.iterdir() if f.name[0].isdigit())
        for d in root.glob("*/v*")
        if (d / "manifest").exists()
    }


def repaired(nodes: list[NodeProc]) -> dict[str, int]:
    return {p.name: p.status()["store"]["repaired"] for p in nodes}


def restart(la: Launcher, old: NodeProc, args: list[str], peer: str) -> tuple[NodeProc, float, float]:
    """Start ``old`` again on its address and id: the seconds from launch until it serves (its
    ready file, written once the node has started), and from then until it answers for every
    shard ``old`` held."""
    old.ready_file.unlink()
    p = la.start(old.name, *args, "--listen", old.address, "--peers", peer)
    p.address, p.extra = old.address, old.extra
    t0 = time.monotonic()
    la.wait_ready(p)
    ready = time.monotonic()
    while True:
        assert p.popen.poll() is None, f"{p.name} exited\n{p.tail()}"
        assert time.monotonic() - ready < 60, f"{p.name} never held its shards again\n{p.tail()}"
        if held(p) == p.extra["held"]:
            return p, ready - t0, time.monotonic() - ready
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_node_restarted_on_its_data_dir_serves_its_shards_at_once_and_repairs_nothing(
    launcher: Launcher, tmp_path: Path
) -> None:
    data = {1: tmp_path / "n1-data"}
    seed = str(tmp_path / "n0.ready")
    nodes = [
        launcher.start(
            f"n{i}", *node_args(i, data), "--wait-for", str(N), *(["--seed-file", seed] if i else [])
        )
        for i in range(N)
    ]
    launcher.wait_ready(*nodes)
    wait_for(lambda: all(p.finished() for p in nodes), 120, "training", *nodes)
    wait_for(lambda: settled(nodes), 60, "every shard on its 3 owners", *nodes)
    durable, plain = nodes[1], nodes[2]
    for p in (durable, plain):
        p.extra["held"] = held(p)
    assert (
        sum(len(v) for v in durable.extra["held"].values()) > 0
        and sum(len(v) for v in plain.extra["held"].values()) > 0
    )

    # Written off the event loop: wait until the folder holds each version's manifest and shards.
    def written() -> bool:
        disk = on_disk(data[1])
        return all(set(shards) <= set(disk.get(v, ())) for v, shards in durable.extra["held"].items())

    wait_for(written, 20, "the files", durable)
    others = [p for p in nodes if p is not durable]
    counts = repaired(others)

    durable.kill()
    durable, started_s, served_s = restart(launcher, durable, node_args(1, data), nodes[0].address)
    nodes[1] = durable
    time.sleep(12)  # two repair rounds (every 5 s, and one at once at start) on every node

    print(
        f"restarted on its data dir: serving {started_s:.2f} s after launch, every shard {served_s:.3f} s later"
    )
    assert served_s < 2.0
    assert held(durable) == durable.extra["held"]
    # Zero repair transfers: the restarted node pulled nothing, and nobody else did either.
    assert repaired([durable]) == {"n1": 0} and repaired(others) == counts
    assert any("served again in" in line for line in durable.log_lines())

    # The same restart without a data dir: it comes back empty and repair refills it.
    plain.kill()
    plain, _, refill_s = restart(launcher, plain, node_args(2, {}), nodes[0].address)
    nodes[2] = plain

    assert repaired([plain])["n2"] == sum(len(v) for v in plain.extra["held"].values()) > 0
    print(
        f"restarted without a data dir: refilled by {repaired([plain])['n2']} repair pulls in {refill_s:.2f} s"
    )


def test_an_unwritable_data_dir_is_refused_with_one_line_and_exit_2(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        # root writes through any mode bits: a read-only mount is what stays unwritable
        mounted = not subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(ro)]
        ).returncode
    else:
        ro.chmod(0o555)
    try:
        cases = [(a_file, "is a file"), (a_file / "sub", "is a file")]
        if mounted or not ro.stat().st_mode & 0o200:
            cases.append((ro / "data", "not writable"))
        for path, words in cases:
            cmd = [sys.executable, "-m", "gossip", "node", "--listen", "127.0.0.1:0", "--data-dir", str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0] and "data_dir" in lines[0], done.stderr
        assert len(cases) == 3
    finally:
        if mounted and subprocess.run(["umount", str(ro)], check=False).returncode:
            subprocess.run(["umount", "-l", str(ro)], check=True)  # never leave a mount behind
