"""Transport security: TLS and mutual TLS from PEM files, a shared token, exposure checks.

One :class:`Security` holds what a node or a CLI client loaded from the files of
its :class:`~gossip.config.SecurityConfig`:

- ``--tls-cert``/``--tls-key``: the node serves TLS with this certificate, and its
  own outgoing calls present it.
- ``--tls-ca``: the CA that signs the cluster's certificates. Outgoing calls verify
  the peer's certificate against it, and the server *requires* a client
  certificate signed by it (mutual TLS). Without it, outgoing calls verify peers
  against the system's trust store (certificates from a public CA) and the server
  asks for no client certificate.
- Peers are dialled by their advertised ``HOST:PORT``; HOST must be one of the
  certificate's subject alternative names (``IP:10.0.0.1`` or ``DNS:node1.lan``),
  or the handshake fails.
- ``--token-file``: a shared secret. Every call carries ``authorization: Bearer
  <token>``; a server interceptor checks it on every RPC, before any handler runs
  or any request is read, and answers UNAUTHENTICATED when it is missing or wrong.
  The token lives only in :attr:`Security.token` (hidden from ``repr``) and in the
  metadata; it is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from gossip.config import ConfigError, SecurityConfig
from gossip.transport.channels import TOKEN_HEADER, TOKEN_SCHEME
from gossip.transport.ratelimit import PeerRateLimiter
from gossip.transport.server import refusing_handler

# A token is a password, not a document: long enough for 256 random bits in any
# encoding, short enough that a mistaken path (a whole key file) is caught.
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class Security:
    """Credentials and token loaded from files; the empty default is plaintext without a token."""

    server_credentials: grpc.ServerCredentials | None = None
    channel_credentials: grpc.ChannelCredentials | None = None
    token: str = field(default="", repr=False)
    # Control calls per second and burst one connection gets, and all of them together
    # (see PeerRateLimiter); a peer_call_rate of 0 = no limit at all.
    peer_call_rate: float = 0.0
    peer_call_burst: int = 1
    node_call_rate: float = 0.0
    node_call_burst: int = 1

    @property
    def tls(self) -> bool:
        return self.server_credentials is not None or self.channel_credentials is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every outgoing call carries."""
        return ((TOKEN_HEADER, TOKEN_SCHEME + self.token),) if self.token else ()

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """A new rate limit outermost (it meters refused calls too), then the token check."""
        out: list[grpc.aio.ServerInterceptor] = []
        if self.peer_call_rate > 0:
            limiter = PeerRateLimiter(
                self.peer_call_rate,
                self.peer_call_burst,
                total_rate=self.node_call_rate or math.inf,
                total_burst=self.node_call_burst if self.node_call_rate else math.inf,
            )
            out.append(limiter)
        if self.token:
            out.append(TokenInterceptor(self.token))
        return out


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_token(path: str) -> str:
    """The token in ``path``: one line of printable ASCII, surrounding whitespace ignored."""
    raw = _read(path, "--token-file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: the token must be printable ASCII") from None
    if not token:
        raise ConfigError(f"--token-file {path} is empty")
    # gRPC metadata values are printable ASCII; a newline inside means a wrong file.
    if not all(" " <= c <= "~" for c in token):
        raise ConfigError(f"--token-file {path}: the token must be one line of printable ASCII")
    if len(token) > MAX_TOKEN_CHARS:
        raise ConfigError(f"--token-file {path}: the token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def _check_pair(cert: str, key: str) -> None:
    """Fail now, with one line, when the files are not a PEM certificate and its own key."""
    try:
        # An empty password: an encrypted key fails here instead of prompting (gRPC
        # cannot use one either).
        ssl.create_default_context().load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key ({exc.reason or exc})"
        ) from None


def _check_ca(ca: str) -> None:
    try:
        ssl.create_default_context().load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-ca {ca}: not a PEM CA certificate ({exc.reason or exc})") from None


def load(cfg: SecurityConfig, serving: bool) -> Security:
    """Read and check the files of ``cfg``; ConfigError (one line) on anything unusable.

    ``serving``: for a node, which needs a certificate to serve TLS; a CLI client
    (``gossip status``) may give only ``--tls-ca`` to verify the node it asks.
    """
    cfg.validate(serving)
    token = read_token(cfg.token_file) if cfg.token_file else ""
    ca = _read(cfg.tls_ca, "--tls-ca") if cfg.tls_ca else None
    cert = _read(cfg.tls_cert, "--tls-cert") if cfg.tls_cert else None
    key = _read(cfg.tls_key, "--tls-key") if cfg.tls_key else None
    if ca is not None:
        _check_ca(cfg.tls_ca)
    if cert is not None:
        _check_pair(cfg.tls_cert, cfg.tls_key)
    server_credentials = None
    channel_credentials = None
    if serving and cert is not None and key is not None:
        server_credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
    if cert is not None or ca is not None:
        # root_certificates=None: gRPC's default roots (the system's, or
        # GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
    return Security(
        server_credentials,
        channel_credentials,
        token,
        cfg.peer_call_rate,
        cfg.peer_call_burst,
        cfg.node_call_rate,
        cfg.node_call_burst,
    )


# --- the token check ---------------------------------------------------------------


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC must carry ``authorization: Bearer <token>``; otherwise UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = (TOKEN_SCHEME + token).encode()
        self._refusal = refusing_handler(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def __repr__(self) -> str:
        return "TokenInterceptor(<hidden>)"

    def authorized(self, metadata: Any) -> bool:
        values = [v for k, v in (metadata or ()) if k == TOKEN_HEADER]
        if len(values) != 1:
            return False
        got = values[0]
        got_bytes = got if isinstance(got, bytes) else str(got).encode("utf-8", "surrogateescape")
        # Constant time: a wrong guess tells nothing about how much of it was right.
        return hmac.compare_digest(got_bytes, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        # Also for unknown methods: without the token a caller learns nothing, not even
        # which methods exist.
        return self._refusal


# --- exposure ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: assume it resolves to something reachable


def exposure_warning(listen: str, security: Security) -> str | None:
    """The warning to give when ``listen`` is reachable from other machines with no protection."""
    host = listen.rpartition(":")[0]
    if is_loopback(host) or security.server_credentials is not None or security.token:
        return None
    return (
        f"listening on {listen} without TLS or a token: anyone who can reach this address "
        "can read this model and change it (see --tls-cert/--tls-key/--tls-ca and --token-file)"
    )


def loopback_warning(address: str, peers: tuple[str, ...]) -> str | None:
    """The warning to give when a node tells peers on other machines to dial it on loopback."""
    remote = [p for p in peers if not is_loopback(p.rpartition(":")[0])]
    if not remote or not is_loopback(address.rpartition(":")[0]):
        return None
    return (
        f"this node advertises {address}, a loopback address, but its peers ({', '.join(remote[:3])}) are "
        "not on this machine: they cannot reach it; give --listen 0.0.0.0:PORT --advertise THIS_HOST:PORT"
    )
