"""Native load: wrk against gateways whose upstream is nginx serving one static SSE answer.

The Python load generator and fake upstream share the machine's cores with the gateway; these
two C programs need far less CPU per stream, so more of the machine is left to the gateway.
Both come from Debian (`make system-deps`); without them the run fails, it does not skip.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from loadtests import harness

SCRIPT = Path(__file__).with_name("wrk_stream.lua")
PATH = "/api/chat/completions"
WORKERS = {"1 worker": 1, "2 workers": 2}
_MISSING = "{} is not installed: `make system-deps` installs it (Debian's {} package)"

NGINX_CONFIG = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths}    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/event-stream; return 200 "{body}"; }}
    }}
}}
"""


def tools() -> tuple[str, str]:
    """The paths of wrk and nginx (`TOKENRELAY_NGINX` first, as the tests do)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError(_MISSING.format("wrk", "wrk"))
    nginx = os.environ.get("TOKENRELAY_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise RuntimeError(_MISSING.format(f"nginx ({nginx})", "nginx"))
    return wrk, nginx


def sse_body(tokens: int, model: str = "short") -> str:
    """A whole Chat Completions stream: a role chunk, `tokens` content chunks, a finish chunk."""
    head = {"id": "chatcmpl-native", "object": "chat.completion.chunk", "created": 1}

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        data = msgspec.json.encode({**head, "model": model, "choices": [choice]})
        return f"data: {data.decode()}\n\n"

    pieces = [chunk({"role": "assistant", "content": ""})]
    pieces += [chunk({"content": f" tok{i}"}) for i in range(tokens)]
    pieces += [chunk({}, "stop"), "data: [DONE]\n\n"]
    return "".join(pieces)


class Nginx(harness.Child):
    """nginx in the foreground, its master and worker in one process group, its files in a
    directory of its own that `stop()` removes."""

    def __init__(self, binary: str, body: str, port: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="tokenrelay-bench-nginx-")
        root = Path(self.dir.name)
        root.chmod(0o755)  # started as root, the worker runs as another user
        temp_paths = ""
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / name).mkdir()
            (root / name).chmod(0o777)
            temp_paths += f"    {name}_temp_path {root / name};\n"
        if "$" in body:
            raise ValueError("nginx would read `$` in the body as a variable")
        quoted = body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        conf = root / "nginx.conf"
        conf.write_text(
            NGINX_CONFIG.format(dir=root, temp_paths=temp_paths, port=port, body=quoted)
        )
        try:
            super().__init__("nginx", [binary, "-p", str(root), "-c", str(conf), "-e", "stderr"])
        except BaseException:
            self.dir.cleanup()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self.dir.cleanup()


def start_nginx(binary: str, body: str) -> tuple[Nginx, str]:
    """nginx answering every request with `body`: (child, base URL)."""
    port = harness.free_port()
    child = Nginx(binary, body, port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return child, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    child.stop()
    raise RuntimeError(f"nginx did not listen on {port}: {child.stderr_tail()}")


@dataclass(frozen=True, kw_only=True)
class WrkRun:
    """One wrk run against one gateway, with the CPU each process spent meanwhile."""

    answers: int
    incomplete: int
    socket_errors: int
    requests_per_s: float
    wall: float
    gateway_cpu: float
    wrk_cpu: float
    nginx_cpu: float


_LINES = {
    "requests_per_s": re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M),
    "answers": re.compile(r"^answers: (\d+)$", re.M),
    "incomplete": re.compile(r"^incomplete answers: (\d+)$", re.M),
    "socket_errors": re.compile(r"^socket errors: (\d+)$", re.M),
}


def parse(output: str) -> dict[str, float]:
    """wrk's Requests/sec and the counts the script prints; a missing line is an error."""
    found: dict[str, float] = {}
    for key, pattern in _LINES.items():
        match = pattern.search(output)
        if match is None:
            raise RuntimeError(f"wrk printed no {pattern.pattern!r} line:\n{output}")
        found[key] = float(match.group(1))
    return found


def run_wrk(
    wrk: str, stack: harness.Stack, url: str, connections: int, seconds: int, pids: tuple[int, int]
) -> WrkRun:
    """wrk with one thread for `seconds` against the gateway at `url`; `pids` are the
    gateway's and nginx's, whose process trees' CPU is read from `/proc`. wrk's own CPU is
    what this process's waited-for children gained meanwhile (wrk is the only one)."""
    gateway, nginx = pids
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["-s", str(SCRIPT), url + PATH]
    g0, n0 = harness.tree_cpu_seconds(gateway), harness.tree_cpu_seconds(nginx)
    t0 = time.monotonic()
    child = stack.add(harness.Child("wrk", argv))
    try:
        # Read after the spawn: a Popen may reap a stray earlier child, never after it.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, _ = child.proc.communicate(timeout=seconds + 30)
        wall = time.monotonic() - t0
        g1, n1 = harness.tree_cpu_seconds(gateway), harness.tree_cpu_seconds(nginx)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        status, errors = child.proc.returncode, child.stderr_tail()
    finally:
        stack.remove(child)  # killed, when it overran
    output = out.decode(errors="replace")
    if status != 0:
        raise RuntimeError(f"wrk exited with {status}:\n{output}{errors}")
    found = parse(output)
    if found["incomplete"] or found["socket_errors"]:
        raise RuntimeError(
            f"wrk against {url}: {found['incomplete']:.0f} of {found['answers']:.0f} answers "
            f"incomplete (not 200 or without `data: [DONE]`), {found['socket_errors']:.0f} "
            f"socket errors:\n{output}{errors}"
        )
    return WrkRun(
        answers=int(found["answers"]),
        incomplete=int(found["incomplete"]),
        socket_errors=int(found["socket_errors"]),
        requests_per_s=found["requests_per_s"],
        wall=wall,
        gateway_cpu=g1 - g0,
        wrk_cpu=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        nginx_cpu=n1 - n0,
    )


def compare_workers(
    stack: harness.Stack, *, tokens: int, connections: int, seconds: int, rounds: int, tree: Path
) -> dict[str, Any]:
    """One- and two-worker gateways in front of nginx, under wrk, alternating for `rounds`."""
    wrk, binary = tools()
    nginx, upstream = start_nginx(binary, sse_body(tokens))
    stack.add(nginx)
    started: list[harness.Child] = []
    try:
        gateways: dict[str, tuple[int, str]] = {}
        for name, workers in WORKERS.items():
            child, url, _ = harness.start_gateway(upstream, workers=workers, tree=tree)
            started.append(stack.add(child))
            gateways[name] = (child.pid, url)
        time.sleep(2.0)  # both workers up, not just the first to answer
        runs: dict[str, list[WrkRun]] = {name: [] for name in gateways}
        for _ in range(rounds):
            for name, (pid, url) in gateways.items():
                runs[name].append(run_wrk(wrk, stack, url, connections, seconds, (pid, nginx.pid)))
    finally:
        for child in reversed(started):
            stack.remove(child)
        stack.remove(nginx)
    out: dict[str, Any] = {"connections": connections, "tokens": tokens, "seconds": seconds}
    out.update({name: _figures(phases) for name, phases in runs.items()})
    one, two = out["1 worker"], out["2 workers"]
    out["ratio"] = _ratio(two["streams_per_s"], one["streams_per_s"])
    # With the load on other cores, each worker would get a core: two workers would relay
    # twice as fast as one, less what each stream costs more with two.
    one_cost, two_cost = one["gateway_cpu_per_stream_ms"], two["gateway_cpu_per_stream_ms"]
    projected = _ratio(2 * one_cost, two_cost) if one_cost is not None else None
    out["projected_ratio"] = projected
    out["ceiling"] = harness.ceilings(one, two)
    return out


def _figures(runs: list[WrkRun]) -> dict[str, Any]:
    answers = sum(r.answers for r in runs)
    loaded = sum(r.answers / r.requests_per_s for r in runs if r.requests_per_s)  # wrk's -d
    wall = sum(r.wall for r in runs)  # wrk's whole life, over which CPU was read
    gateway = sum(r.gateway_cpu for r in runs)
    everything = gateway + sum(r.wrk_cpu + r.nginx_cpu for r in runs)
    return {
        "streams": answers,
        "streams_per_s": round(answers / loaded, 1) if loaded else 0.0,
        "rounds_streams_per_s": [r.requests_per_s for r in runs],
        "incomplete": sum(r.incomplete for r in runs),
        "socket_errors": sum(r.socket_errors for r in runs),
        "gateway_cpu_cores": round(gateway / wall, 3),
        "wrk_cpu_cores": round(sum(r.wrk_cpu for r in runs) / wall, 3),
        "nginx_cpu_cores": round(sum(r.nginx_cpu for r in runs) / wall, 3),
        "gateway_cpu_per_stream_ms": round(gateway / answers * 1e3, 3) if answers else None,
        "all_cpu_per_stream_ms": round(everything / answers * 1e3, 3) if answers else None,
    }


def rows(figures: dict[str, Any] | None) -> list[tuple[str, Any, Any, Any, str]]:
    """The bench table's rows of a `compare_workers` result."""
    if not figures:
        return []
    c, n = figures["connections"], figures["tokens"]
    out: list[tuple[str, Any, Any, Any, str]] = []
    for name in WORKERS:
        rate = figures[name]["streams_per_s"]
        out.append((f"native load: {n}-token streams/s c={c}, {name}", "", rate, "", ""))
    out.append(("native load: streams/s, 2 workers vs 1", "", _x(figures["ratio"]), "", ">= 1.7x"))
    for name in WORKERS:
        bad = figures[name]["incomplete"]
        out.append((f"native load: incomplete answers, {name}", "", bad, "", "0"))
    for name in WORKERS:
        f = figures[name]
        cpu = f"{f['gateway_cpu_cores']} / {f['wrk_cpu_cores']} / {f['nginx_cpu_cores']}"
        out.append((f"native load: CPU gateway / wrk / nginx, {name} (cores)", "", cpu, "", ""))
    for name in WORKERS:
        cost = figures[name]["gateway_cpu_per_stream_ms"]
        out.append((f"native load: gateway CPU per stream, {name} (ms)", "", cost, "", ""))
    out += harness.ceiling_rows(figures, "native load: ")
    # Not measured: what the per-stream costs above give if the load ran on other cores.
    label = "native load: PROJECTED 2 workers vs 1, load on other cores"
    out.append((label, "", _x(figures["projected_ratio"]), "", ""))
    return out


_ratio = harness.ratio


_x = harness.times
