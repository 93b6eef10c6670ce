"""Running the real `tokenrelay serve` command as a child process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("TOKENRELAY_", "PROMETHEUS_"))
    and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """A running gateway process: its URL and everything it has written to stderr so far."""

    url: str
    proc: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def serve_process(
    config: str | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    ready_path: str = "/healthz",
) -> Iterator[Served]:
    """Start `python -m server serve` with `config` (TOML text); stop it (SIGINT, then kill)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "server", "serve", "--port", str(port), *args]
        if config is not None:
            path = Path(tmp) / "tokenrelay.toml"
            path.write_text(config)
            command += ["--config", str(path)]
        proc = subprocess.Popen(
            command,
            env={**CLEAN_ENV, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        served = Served(f"http://127.0.0.1:{port}", proc)
        assert proc.stderr is not None
        stderr = proc.stderr
        reader = threading.Thread(
            target=lambda: served.output.extend(iter(lambda: stderr.readline().decode(), "")),
            daemon=True,
        )
        reader.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, f"the gateway exited:\n{served.log}"
                try:
                    if httpx2.get(served.url + ready_path).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                assert time.monotonic() < deadline, f"the gateway did not come up:\n{served.log}"
                time.sleep(0.05)
            yield served
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                reader.join(timeout=5)
                stderr.close()
