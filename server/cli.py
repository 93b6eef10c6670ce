"""The `tokenrelay` command: `serve`, `classifier` and `check-config`."""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from server.settings import ENV_PREFIX, Settings, SettingsError, load, uvicorn_options


def _load_or_report(config: str | None) -> Settings | None:
    try:
        return load(config, os.environ)
    except SettingsError as exc:
        count = len(exc.problems)
        print(
            f"tokenrelay: the configuration has {count} problem{'' if count == 1 else 's'}:",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return 2
    host = args.host or settings.server.host
    if not settings.auth.keys and not _is_loopback(host) and not args.allow_unauthenticated:
        print(
            f"tokenrelay: refusing to serve on {host} without gateway keys: anyone who can "
            "reach it could spend the providers' credit. Add keys to [auth] keys (see "
            "`tokenrelay create-key`), bind a loopback address, or pass "
            "--allow-unauthenticated if something in front of the gateway authenticates.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    if args.config:
        # Workers rebuild the app from the environment, so they must see the same file.
        os.environ[ENV_PREFIX + "CONFIG"] = os.path.abspath(args.config)
    if args.workers > 1:
        # Each worker writes its metrics to files here and /metrics aggregates them; the
        # directory is new for every run and removed at exit.
        metrics_dir = tempfile.mkdtemp(prefix="tokenrelay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    uvicorn.run(
        "server.app:app_from_environment",
        factory=True,
        host=host,
        port=args.port or settings.server.port,
        workers=args.workers,
        **uvicorn_options(settings),
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return 2
    names = ", ".join(f"{p.name} ({p.kind})" for p in settings.providers) or "none"
    print(f"configuration OK; providers: {names}")
    return 0


def _classifier(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from server.classification import service

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(service.serve(args.host, args.port, grace=args.grace))
    return 0


def _create_key(args: argparse.Namespace) -> int:
    from server.auth import digest, new_key

    key = new_key()
    print(f"key:    {key}")
    print(f"digest: {digest(key)}")
    print("Give the key to its user; put only the digest in [auth] keys.", file=sys.stderr)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenrelay")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenrelay", description="A realtime LLM chat gateway.")
    parser.add_argument("--version", action="version", version=f"tokenrelay {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to bind (default from settings: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default from settings: 8000)")
    serve.add_argument("--config", help="TOML settings file (or TOKENRELAY_CONFIG)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback address without [auth] keys",
    )
    serve.set_defaults(run=_serve)
    classifier = commands.add_parser(
        "classifier", help="run the model-classification gRPC service (SIGTERM stops it gracefully)"
    )
    classifier.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    classifier.add_argument("--port", type=int, default=50051, help="port; 0 picks one (50051)")
    classifier.add_argument(
        "--grace", type=float, default=5.0, help="seconds calls in flight get on stop (5)"
    )
    classifier.set_defaults(run=_classifier)
    create = commands.add_parser(
        "create-key", help="make a gateway key; prints it and the digest for [auth] keys"
    )
    create.set_defaults(run=_create_key)
    check = commands.add_parser(
        "check-config", help="validate the settings and report every problem"
    )
    check.add_argument("--config", help="TOML settings file (or TOKENRELAY_CONFIG)")
    check.set_defaults(run=_check_config)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
