"""Errors that cross layers, named without any transport.

A status is a gRPC status code *name* (``"UNAVAILABLE"``, ``"INVALID_ARGUMENT"``):
the protocols and the store decide on names, and only the transport edge turns
them into ``grpc.StatusCode`` values, so nothing above it imports grpc.

:class:`ConfigError` is what every check of a user's input raises (one line, exit 2).
"""

from __future__ import annotations


class PeerError(Exception):
    """A call to a peer failed; ``code`` is the status code's name."""

    def __init__(self, address: str, code: str, details: str) -> None:
        super().__init__(f"{address}: {code}: {details}")
        self.address = address
        self.code = code
        self.details = details


class Refused(Exception):
    """A receiving side refuses a message; the servicer answers with status ``code``.

    Raised by the exchange protocols and the store's handlers; nothing of the
    receiver's state has changed when it is raised.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the culprit."""
