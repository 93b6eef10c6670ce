"""Processes under test: the fake upstream and the gateway, each its own process group.

Everything started here is stopped by `Stack.close()` (SIGTERM to the group, then SIGKILL),
which the `with` block and the signal handlers of the scripts guarantee. CPU time and
resident memory are read from `/proc/<pid>`, so they are the gateway's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import msgspec

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
KEY_ENV = "BENCH_UPSTREAM_KEY"  # not TOKENRELAY_*: those are settings


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise the soft open-files limit (inherited by the children) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process and every process below it (uvicorn's workers, say)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue  # gone meanwhile
        todo.extend(children.get(current, ()))
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of one process."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class Child:
    """One started process in its own session (process group), with its stdout lines."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        inherit_output: bool = False,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(prefix=f"{name}-")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=None if inherit_output else subprocess.PIPE,
            stderr=None if inherit_output else self.log,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_line(self, prefix: str, timeout: float = 15.0) -> str:
        """The rest of the first stdout line starting with `prefix`."""
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = stdout.readline().decode()
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not print {prefix!r}: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def start_fake(tokens: int = 64, pace: float = 0.02) -> tuple[Child, str, str]:
    """The fake upstream with its control API: (child, base URL, control URL)."""
    argv = [sys.executable, "-m", "tests.fakeupstream", "--port", "0", "--control-port", "0"]
    argv += ["--tokens", str(tokens), "--pace", str(pace), "--uvloop"]
    child = Child("fakeupstream", argv)
    try:
        url = child.read_line("listening on ")
        control = child.read_line("control on ")
    except BaseException:
        child.stop()
        raise
    return child, url, control


def start_floor(upstream: str) -> tuple[Child, str]:
    """The byte pipe of `loadtests.floor` in front of `upstream`: (child, base URL)."""
    argv = [sys.executable, "-m", "loadtests.floor", "--upstream", upstream, "--port", "0"]
    child = Child("floor", argv)
    try:
        url = child.read_line("listening on ")
    except BaseException:
        child.stop()
        raise
    return child, url


GATEWAY_CONFIG = """\
demo = false

[server]
log_level = "warning"

{max_streams}
[websocket]
max_streams = {ws_streams}

# Every other limit is the default: one client address running hundreds of streams is not
# capped without keys, and refusals are counted. The one exception is a per-socket rate, not a
# cap: the load generator's sockets each carry 8 streams, and with one-token answers back to
# back each sends ~150 `chat.start` frames a second.
[limits]
ws_frames_per_second = 100000

[[providers]]
name = "fake"
kind = "openai"
base_url = "{upstream}/v1"
api_key_env = "{key_env}"
max_connections = {max_connections}
first_token_timeout = 120.0
idle_timeout = 120.0
"""


def start_gateway(
    upstream: str,
    *,
    max_connections: int = 8000,
    ws_streams: int = 64,
    env: dict[str, str] | None = None,
    max_streams: int | None = None,
    workers: int = 1,
    tree: Path = ROOT,
    kind: str = "openai",
) -> tuple[Child, str, float]:
    """A gateway process in front of `upstream`: (child, base URL, seconds until ready).

    `max_streams` sets `[server] max_streams` (0: no cap); None keeps the default. `env` adds
    environment variables (settings as `TOKENRELAY_…`). With `workers` > 1,
    `tokenrelay serve --workers N`: the child is uvicorn's supervisor and the workers are its
    children (`tree_cpu_seconds` counts them all). `tree` is the checkout whose code it runs
    (`python -m server` imports the tree it runs in). `kind` is the provider's: "openai" (the
    fake's Chat Completions) or "anthropic" (its Messages API)."""
    config = tempfile.NamedTemporaryFile(
        "w", prefix="tokenrelay-bench-", suffix=".toml", delete=False
    )
    with config:
        template = GATEWAY_CONFIG
        if kind == "anthropic":  # the SDK adds /v1/messages to the bare address
            template = template.replace('kind = "openai"', 'kind = "anthropic"')
            template = template.replace('"{upstream}/v1"', '"{upstream}"')
        config.write(
            template.format(
                upstream=upstream,
                key_env=KEY_ENV,
                max_connections=max_connections,
                ws_streams=ws_streams,
                max_streams="" if max_streams is None else f"max_streams = {max_streams}",
            )
        )
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--config", config.name, "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    child = Child("gateway", argv, env={KEY_ENV: "sk-bench-unused", **(env or {})}, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(child, port)
    except BaseException:
        child.stop()
        raise
    finally:
        os.unlink(config.name)
    return child, url, ready


def start_redis() -> tuple[Child, str]:
    """A redis-server on a free loopback port, persisting nothing: (child, its URL)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make system-deps installs it)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = Child("redis", argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return child, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.02)
    child.stop()
    raise RuntimeError(f"redis-server did not listen on {port}: {child.stderr_tail()}")


def _wait_ready(child: Child, port: int, timeout: float = 20.0) -> float:
    """Seconds from spawning until `/healthz` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited: {child.stderr_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - child.started_at
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError("the gateway did not become ready")


class Stack:
    """Every process a run started; `close()` stops them all, newest first."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def remove(self, child: Child) -> None:
        child.stop()
        self.children.remove(child)

    def close(self) -> None:
        while self.children:
            self.children.pop().stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def stop_on_signals() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so `finally` stops the children.

    SIGINT too, as a shell starts background jobs with it ignored.
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


class Control:
    """The fake upstream's control API (see `python -m tests.fakeupstream --help`)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._addr = (host, int(port))

    async def _call(self, method: str, path: str, body: bytes = b"") -> Any:
        reader, writer = await asyncio.open_connection(*self._addr, limit=1 << 26)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nhost: control\r\ncontent-length: {len(body)}\r\n"
                "\r\n".encode()
                + body
            )
            raw = await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"control {method} {path}: {raw[:200]!r}")
        return msgspec.json.decode(payload)

    async def script(self, model: str, **fields: Any) -> None:
        await self._call("PUT", f"/scripts/{model}", msgspec.json.encode(fields))

    async def requests(self, times: bool = False) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = await self._call(
            "GET", "/requests?times=1" if times else "/requests"
        )
        return records

    async def forget(self) -> None:
        await self._call("DELETE", "/requests")


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b to two places, None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def cores() -> int:
    """The CPUs this process (and what it starts) may run on."""
    return len(os.sched_getaffinity(0))


def ceilings(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float | None]:
    """How far `--workers 2` could go beyond one worker on this machine's cores, from the
    figures of a one-worker and a two-worker run (`streams_per_s`, and `all_cpu_per_stream_ms`:
    the CPU every process of the run spent per stream: gateway, load, upstream):

    - `at_one_worker_costs`: were each stream to cost every process what it cost with one
      worker, the cores would run this many times one worker's streams per second: the most
      two workers could show here, with nothing dearer per stream;
    - `at_two_worker_costs`: the same at what each stream cost with two workers; the measured
      ratio falls short of it only by the CPU left idle.
    """
    rate = one.get("streams_per_s")

    def at(cost_ms: float | None) -> float | None:
        return ratio(cores() / (cost_ms / 1e3), rate) if cost_ms else None

    return {
        "at_one_worker_costs": at(one.get("all_cpu_per_stream_ms")),
        "at_two_worker_costs": at(two.get("all_cpu_per_stream_ms")),
    }


def ceiling_rows(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any, Any, str]]:
    """The bench table's rows of a `ceilings` result (in `figures["ceiling"]`)."""
    found = figures.get("ceiling") or {}
    return [
        (f"{prefix}the machine's ceiling, 2 workers vs 1, at {label}", "", times(value), "", "")
        for label, value in (
            ("one worker's CPU per stream", found.get("at_one_worker_costs")),
            ("two workers' CPU per stream", found.get("at_two_worker_costs")),
        )
    ]


def times(value: float | None) -> str:
    """A ratio as the tables print it ("1.5x"), empty when missing."""
    return "" if value is None else f"{value:g}x"
