"""The UI's files at `/`: MIME types, security headers, no escape from `static/`, API untouched."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from server.ui import STATIC_DIR


def get(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A raw request, so paths such as `/../x` reach the server unnormalised."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/js/main.js", "text/javascript; charset=utf-8"),
        ("/vendor/dompurify/purify.es.mjs", "text/javascript; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ],
)
def test_files_have_their_type_and_the_security_headers(
    gateway: str, path: str, media_type: str
) -> None:
    status, headers, body = get(gateway, path)
    assert status == 200 and body
    assert headers["content-type"] == media_type
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "img-src 'self' data:" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"


def test_the_page_has_no_inline_script_or_style() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert "<script" in html
    for line in html.splitlines():
        if "<script" in line:
            assert 'src="' in line and "></script>" in line
    assert "<style" not in html and " style=" not in html and "onclick" not in html


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/vendor/..%2f..%2fpyproject.toml",
        "/js/%2e%2e/%2e%2e/server/app.py",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
    ],
)
def test_no_path_escapes_the_static_directory(gateway: str, path: str) -> None:
    status, _, body = get(gateway, path)
    assert status == 404
    assert b"[project]" not in body and b"root:" not in body and b"create_app" not in body


def test_api_routes_keep_their_own_answers(gateway: str) -> None:
    status, headers, body = get(gateway, "/api/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    # API answers carry the strictest policy: they are data, never a page.
    assert headers["content-security-policy"].startswith("default-src 'none'")
    status, _, body = get(gateway, "/api/chat/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    status, headers, _ = get(gateway, "/api/models")
    assert status == 200 and headers["content-security-policy"].startswith("default-src 'none'")
    status, _, body = get(gateway, "/missing.js")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, _ = get(gateway, "/", method="POST")
    assert status == 405


def test_vendored_libraries_are_listed_with_licences() -> None:
    vendor = STATIC_DIR / "vendor"
    versions = (vendor / "VERSIONS").read_text()
    for name, licence in (
        ("marked", "marked/LICENSE"),
        ("dompurify", "dompurify/LICENSE"),
        ("@highlightjs/cdn-assets", "highlight/LICENSE"),
    ):
        assert f"\n{name} " in versions
        assert (vendor / licence).stat().st_size > 500
