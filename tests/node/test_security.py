"""TLS, mutual TLS and the token on real nodes over loopback, the exposure warning, and the limits.

Certificates come from the ``openssl`` CLI, made the way the docs' security page
tells a cluster to make them (SAN ``IP:127.0.0.1``). Raw calls use the synchronous gRPC
client on a thread: grpc.aio's client can mask the status a server ended a
stream with (grpc/grpc#36066), and the status is what these tests check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import pkgutil
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import torch

import gossip.proto
from gossip.api import BackgroundNode
from gossip.cli.main import main as cli_main
from gossip.config import ConfigError, GossipConfig, NodeConfig, SecurityConfig
from gossip.core.codecs import payload_nbytes
from gossip.core.membership import MemberRecord, MembershipConfig
from gossip.node.node import JoinError, Node
from gossip.observe.status import fetch_status
from gossip.transport import frames as wire
from gossip.transport import security, serde
from gossip.transport.frames import MESSAGE_LIMIT
from gossip.transport.ratelimit import PeerRateLimiter
from tests.support.inproc import vec, vector, wait_until

T = TypeVar("T")

CALL_TIMEOUT = 10.0
SLOW = MembershipConfig(interval=0.1, suspect_after=60.0, dead_after=120.0)
TOKEN = "s3cret-token-0123456789abcdef"  # searched for in every log and output below


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- certificates ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    dir: Path
    ca: str  # the cluster's CA
    certs: dict[str, tuple[str, str]]  # name -> (cert, key); "a", "b" signed by ca, "rogue" by another CA


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "30", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip


def make_cert(d: Path, name: str, ca: str, san: str = "IP:127.0.0.1") -> tuple[str, str]:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "30", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    certs = {name: make_cert(d, name, "ca") for name in ("a", "b")}
    certs["rogue"] = make_cert(d, "rogue", "other-ca")
    return Pki(d, str(d / "ca.pem"), certs)


def tls(pki: Pki, name: str, mutual: bool = True, token_file: str = "") -> SecurityConfig:
    cert, key = pki.certs[name]
    return SecurityConfig(tls_cert=cert, tls_key=key, tls_ca=pki.ca if mutual else "", token_file=token_file)


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return str(p)


# --- nodes ------------------------------------------------------------------------------


def node_config(i: int, sec: SecurityConfig, seed: str | None = None, **kw: Any) -> NodeConfig:
    # No averaging after training: the tests count exchanges.
    kw.setdefault("gossip", GossipConfig(idle_pause=0.0))
    return NodeConfig(node_id=f"n{i}", peers=(seed,) if seed else (), membership=SLOW, security=sec, **kw)


@contextlib.asynccontextmanager
async def nodes_with(*secs: SecurityConfig, values: float = 1.0) -> AsyncIterator[list[Node]]:
    """One node per config, joined through the first (values 1, 3, 5, ...); all stopped on the way out."""
    started: list[Node] = []
    try:
        for i, sec in enumerate(secs):
            cfg = node_config(i, sec, started[0].address if started else None)
            started.append(await Node.create(vector([values + 2 * i] * 4), cfg, seed=i))
        for n in started:
            assert await n.wait_for_members(len(started), 20.0), f"{n.node_id} did not see everyone"
        yield started
    finally:
        await asyncio.gather(*(n.stop(leave=False) for n in started), return_exceptions=True)


def snapshot(node: Node) -> tuple[bytes, dict[str, tuple[str, str]], tuple[int, ...]]:
    """Everything a refused call must leave as it was: parameters, members, counters."""
    assert node.members is not None
    members = {k: (m.address, m.state) for k, m in node.members.table.members.items()}
    s = node.stats
    counters = (s.exchanges_ok, s.exchanges_served, s.exchanges_declined, s.bytes_in, s.bytes_out)
    return vec(node).numpy().tobytes(), members, counters


# --- raw calls ---------------------------------------------------------------------------


def all_methods() -> list[tuple[str, bool, bool]]:
    """(path, client streams, server streams) of every RPC of every service a node serves."""
    out = []
    for info in pkgutil.iter_modules(gossip.proto.__path__):
        if not info.name.endswith("_pb2"):
            continue
        mod = importlib.import_module(f"gossip.proto.{info.name}")
        for service in mod.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return sorted(out)


def call_raw(
    channel: grpc.Channel,
    method: tuple[str, bool, bool],
    payload: Sequence[bytes],
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = CALL_TIMEOUT,
) -> grpc.StatusCode:
    """Send ``payload`` (raw bytes) to any method; the status the call ended with."""
    path, client_streaming, server_streaming = method
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    request: Any = iter(payload) if client_streaming else (payload[0] if payload else b"")
    try:
        result = kind(path, None, None)(request, timeout=timeout, metadata=tuple(metadata))
        if server_streaming:
            for _ in result:
                pass
            code: grpc.StatusCode = result.code()
            return code
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        return code


@contextlib.contextmanager
def raw_channel(address: str, creds: grpc.ChannelCredentials | None = None) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
    with ch:
        yield ch


def client_creds(pki: Pki, name: str | None, ca: str | None = None) -> grpc.ChannelCredentials:
    root = Path(ca or pki.ca).read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = pki.certs[name]
    return grpc.ssl_channel_credentials(root, Path(key).read_bytes(), Path(cert).read_bytes())


def status_call(address: str, creds: grpc.ChannelCredentials | None, metadata: Any = ()) -> grpc.StatusCode:
    with raw_channel(address, creds) as ch:
        return call_raw(ch, ("/gossip.proto.Gossip/Status", False, False), [b""], metadata)


# --- TLS --------------------------------------------------------------------------------


def test_mutual_tls_nodes_join_and_average_exactly(pki: Pki) -> None:
    async def main() -> None:
        async with nodes_with(tls(pki, "a"), tls(pki, "b")) as (a, b):
            await asyncio.to_thread(a.step)
            a.finish_training()
            await wait_until(lambda: a.stats.exchanges_ok == 1, CALL_TIMEOUT, "the exchange")

            assert torch.equal(vec(a), torch.full((4,), 2.0))
            assert torch.equal(vec(b), torch.full((4,), 2.0))
            assert (await fetch_status(a.address, CALL_TIMEOUT, security.load(tls(pki, "b"), False)))[
                "exchanges_ok"
            ] == 1

    run(main())


@pytest.mark.parametrize(
    "client",
    ["plaintext", "tls without a client certificate", "client certificate from another CA"],
)
def test_mutual_tls_node_refuses_a_client_without_a_certificate_of_its_ca(pki: Pki, client: str) -> None:
    creds = {
        "plaintext": None,
        "tls without a client certificate": client_creds(pki, None),
        "client certificate from another CA": client_creds(pki, "rogue"),
    }[client]

    async def main() -> None:
        async with nodes_with(tls(pki, "a")) as (a,):
            before = snapshot(a)
            code = await asyncio.to_thread(status_call, a.address, creds)
            sync = ("/gossip.proto.Gossip/Sync", False, False)
            table = serde.table_to_bytes(
                MemberRecord("intruder", "127.0.0.1:9", incarnation=1, heartbeat=1), []
            )

            def sync_call() -> grpc.StatusCode:
                with raw_channel(a.address, creds) as ch:
                    return call_raw(ch, sync, [table])

            sync_code = await asyncio.to_thread(sync_call)

            assert code == sync_code == grpc.StatusCode.UNAVAILABLE
            assert snapshot(a) == before

    run(main())


def test_node_with_a_certificate_from_another_ca_cannot_join(pki: Pki) -> None:
    async def main() -> None:
        async with nodes_with(tls(pki, "a")) as (a,):
            before = snapshot(a)
            cfg = node_config(9, tls(pki, "rogue"), a.address, join_timeout=1.0)
            try:
                rogue = await Node.create(vector([7.0] * 4), cfg)
            except JoinError as exc:
                refused = str(exc)
            else:
                await rogue.stop(leave=False)
                pytest.fail("a node with a certificate from another CA joined")

            assert "UNAVAILABLE" in refused
            assert snapshot(a) == before

    run(main())


def test_server_only_tls_serves_a_client_that_verifies_it_with_the_ca(pki: Pki) -> None:
    async def main() -> None:
        async with nodes_with(tls(pki, "a", mutual=False)) as (a,):
            verified = await asyncio.to_thread(status_call, a.address, client_creds(pki, None))
            plaintext = await asyncio.to_thread(status_call, a.address, None)
            wrong_ca = await asyncio.to_thread(
                status_call, a.address, client_creds(pki, None, ca=str(pki.dir / "other-ca.pem"))
            )

            assert verified == grpc.StatusCode.OK
            assert plaintext == wrong_ca == grpc.StatusCode.UNAVAILABLE

    run(main())


def test_the_dialled_host_must_be_a_subject_alternative_name(pki: Pki) -> None:
    async def main() -> None:
        async with nodes_with(tls(pki, "a")) as (a,):
            port = a.address.rpartition(":")[2]
            by_ip = await asyncio.to_thread(status_call, f"127.0.0.1:{port}", client_creds(pki, "b"))
            by_name = await asyncio.to_thread(status_call, f"localhost:{port}", client_creds(pki, "b"))

            assert by_ip == grpc.StatusCode.OK
            assert by_name == grpc.StatusCode.UNAVAILABLE  # the certificate names IP:127.0.0.1 only

    run(main())


# --- the token ---------------------------------------------------------------------------

GOOD = (("authorization", "Bearer " + TOKEN),)
BAD_METADATA = {
    "none": (),
    "wrong token": (("authorization", "Bearer " + TOKEN[:-1] + "X"),),
    "no scheme": (("authorization", TOKEN),),
    "prefix of the token": (("authorization", "Bearer " + TOKEN[:8]),),
    "other header": (("x-gossip-token", TOKEN),),
    "twice": (*GOOD, *GOOD),
}


def test_token_nodes_join_and_average(token_file: str) -> None:
    async def main() -> None:
        sec = SecurityConfig(token_file=token_file)
        async with nodes_with(sec, sec) as (a, b):
            await asyncio.to_thread(a.step)
            a.finish_training()
            await wait_until(lambda: a.stats.exchanges_ok == 1, CALL_TIMEOUT, "the exchange")

            assert torch.equal(vec(a), torch.full((4,), 2.0))
            assert torch.equal(vec(b), torch.full((4,), 2.0))

    run(main())


@pytest.mark.parametrize("case", BAD_METADATA.keys())
def test_every_rpc_without_the_right_token_is_unauthenticated_and_changes_nothing(
    token_file: str, case: str
) -> None:
    methods = all_methods()
    header = wire.header_to_frame(
        wire.Header(b"\0" * 16, "intruder", 1, "raw", 16, chunk_bytes=4096)
    )  # well-formed, so only the token can stop it

    async def main() -> dict[str, grpc.StatusCode]:
        async with nodes_with(SecurityConfig(token_file=token_file)) as (a,):
            before = snapshot(a)

            def calls() -> dict[str, grpc.StatusCode]:
                with raw_channel(a.address) as ch:
                    codes = {m[0]: call_raw(ch, m, [header], BAD_METADATA[case]) for m in methods}
                    codes["/no.such/Method"] = call_raw(ch, ("/no.such/Method", False, False), [b""])
                    codes["with the token"] = call_raw(ch, methods[0], [b""], GOOD)  # still serving
                    return codes

            codes = await asyncio.to_thread(calls)

            assert snapshot(a) == before
            return codes

    codes = run(main())
    assert len(codes) >= 8  # the Gossip service's six and more
    assert codes.pop("with the token") != grpc.StatusCode.UNAUTHENTICATED
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes


def test_the_token_is_never_logged(token_file: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sec = SecurityConfig(token_file=token_file)

    async def main() -> None:
        async with nodes_with(sec, sec) as (a, _):
            await asyncio.to_thread(a.step)
            a.finish_training()
            await wait_until(lambda: a.stats.exchanges_ok == 1, CALL_TIMEOUT, "the exchange")
            loaded = security.load(sec, serving=False)
            status = await fetch_status(a.address, CALL_TIMEOUT, loaded)
            with pytest.raises(ConnectionError) as refused:
                await fetch_status(a.address, CALL_TIMEOUT)
            logging.getLogger("test").debug("config %r, security %r", a.config, loaded)

            assert TOKEN not in repr(status) and TOKEN not in str(refused.value)
            assert "UNAUTHENTICATED" in str(refused.value)

    run(main())
    assert "exchange" in caplog.text or "listening" in caplog.text  # the logs were captured
    assert TOKEN not in caplog.text
    assert TOKEN[:8] not in caplog.text


def _gossip(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gossip", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_gossip_status_with_tls_and_token_shows_no_token(pki: Pki, token_file: str) -> None:
    sec = tls(pki, "a", token_file=token_file)
    model = torch.nn.Linear(2, 1)
    with BackgroundNode(model, NodeConfig(security=sec)) as node:
        client = ["--tls-ca", pki.ca, "--tls-cert", pki.certs["b"][0], "--tls-key", pki.certs["b"][1]]
        ok = _gossip("status", "--peer", node.address, "--json", *client, "--token-file", token_file)
        no_token = _gossip("status", "--peer", node.address, *client)

    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["node_id"] == node.node_id
    assert TOKEN not in ok.stdout + ok.stderr
    assert no_token.returncode == 1
    assert "UNAUTHENTICATED" in no_token.stderr and len(no_token.stderr.splitlines()) == 1
    assert TOKEN not in no_token.stdout + no_token.stderr


# --- bad security files ------------------------------------------------------------------


def bad_files(tmp: Path, pki: Pki) -> dict[str, list[str]]:
    (tmp / "empty").write_text("\n  \n")
    (tmp / "two-lines").write_text("abc\ndef\n")
    (tmp / "binary").write_bytes(b"\xff\xfe token")
    (tmp / "not-pem").write_text("hello\n")
    cert_a, key_a = pki.certs["a"]
    key_b = pki.certs["b"][1]
    return {
        "empty token file": ["--token-file", str(tmp / "empty")],
        "token file missing": ["--token-file", str(tmp / "nope")],
        "token file is a directory": ["--token-file", str(tmp)],
        "token of two lines": ["--token-file", str(tmp / "two-lines")],
        "token not ascii": ["--token-file", str(tmp / "binary")],
        "cert without key": ["--tls-cert", cert_a],
        "ca without cert": ["--tls-ca", pki.ca],
        "key of another cert": ["--tls-cert", cert_a, "--tls-key", key_b],
        "cert not pem": ["--tls-cert", str(tmp / "not-pem"), "--tls-key", key_a],
        "ca not pem": ["--tls-cert", cert_a, "--tls-key", key_a, "--tls-ca", str(tmp / "not-pem")],
        "ca missing": ["--tls-cert", cert_a, "--tls-key", key_a, "--tls-ca", str(tmp / "nope")],
    }


BAD_FILE_CASES = [
    "empty token file",
    "token file missing",
    "token file is a directory",
    "token of two lines",
    "token not ascii",
    "cert without key",
    "ca without cert",
    "key of another cert",
    "cert not pem",
    "ca not pem",
    "ca missing",
]


@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_bad_security_files_are_one_line_and_exit_code_2(
    tmp_path: Path, pki: Pki, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = bad_files(tmp_path, pki)[case]

    code = cli_main(["node", "--listen", "127.0.0.1:0", *argv])

    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gossip node: error:"), err


def test_status_with_an_empty_token_file_is_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("")

    done = _gossip("status", "--peer", "127.0.0.1:1", "--token-file", str(tmp_path / "empty"))

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"gossip status: error: --token-file {tmp_path / 'empty'} is empty"]


def test_token_file_surrounding_whitespace_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(f"  {TOKEN}\r\n")

    assert security.read_token(str(tmp_path / "t")) == TOKEN


def test_security_repr_hides_the_token() -> None:
    sec = security.Security(token=TOKEN)

    assert TOKEN not in repr(sec)
    assert TOKEN not in repr(security.TokenInterceptor(TOKEN))


def test_loading_needs_no_files_for_plaintext() -> None:
    sec = security.load(SecurityConfig(), serving=True)

    kinds = [type(i) for i in sec.server_interceptors()]

    assert not sec.tls and sec.metadata == ()
    assert kinds == [PeerRateLimiter]  # no token check


def test_tls_ca_alone_is_enough_for_a_client(pki: Pki) -> None:
    sec = security.load(SecurityConfig(tls_ca=pki.ca), serving=False)

    assert sec.channel_credentials is not None and sec.server_credentials is None
    with pytest.raises(ConfigError, match="--tls-ca needs"):
        security.load(SecurityConfig(tls_ca=pki.ca), serving=True)


# --- exposure warning --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "warned"),
    [
        ("127.0.0.1:7070", False),
        ("127.3.4.5:0", False),
        ("localhost:7070", False),
        ("[::1]:7070", False),
        ("0.0.0.0:7070", True),
        ("[::]:7070", True),
        ("10.0.0.1:7070", True),
        ("node1.lan:7070", True),
    ],
)
def test_exposure_warning_only_off_loopback(listen: str, warned: bool) -> None:
    assert (security.exposure_warning(listen, security.Security()) is not None) == warned
    assert security.exposure_warning(listen, security.Security(token=TOKEN)) is None


@pytest.mark.parametrize(
    ("address", "peers", "warned"),
    [
        ("127.0.0.1:7070", ("10.0.0.1:7070",), True),
        ("localhost:7070", ("10.0.0.1:7070", "127.0.0.1:7071"), True),
        ("127.0.0.1:7070", ("127.0.0.1:7071",), False),  # a local cluster
        ("127.0.0.1:7070", (), False),
        ("10.0.0.2:7070", ("10.0.0.1:7070",), False),
    ],
)
def test_a_loopback_address_with_remote_peers_is_warned_about(
    address: str, peers: tuple[str, ...], warned: bool
) -> None:
    warning = security.loopback_warning(address, peers)

    assert (warning is not None) == warned
    if warning:
        assert address in warning and "--advertise" in warning


def test_exposure_warning_not_given_with_tls(pki: Pki) -> None:
    sec = security.load(tls(pki, "a"), serving=True)

    assert security.exposure_warning("0.0.0.0:7070", sec) is None


@pytest.mark.parametrize("protected", [False, True])
def test_node_on_all_interfaces_warns_unless_protected(
    token_file: str, caplog: pytest.LogCaptureFixture, protected: bool
) -> None:
    sec = SecurityConfig(token_file=token_file) if protected else SecurityConfig()

    async def main() -> None:
        cfg = NodeConfig(listen="0.0.0.0:0", membership=SLOW, security=sec)
        node = await Node.create(vector([1.0]), cfg)
        await node.stop(leave=False)

    with caplog.at_level(logging.WARNING, logger="gossip.node.node"):
        run(main())
    warned = any("without TLS or a token" in r.getMessage() for r in caplog.records)
    assert warned == (not protected)


# --- limits -----------------------------------------------------------------------------


def test_a_frame_over_the_message_limit_is_resource_exhausted() -> None:
    async def main() -> None:
        async with nodes_with(SecurityConfig()) as (a,):
            before = snapshot(a)
            big = b"\x12" + b"\x00" * MESSAGE_LIMIT

            def calls() -> list[grpc.StatusCode]:
                with raw_channel(a.address) as ch:
                    return [
                        call_raw(ch, ("/gossip.proto.Gossip/Exchange", True, True), [big]),
                        call_raw(ch, ("/gossip.proto.Gossip/Push", True, False), [big]),
                        call_raw(ch, ("/gossip.proto.Gossip/Sync", False, False), [big]),
                    ]

            codes = await asyncio.to_thread(calls)

            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
            assert snapshot(a) == before

    run(main())


def test_a_member_table_over_the_member_cap_is_refused_whole() -> None:
    async def main() -> None:
        async with nodes_with(SecurityConfig()) as (a,):
            before = snapshot(a)
            members = [
                MemberRecord(f"m{i}", f"10.0.{i // 250}.{i % 250}:7070", 1, 1)
                for i in range(serde.MAX_MEMBERS + 1)
            ]
            sender = MemberRecord("flooder", "127.0.0.1:9", 1, 1)
            big = serde.table_to_bytes(sender, members, protocol="swim")
            assert len(big) < MESSAGE_LIMIT  # refused for its count, not its size

            def call(table: bytes) -> grpc.StatusCode:
                with raw_channel(a.address) as ch:
                    return call_raw(ch, ("/gossip.proto.Gossip/Sync", False, False), [table])

            over = await asyncio.to_thread(call, big)

            assert over == grpc.StatusCode.INVALID_ARGUMENT
            assert snapshot(a) == before  # not even the sender was taken in
            assert await asyncio.to_thread(status_call, a.address, None) == grpc.StatusCode.OK

    run(main())


def _held_push(address: str, frames: list[bytes], release: Any) -> grpc.StatusCode:
    """A push that sends ``frames`` and then holds its stream open until ``release`` is set."""

    def gen() -> Iterator[bytes]:
        yield from frames
        release.wait(CALL_TIMEOUT)

    with raw_channel(address) as ch:
        try:
            ch.stream_unary("/gossip.proto.Gossip/Push", None, None)(gen(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_pushes_in_flight_are_capped() -> None:
    import threading

    g = GossipConfig(strategy="push-sum")

    async def main() -> list[grpc.StatusCode]:
        cfg = NodeConfig(node_id="p", membership=SLOW, gossip=g)
        node = await Node.create(vector([1.0] * 4), cfg)
        release = threading.Event()
        try:
            header = wire.header_to_frame(
                wire.Header(
                    node.flat.fingerprint, "t", 1, "raw", payload_nbytes(node.flat.layout, "raw"), 0.5
                )
            )
            cap = 4
            held = [asyncio.create_task(asyncio.to_thread(_held_push, node.address, [header], release))]
            for _ in range(cap - 1):
                held.append(
                    asyncio.create_task(asyncio.to_thread(_held_push, node.address, [header], release))
                )
            await wait_until(lambda: node.party.push_slots.locked(), CALL_TIMEOUT, "every push slot taken")
            extra = await asyncio.to_thread(_held_push, node.address, [header], release)
            release.set()
            codes = [extra, *await asyncio.gather(*held)]
            return codes
        finally:
            release.set()
            await node.stop(leave=False)

    codes = run(main())
    assert codes[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The held ones sent a header and no payload: refused for that, once let go.
    assert set(codes[1:]) == {grpc.StatusCode.INVALID_ARGUMENT}


def test_a_second_exchange_while_one_is_in_flight_is_declined() -> None:
    async def main() -> None:
        async with nodes_with(SecurityConfig()) as (a,):
            flat = a.flat
            header = wire.header_to_frame(
                wire.Header(
                    flat.fingerprint, "t", 1, "raw", payload_nbytes(flat.layout, "raw"), chunk_bytes=4096
                )
            )
            async with grpc.aio.insecure_channel(a.address) as ch:
                first = ch.stream_stream("/gossip.proto.Gossip/Exchange")(timeout=CALL_TIMEOUT)
                await first.write(header)
                assert wire.header_from_frame(await first.read()).outcome == "accepted"
                second = ch.stream_stream("/gossip.proto.Gossip/Exchange")(timeout=CALL_TIMEOUT)
                await second.write(header)
                reply = wire.header_from_frame(await second.read())
                first.cancel()

            assert reply.outcome == "busy"
            assert a.stats.exchanges_declined == 1
            await wait_until(lambda: not a.slot.busy, CALL_TIMEOUT, "the abandoned exchange to free the node")
            assert torch.equal(vec(a), torch.ones(4))

    run(main())


# --- per-peer rate limit ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_passes_a_burst_then_paces_the_rest() -> None:
    clock = FakeClock()
    lim = PeerRateLimiter(rate=10.0, burst=3, clock=clock)

    waits = [lim.reserve("ipv4:10.0.0.1:5000", max_wait=5.0) for _ in range(6)]
    other = lim.reserve("ipv4:10.0.0.2:5000", max_wait=5.0)
    clock.now += 10.0
    after_quiet = [lim.reserve("ipv4:10.0.0.1:5000", max_wait=5.0) for _ in range(3)]

    assert waits == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])
    assert other == 0.0  # buckets are per connection
    assert after_quiet == [0.0, 0.0, 0.0]  # refilled to the burst, not beyond


def test_rate_limit_refuses_what_could_not_be_served_in_time() -> None:
    clock = FakeClock()
    lim = PeerRateLimiter(rate=10.0, burst=1, max_waiting=100, clock=clock)

    first = lim.reserve("p", max_wait=0.25)
    waits = [lim.reserve("p", max_wait=0.25) for _ in range(4)]

    assert first == 0.0
    assert waits[:2] == pytest.approx([0.1, 0.2])
    assert waits[2:] == [None, None]  # 0.3 s and more: past the call's deadline
    assert lim.refused == 2


def test_rate_limit_refuses_beyond_the_held_calls_of_one_connection() -> None:
    lim = PeerRateLimiter(rate=1.0, burst=1, max_waiting=2, clock=FakeClock())
    assert lim.reserve("p", 60.0) == 0.0

    async def main() -> float | None:
        holding = [asyncio.create_task(lim.hold("p", 60.0)) for _ in range(2)]
        await asyncio.sleep(0)
        assert lim.held("p") == 2
        try:
            return lim.reserve("p", 60.0)
        finally:
            for t in holding:
                t.cancel()
            await asyncio.gather(*holding, return_exceptions=True)

    assert run(main()) is None
    assert lim.held("p") == 0


def test_rate_limit_forgets_quiet_connections_when_full() -> None:
    clock = FakeClock()
    lim = PeerRateLimiter(rate=10.0, burst=2, clock=clock, max_peers=3)
    for i in range(3):
        lim.reserve(f"p{i}", 5.0)
    clock.now += 1.0

    lim.reserve("new", 5.0)

    assert lim.peers() == ["new"]


def test_control_calls_of_one_connection_are_paced_and_bulk_calls_are_not() -> None:
    rate, burst, calls = 5.0, 2, 8
    sec = dataclasses.replace(SecurityConfig(), peer_call_rate=rate, peer_call_burst=burst)

    async def main() -> tuple[float, float, list[grpc.StatusCode]]:
        async with nodes_with(sec) as (a,):

            def timed(method: tuple[str, bool, bool], payload: list[bytes]) -> tuple[float, list[Any]]:
                with raw_channel(a.address) as ch:
                    call_raw(ch, ("/gossip.proto.Gossip/Status", False, False), [b""])  # connect
                    t0 = time.monotonic()
                    codes = [call_raw(ch, method, payload) for _ in range(calls)]
                    return time.monotonic() - t0, codes

            bulk_s, bulk_codes = await asyncio.to_thread(
                timed, ("/gossip.proto.Gossip/Exchange", True, True), [b"junk"]
            )
            await asyncio.sleep(burst / rate)  # the connecting calls' tokens come back
            control_s, control_codes = await asyncio.to_thread(
                timed, ("/gossip.proto.Gossip/Status", False, False), [b""]
            )
            assert set(bulk_codes) == {grpc.StatusCode.INVALID_ARGUMENT}
            return bulk_s, control_s, control_codes

    bulk_s, control_s, control_codes = run(main())
    assert set(control_codes) == {grpc.StatusCode.OK}  # held, not refused
    assert control_s >= (calls - burst) / rate - 0.05
    assert bulk_s < (calls - burst) / rate
