"""Which headers a proxy must not pass on: the one list both faces use."""

from __future__ import annotations

__all__ = ["CREDENTIAL_HEADERS", "HOP_BY_HOP"]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers about one connection only (RFC 9110 7.6.1): never forwarded, in either direction."""

CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
"""The caller's credentials: replaced by a backend's own key, and the server's key never leaves it."""
