"""Run the fake upstream as a process: ``python -m tests.fakeupstream --port 0 --tokens 64``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tests.fakeupstream.server import FakeUpstream, Script, check_loopback


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeupstream", description=__doc__)
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
    parser.add_argument("--api-key", default=None, help="require this key (bearer or x-api-key)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop when it is installed")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    return args


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
        await stop.wait()


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
