"""The benchmark and the locust run, once at tiny sizes, so they cannot rot.

They run as the commands a developer uses; only their reports are checked, never a timing.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bench_writes_its_table_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run(["loadtests.bench", "--tiny", "--out", str(out)], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for scenario in ("ttft_c1", "load", "fixed_cost", "memory", "capacity", "cancel"):
        assert scenario in figures, scenario
    assert figures["load"]["gateway-sse"]["chunks"] > 0
    assert figures["load"]["gateway-ws"]["chunks"] > 0
    assert all(c["cancelled"] > 0 for c in figures["cancel"].values())
    assert "TTFB p50 c=1, gateway-sse (ms)" in done.stdout
    assert "cancel->upstream p99" in done.stdout


def test_locust_run_writes_csv_and_html(tmp_path: Path) -> None:
    argv = ["loadtests.loadtest", "--users", "4", "--spawn-rate", "4", "--run-time", "3s"]
    argv += ["--tokens", "8", "--pace", "0.01", "--cancel-share", "0.5", "--out", str(tmp_path)]
    done = run(argv, timeout=120)
    assert (tmp_path / "report.html").stat().st_size > 0, done.stderr[-3000:]
    with (tmp_path / "locust_stats.csv").open() as f:
        entries = {(row["Type"], row["Name"]) for row in csv.DictReader(f)}
    for kind in ("SSE", "WS"):
        assert (kind, "ttft") in entries, entries
        assert (kind, "gap") in entries, entries
