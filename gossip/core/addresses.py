"""What a user writes for where a node listens and how fast it may send: checked, one line each.

``HOST:PORT`` addresses to dial, endpoints to bind, and link rates in tc's units.
Pure text handling; a bad one is a :class:`~gossip.core.errors.ConfigError`.
"""

from __future__ import annotations

import math

from gossip.core.errors import ConfigError

_RATE_UNITS = {
    # tc's units: *bit are bits per second, *bps bytes per second.
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}


def parse_rate(spec: str) -> float:
    """Bytes per second of a rate such as ``50mbit``, ``1gbit`` or ``2mbps`` (tc's units).

    Raises ConfigError with the reason for anything else.
    """
    text = spec.strip().lower()
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if not 0 < value < math.inf:
                raise ConfigError(f"rate {spec!r} must be positive")
            return value * _RATE_UNITS[unit]
    raise ConfigError(
        f"rate {spec!r} is not a number with a unit: bit, kbit, mbit, gbit (bits per second) "
        "or bps, kbps, mbps, gbps (bytes per second), e.g. 50mbit"
    )


def check_address(addr: str, what: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: {addr!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {addr!r} has an invalid port")


def metrics_address(spec: str, what: str) -> tuple[str, int]:
    """(host, port) of an HTTP endpoint to bind: ``HOST:PORT``, ``[V6]:PORT``, or ``:PORT`` and
    ``PORT`` on 127.0.0.1 (loopback unless told otherwise). Port 0 picks a free port."""
    text = spec.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    bracketed = host.startswith("[") and host.endswith("]")
    host = (host[1:-1] if bracketed else host) or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {spec!r} is not HOST:PORT, :PORT or PORT (a port from 0 to 65535)")
    allowed = ".-_:" if bracketed else ".-_"  # an IPv6 host goes in brackets
    if not all(c.isascii() and (c.isalnum() or c in allowed) for c in host):
        raise ConfigError(f"{what}: {spec!r} has an invalid host")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
