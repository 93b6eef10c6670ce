"""Removing credentials from every log line, whoever wrote it.

The gateway never logs a key itself, but libraries may: uvicorn logs each WebSocket handshake
with its query string at info level, and at debug level its WebSocket implementation prints
every handshake header. A client may put its key anywhere (`?token=`, `X-Auth-Token`, a bare
subprotocol, a mis-capitalised `bearer`), so this does not go by header names alone: anything
shaped like a gateway key (`trk-…`), an upstream key (`sk-…`, `sk-ant-…`) or either of them in
base64, any bearer token, the value of any credential-like header or query parameter and the
browser's `tokenrelay.auth.<key>` subprotocol are replaced. The formatters run this over each
whole line, message, fields and traceback alike.
"""

from __future__ import annotations

import logging
import re

_REDACTED = "[redacted]"
_HEADER = re.compile(
    r"(?im)^([<>]?\s*(?:proxy-)?(?:authorization|[\w-]*api-key|[\w-]*auth[\w-]*|[\w-]*token"
    r"|cookie|set-cookie)\s*:\s*).*$"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;\"']+")
_SUBPROTOCOL = re.compile(r"(?i)(tokenrelay\.auth\.)[A-Za-z0-9_\-=+/]*")
# Keys as `tokenrelay create-key` and the upstreams make them, and the same keys in base64
# (`trk-` encodes as `dHJrL…`, `sk-` as `c2st…`).
_KEY = re.compile(r"(?i)\b(?:trk|sk)-[A-Za-z0-9_\-]{8,}|\b(?:dHJrL|c2st)[A-Za-z0-9_\-+/]{16,}=*")
_QUERY = re.compile(
    r"(?i)([?&;][^=&\s\"']*(?:token|key|auth|secret|password|passwd|signature|sig)"
    r"[^=&\s\"']*=)[^&\s\"']+"
)


def redact_credentials(text: str) -> str:
    """`text` with everything credential-shaped replaced (see the module docstring)."""
    text = _HEADER.sub(r"\1" + _REDACTED, text)
    text = _BEARER.sub(r"\1" + _REDACTED, text)
    text = _SUBPROTOCOL.sub(r"\1" + _REDACTED, text)
    text = _QUERY.sub(r"\1" + _REDACTED, text)
    return _KEY.sub(_REDACTED, text)


class SecretFilter(logging.Filter):
    """Attached to the log handler: rewrites each record's message without credentials (the
    formatters also redact the whole formatted line, fields and traceback included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_credentials(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
