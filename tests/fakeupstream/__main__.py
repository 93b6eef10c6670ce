"""Run the fake upstream as a process: ``python -m tests.fakeupstream --port 0 --tokens 64``.

With ``--control-port`` a second loopback listener lets a load generator in another process
script models and read what the fake saw (the same records the in-process tests read):

- ``PUT /scripts/<model>`` with a JSON object of `Script` fields scripts that model;
- ``GET /requests`` returns every recorded request as a JSON array (``?times=1`` adds each
  request's ``delta_times``); ``time.monotonic`` values are comparable across processes;
- ``DELETE /requests`` forgets the records (a long benchmark keeps memory flat).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import msgspec

from tests.fakeupstream.formats import FakeToolCall
from tests.fakeupstream.server import FakeUpstream, RecordedRequest, Script, check_loopback

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakeupstream",
        description="A fake OpenAI/Anthropic upstream on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=8, help="content deltas per response")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between deltas")
    parser.add_argument(
        "--first-token-delay", type=float, default=0.0, help="seconds before the first delta"
    )
    parser.add_argument(
        "--headers-delay", type=float, default=0.0, help="seconds before the response headers"
    )
    parser.add_argument("--models", default="", help="comma-separated model ids for /v1/models")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require this key (bearer or x-api-key); without it any key is accepted",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop when it is installed")
    parser.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="also serve the control API (scripts, recorded requests) here; 0 picks a free port",
    )
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _record(req: RecordedRequest, times: bool) -> dict[str, Any]:
    body = req.body if isinstance(req.body, dict) else {}
    out: dict[str, Any] = {
        "path": req.path,
        "model": req.model,
        "user": body.get("user"),
        "stream": req.stream,
        "status": req.status,
        "started_at": req.started_at,
        "deltas_sent": req.deltas_sent,
        "first_delta_at": req.delta_times[0] if req.delta_times else None,
        "last_delta_at": req.delta_times[-1] if req.delta_times else None,
        "completed": req.completed,
        "disconnected_at": req.disconnected_at,
    }
    if times:
        out["delta_times"] = req.delta_times
    return out


class _Control:
    """A tiny HTTP/1.1 control API (one request per connection) over the running fake."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            status, body = self.route(method, target, raw)
        except (ValueError, msgspec.DecodeError, TypeError) as exc:
            status, body = 400, _encode({"error": str(exc)})
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b" % (status, len(body), body)
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    def route(self, method: str, target: str, raw: bytes) -> tuple[int, bytes]:
        path, _, query = target.partition("?")
        if path == "/requests" and method == "GET":
            times = "times=1" in query
            return 200, _encode([_record(r, times) for r in self.upstream.requests])
        if path == "/requests" and method == "DELETE":
            self.upstream.requests.clear()
            return 200, b"{}"
        if path.startswith("/scripts/") and method == "PUT":
            fields = _decode(raw) if raw else {}
            if fields.get("tool_calls") is not None:
                fields["tool_calls"] = msgspec.convert(fields["tool_calls"], list[FakeToolCall])
            self.upstream.scripts[path[len("/scripts/") :]] = Script(**fields)
            return 200, b"{}"
        return 404, b'{"error": "unknown control route"}'


async def _serve(args: argparse.Namespace) -> None:
    default = Script(
        tokens=args.tokens,
        pace=args.pace,
        first_token_delay=args.first_token_delay,
        headers_delay=args.headers_delay,
    )
    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    upstream = FakeUpstream(
        host=args.host, port=args.port, api_key=args.api_key, models=models, default=default
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with upstream:
        print(f"listening on {upstream.url}", flush=True)
        control = None
        if args.control_port is not None:
            control = await asyncio.start_server(
                _Control(upstream).handle, upstream.host, args.control_port
            )
            port = control.sockets[0].getsockname()[1]
            print(f"control on http://{upstream.host}:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            if control is not None:
                control.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed; using asyncio", file=sys.stderr)
        else:
            uvloop.run(_serve(args))
            return 0
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
