"""The address a client reached the gateway on, for answers that show how to call it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from providers import demo

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

# A Host header worth repeating: a name or an address, and a port; anything else is ignored.
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
_SCHEMES = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def public_url(scope: Scope) -> str | None:
    """`scheme://host[:port]` as the client addressed it (its Host header), else the socket's."""
    scheme = _SCHEMES.get(scope.get("scheme", "http"), "http")
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1")
            if _HOST.match(host):
                return f"{scheme}://{host}"
            break
    server = scope.get("server")
    if not server or server[1] is None:
        return None
    host, port = server
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


class PublicAddress:
    """ASGI middleware: lets the demo provider's example name the address really in use."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        url = public_url(scope) if scope["type"] in ("http", "websocket") else None
        if url is None:
            await self.app(scope, receive, send)
            return
        token = demo.GATEWAY_URL.set(url)
        try:
            await self.app(scope, receive, send)
        finally:
            demo.GATEWAY_URL.reset(token)
