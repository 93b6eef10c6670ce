"""Running a real uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

DEFAULTS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "ws": "websockets-sansio",
    "lifespan": "on",
    "timeout_graceful_shutdown": 2,
}


@contextlib.contextmanager
def serve_in_thread(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    options: dict[str, Any] | None = None,
    servers: list[uvicorn.Server] | None = None,
) -> Iterator[str]:
    """Serve `app` with uvicorn until the block ends; yields the base URL.

    `servers`, when given, receives the uvicorn server (for its connection and task counts).
    """
    config = uvicorn.Config(app, **{**DEFAULTS, **(options or {}), "log_level": "warning"})
    server = uvicorn.Server(config)
    if servers is not None:
        servers.append(server)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="gateway", daemon=True
        )
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.005)
            yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
