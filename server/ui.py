"""The bundled browser UI: `static/` served at `/` with a strict Content-Security-Policy."""

from __future__ import annotations

from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Model output is untrusted, so the page may run only its own files: no inline script or style,
# no remote images, fonts or connections, and no framing.
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "cache-control": "no-cache",
}
# The platform's MIME database can be wrong (`.js` as text/plain on some systems), and with
# `nosniff` a wrong type stops a module from loading, so the UI's own types are fixed here.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
}


class SecureStatic:
    """Pure ASGI wrapper: adds the security headers and fixed MIME types to static responses."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no socket lives here: refuse it as an unknown route
            await WebSocketClose()(scope, receive, send)
            return
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        name = path.rsplit("/", 1)[-1]
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ".html"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
                media_type = MEDIA_TYPES.get(suffix)
                if media_type is not None and message["status"] in (200, 304):
                    headers["content-type"] = media_type
            await send(message)

        await self._app(scope, receive, send_with_headers)


class _UIMount(Mount):
    """A mount at `/` that leaves `/api/...` (and `/v1/...`, where API clients pointed at the
    host rather than at `/api` land) alone, so the API keeps its own 404 and 405 answers."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        if path in ("/api", "/v1") or path.startswith(("/api/", "/v1/")):
            return Match.NONE, {}
        return super().matches(scope)


def ui_mount(directory: Path = STATIC_DIR) -> Mount:
    """The UI's files at `/`, `index.html` for `/`; paths outside `directory` are never served."""
    # check_dir=False: an install without `static/` still serves the API (and 404 at `/`).
    files = StaticFiles(directory=directory, html=True, follow_symlink=False, check_dir=False)
    return _UIMount("/", SecureStatic(files))
