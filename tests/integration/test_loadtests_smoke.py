"""The benchmark and the locust run, once at tiny sizes, so they cannot rot.

They run as the commands a developer uses; only their reports are checked, never a timing.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from tests.support.redis import redis_binary

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
    for scenario in (
        "ttft_c1",
        "c1_streams",
        "load",
        "fixed_cost",
        "memory",
        "capacity",
        "cancel",
        "overload",
        "messages",
        "responses",
        "workers",
    ):
        assert scenario in figures, scenario
    # At the default settings one load generator's streams are never refused.
    for target in ("gateway-sse", "gateway-ws"):
        assert figures["load"][target]["refused"] == 0
        assert figures["fixed_cost"][target]["refused"] == 0
    assert "refused (429/503), load, gateway-sse" in done.stdout
    assert "cancel->upstream p99 @12 offered" in done.stdout
    assert figures["c1_streams"]["gateway-sse"]["streams_per_s"] > 0
    assert figures["workers"]["2 workers"]["streams"] > 0
    # The same under wrk, nginx serving the upstream's answer: every answer whole.
    native = figures["workers"]["native"]
    for name in ("1 worker", "2 workers"):
        assert native[name]["streams"] > 0, native
        assert native[name]["incomplete"] == 0, native
        assert native[name]["socket_errors"] == 0, native
        for process in ("gateway", "wrk", "nginx"):
            assert native[name][f"{process}_cpu_cores"] > 0, native
        assert native[name]["gateway_cpu_per_stream_ms"] > 0, native
    assert native["ratio"] > 0 and native["projected_ratio"] > 0, native
    assert "native load: PROJECTED 2 workers vs 1" in done.stdout
    # What the machine leaves room for, from every process's CPU per stream.
    lines = done.stdout.splitlines()
    for workers, prefix in ((figures["workers"], ""), (native, "native load: ")):
        for name in ("1 worker", "2 workers"):
            assert workers[name]["all_cpu_per_stream_ms"] > 0, workers
        assert all(value > 0 for value in workers["ceiling"].values()), workers
        for costs in ("one worker's", "two workers'"):
            label = f"{prefix}the machine's ceiling, 2 workers vs 1, at {costs} CPU per stream"
            assert any(line.startswith(label) for line in lines), label
    assert figures["load"]["gateway-sse"]["chunks"] > 0
    # Every stream's TTFB split at the fake upstream: to it, in it, back to the client.
    for target in ("direct-sse", "floor-sse", "gateway-sse", "gateway-ws"):
        split = figures["load"][target]["ttft_split"]
        assert set(split) == {"to_upstream", "upstream", "from_upstream"}, split
        assert all(leg["n"] > 0 and leg["p50_ms"] >= 0 for leg in split.values()), split
    assert "TTFB p99 to upstream / in it / back" in done.stdout
    assert figures["load"]["gateway-ws"]["chunks"] > 0
    # The floor (a byte pipe to the fake upstream) relays whole answers in both scenarios.
    for scenario in ("c1_streams", "load"):
        floor = figures[scenario]["floor-sse"]
        assert floor["chunks"] > 0 and floor["errors"] == 0, floor
    assert "over the floor, gateway-sse" in done.stdout
    assert figures["messages"]["load"]["gateway-messages"]["chunks"] > 0
    assert figures["messages"]["load"]["gateway-messages"]["errors"] == 0
    assert figures["responses"]["load"]["gateway-responses"]["chunks"] > 0
    assert figures["responses"]["load"]["gateway-responses"]["errors"] == 0
    assert all(c["cancelled"] > 0 for c in figures["cancel"].values())
    assert "TTFB p50 c=1, gateway-sse (ms)" in done.stdout
    assert "cancel->upstream p99" in done.stdout


def test_locust_run_writes_csv_and_html(tmp_path: Path) -> None:
    argv = ["loadtests.loadtest", "--users", "4", "--spawn-rate", "4", "--run-time", "3s"]
    argv += ["--tokens", "8", "--pace", "0.01", "--cancel-share", "0.5", "--out", str(tmp_path)]
    done = run(argv, timeout=120)
    assert (tmp_path / "report.html").stat().st_size > 0, done.stderr[-3000:]
    assert "refused (429/503): 0" in done.stdout
    with (tmp_path / "locust_stats.csv").open() as f:
        entries = {(row["Type"], row["Name"]) for row in csv.DictReader(f)}
    for kind in ("SSE", "WS"):
        assert (kind, "ttft") in entries, entries
        assert (kind, "gap") in entries, entries


def test_catalogue_benchmark_counts_the_work_sharing_saves() -> None:
    redis_binary()  # it starts a redis-server: skipped without one locally, failed in CI
    argv = ["loadtests.bench_catalog", "--replicas", "2", "--periods", "2", "--models", "10"]
    done = run([*argv, "--samples", "2"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line[:14].strip(): line[14:].split()
        for line in done.stdout.splitlines()
        if line.startswith(("per process", "shared Redis"))
    }
    # Alone, each replica lists and classifies every period; shared, each lists once at start,
    # then one lists per period for both, and each model is classified once per period.
    assert rows == {"per process": ["4", "40"], "shared Redis": ["3", "20"]}
    assert "refresh from Redis" in done.stdout


def test_cache_key_benchmark_runs() -> None:
    done = run(["loadtests.bench_cache_keys", "--repeat", "50"], timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "json" in done.stdout.lower()


def test_hostile_client_benchmark_runs() -> None:
    done = run(["loadtests.bench_hostile", "--size", "1", "--frames", "2000"], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("memory:", "continuation frames:", "pings:", "stalled sse", "stalled ws"):
        assert line in done.stdout, done.stdout


def test_write_path_benchmark_runs() -> None:
    done = run(["loadtests.bench_write", "--rounds", "1"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in ("race", "sse write", "ws frame, websockets' protocol", "ws frame, own framing"):
        assert f"{step} " in done.stdout, done.stdout


def test_side_by_side_benchmark_runs_on_both_provider_kinds() -> None:
    """`bench_ab` against this checkout twice: every figure, for each side, for each kind."""
    root = str(Path(__file__).resolve().parents[2])
    for kind in ("openai", "anthropic"):
        done = run(["loadtests.bench_ab", root, root, "--tiny", "--kind", kind], timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        for figure in ("CPU per request, sse", "CPU per request, json", "CPU per request, ws"):
            assert done.stdout.count(figure) == 2, done.stdout
        assert done.stdout.count("CPU per chunk, 100 paced") == 2, done.stdout
        assert done.stdout.count("TTFB c=1, SSE") == 2, done.stdout
