"""Security headers on every HTTP response: no sniffing, no referrer, no framing, a strict CSP.

Added by the request middleware (`server.observe.RequestObserver`) as a response starts, in
the same send wrapper as the request id, so a streamed chunk passes through one wrapper only.

HTML (the bundled UI) may load scripts, styles, images and connections from its own origin
only; everything else (JSON, SSE, metrics) may load nothing at all. No CORS headers are ever
added, so a page on another origin cannot read any response.
"""

from __future__ import annotations

UI_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
    b"form-action 'self'; frame-ancestors 'none'"
)
API_POLICY = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_COMMON = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def add_security_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Add the headers above to a response's raw header list (an endpoint's own values win)."""
    present = {name.lower() for name, _ in headers}
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    policy = UI_POLICY if content_type.startswith(b"text/html") else API_POLICY
    for name, value in (*_COMMON, (b"content-security-policy", policy)):
        if name not in present:
            headers.append((name, value))
