"""A logging filter that removes credentials from every line, whoever wrote it.

The gateway never logs a key itself, but libraries may: at debug level uvicorn's WebSocket
implementation prints every handshake header, `Authorization` and the browser's
`tokenrelay.auth.<key>` subprotocol among them. Header values, bearer tokens and auth
subprotocols are replaced before the line is formatted.
"""

from __future__ import annotations

import logging
import re

_HEADER = re.compile(
    r"(?im)^([<>]?\s*(?:proxy-)?(?:authorization|x-api-key|api-key|cookie|set-cookie)\s*:\s*).*$"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;\"']+")
_SUBPROTOCOL = re.compile(r"(tokenrelay\.auth\.)[A-Za-z0-9_\-=+/]*")


def redact_credentials(text: str) -> str:
    """`text` with header values, bearer tokens and auth subprotocols replaced."""
    text = _HEADER.sub(r"\1[redacted]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    return _SUBPROTOCOL.sub(r"\1[redacted]", text)


class SecretFilter(logging.Filter):
    """Attached to the log handler: rewrites each record's message without credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_credentials(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
