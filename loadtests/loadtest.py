"""One command for a locust load test: fake upstream, gateway, locust headless, reports.

    python -m loadtests.loadtest [--users 50] [--spawn-rate 25] [--run-time 30s] \\
        [--sse-weight 1] [--ws-weight 1] [--cancel-share 0.2] [--out loadtests/results/locust]

Writes `<out>/locust_stats.csv` (and the other locust CSVs) and `<out>/report.html`, and
prints how many streams and sockets the gateway refused (429/503). Every
process it starts runs in its own process group and is stopped at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from loadtests import harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadtest", description=__doc__)
    parser.add_argument("--users", type=int, default=50, help="concurrent users (bounded)")
    parser.add_argument("--spawn-rate", type=float, default=25.0, help="users started per second")
    parser.add_argument("--run-time", default="30s", help="locust run time, e.g. 30s or 2m")
    parser.add_argument("--sse-weight", type=int, default=1)
    parser.add_argument("--ws-weight", type=int, default=1)
    parser.add_argument("--cancel-share", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=64, help="deltas per answer upstream")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between deltas")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/locust"))
    args = parser.parse_args(argv)
    if not 0 < args.users <= 10_000:
        parser.error("--users must be between 1 and 10000")
    harness.raise_fd_limit()
    harness.stop_on_signals()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    with harness.Stack() as stack:
        try:
            fake, upstream, control = harness.start_fake(args.tokens, args.pace)
            stack.add(fake)
            gateway, url, ready = harness.start_gateway(upstream)
            stack.add(gateway)
            print(f"fake upstream {upstream}, gateway {url} (ready in {ready:.2f} s)", flush=True)
            locust = [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(harness.ROOT / "loadtests" / "locustfile.py"),
                "--headless",
                "--only-summary",
                "--host",
                url,
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.spawn_rate),
                "--run-time",
                args.run_time,
                "--stop-timeout",
                "10",
                "--csv",
                str(out / "locust"),
                "--html",
                str(out / "report.html"),
                "--sse-weight",
                str(args.sse_weight),
                "--ws-weight",
                str(args.ws_weight),
                "--cancel-share",
                str(args.cancel_share),
                "--fake-control",
                control,
            ]
            runner = stack.add(harness.Child("locust", locust, inherit_output=True))
            code = runner.proc.wait()
        except KeyboardInterrupt:
            print("interrupted; stopping everything started", file=sys.stderr)
            return 130
    print(f"refused (429/503): {refusals(out / 'locust_stats.csv')} (0 expected at defaults)")
    print(f"reports in {out}: locust_stats.csv, report.html (locust exit status {code})")
    return code


def refusals(stats: Path) -> int:
    """Streams and sockets the gateway refused, from the `refused` entries of the run."""
    if not stats.exists():
        return 0
    with stats.open() as f:
        rows = csv.DictReader(f)
        return sum(int(row["Failure Count"]) for row in rows if row["Name"] == "refused")


if __name__ == "__main__":
    sys.exit(main())
