from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from ._config import ApiKey
from ._errors import send_error

__all__ = ["ApiKeyMiddleware", "key_name"]

_KEY_NAME = "llamacpp_ha.key_name"
# The monitor's HTML holds no data (it asks for a key and fetches /monitor/data with it), so a
# browser must be able to load it without one.
_ALWAYS_PUBLIC = frozenset({"/", "/monitor"})


def key_name(scope: Scope) -> str:
    """The name of the key that authenticated this request (``-`` without authentication)."""
    return str(scope.get("state", {}).get(_KEY_NAME, "-"))


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` with a configured key, on every path but the exempt ones.

    The presented key is compared with every configured key in constant time, so the time taken
    tells nothing about which key, or how much of one, matched. CORS preflights never reach this
    middleware when origins are configured (the CORS middleware outside it answers them); any other
    ``OPTIONS`` needs a key like every method, so a 405 cannot map the routes for a stranger. Keys
    are never logged; the matching key's name goes in the request's state.
    """

    def __init__(self, app: ASGIApp, keys: list[ApiKey], exempt_paths: list[str]) -> None:
        self.app = app
        self._keys = [(key.key.get_secret_value().encode(), key.name) for key in keys]
        self._exempt = frozenset(exempt_paths) | _ALWAYS_PUBLIC

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        name = self._match(scope)
        if name is None:
            message = "Invalid or missing API key: send 'Authorization: Bearer <key>'."
            await send_error(send, 401, message, "authentication_error", "invalid_api_key")
            return
        scope.setdefault("state", {})[_KEY_NAME] = name
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> str | None:
        presented = b""
        for header, value in scope["headers"]:
            if header == b"authorization":
                presented = value.removeprefix(b"Bearer ").strip()
                break
        matched = None
        for key, name in self._keys:
            if hmac.compare_digest(presented, key) and matched is None:
                matched = name
        return matched
