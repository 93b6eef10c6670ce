"""Benchmark: the same scenarios straight against the fake upstream and through the gateway.

    python -m loadtests.bench [--tiny] [--out FILE] [--only NAME ...] [--profile DIR] [--tree DIR]

Starts the fake upstream and a gateway (one uvicorn worker) as separate processes, runs each
scenario alternately direct and through the gateway, prints a table and writes the figures as
JSON. Gateway CPU and memory come from `/proc/<pid>`. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests import harness, native
from loadtests.clients import Result, SSEClient, WSClient, percentile
from server.settings import ServerSettings

DIRECT, GW_SSE, GW_WS, GW_JSON = "direct-sse", "gateway-sse", "gateway-ws", "gateway-json"
GW_MSG = "gateway-messages"  # Anthropic's Messages API, SSE, to the same OpenAI-kind upstream
GW_RSP = "gateway-responses"  # OpenAI's Responses API, SSE, to the same OpenAI-kind upstream
GW_RES = "gateway-resumable"  # Chat Completions SSE, resumable: journalled in memory and Redis
FLOOR = "floor-sse"  # the upstream through `loadtests.floor`, a byte pipe: the least a relay costs
WS_STREAMS_PER_SOCKET = 8


@dataclass
class Sizes:
    """How big each scenario runs; `tiny` is for CI (seconds), `full` for figures."""

    c1_requests: int = 300
    load_concurrency: int = 200
    load_seconds: float = 5.0
    load_rounds: int = 2
    fixed_concurrency: int = 50
    fixed_seconds: float = 3.0
    memory_levels: tuple[int, ...] = (1000, 5000)
    capacity_levels: tuple[int, ...] = (100, 200, 300, 400, 600, 800, 1200, 1600)
    cancel_levels: tuple[int, ...] = (50, 1000)
    overload_streams: int = 1000
    tokens: int = 64
    pace: float = 0.02
    c1_seconds: float = 3.0
    c1_rounds: int = 2
    workers_concurrency: int = 32
    workers_seconds: float = 4.0
    workers_rounds: int = 2
    workers_tokens: int = 8
    native_seconds: int = 4  # per wrk run (whole seconds: wrk takes no fraction)


TINY = Sizes(
    c1_requests=10,
    load_concurrency=10,
    load_seconds=0.6,
    load_rounds=1,
    fixed_concurrency=4,
    fixed_seconds=0.5,
    memory_levels=(20, 40),
    capacity_levels=(10,),
    cancel_levels=(5,),
    overload_streams=12,
    tokens=8,
    pace=0.01,
    c1_seconds=0.5,
    c1_rounds=1,
    workers_concurrency=4,
    workers_seconds=0.5,
    workers_rounds=1,
    native_seconds=1,
)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summary(values: list[float]) -> dict[str, float | None]:
    """p50/p99/max in milliseconds."""
    return {
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values)) if values else None,
        "n": len(values),
    }


@dataclass
class Phase:
    """CPU and wall time of the processes while one phase ran."""

    wall: float = 0.0
    gateway_cpu: float = 0.0
    fake_cpu: float = 0.0
    client_cpu: float = 0.0
    results: list[Result] = field(default_factory=list)
    gc: dict[str, float] | None = None  # the gateway's cycle collector (see `_gc_reading`)


_GC_SERIES = {
    "python_gc_collections_total": "collections",
    "python_gc_objects_collected_total": "freed",
    "tokenrelay_gc_pause_seconds_count": "timed",
    "tokenrelay_gc_pause_seconds_sum": "paused_s",
}


def _gc_reading(base_url: str) -> dict[str, float] | None:
    """The gateway's cycle collector so far, from its `/metrics` (summed over generations):
    runs, objects it freed, and runs timed by the gateway with their total and how many took
    over 5 ms. None where the figures are not exported (several workers)."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if line.startswith("tokenrelay_gc_pause_seconds_bucket") and 'le="0.005"' in rest:
            out["within_5ms"] = out.get("within_5ms", 0.0) + float(line.rsplit(" ", 1)[1])
        elif name in _GC_SERIES:
            key = _GC_SERIES[name]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    if "collections" not in out:
        return None
    if "timed" in out:
        out["over_5ms"] = out["timed"] - out.pop("within_5ms", 0.0)
    return out


def _gc_figures(phases: list[Phase], streams: int) -> dict[str, Any] | None:
    """The gateway's cycle collector over some phases: runs, objects freed per stream, and
    (where the gateway times them) pauses in all and over 5 ms."""
    readings = [p.gc for p in phases if p.gc is not None]
    if not readings:
        return None
    total = {k: sum(r.get(k, 0.0) for r in readings) for k in readings[0]}
    timed = "timed" in total
    return {
        "collections": int(total["collections"]),
        "freed_per_stream": round(total.get("freed", 0.0) / streams, 1) if streams else None,
        "paused_ms": round(total["paused_s"] * 1e3, 1) if timed else None,
        "pauses_over_5ms": int(total["over_5ms"]) if timed else None,
    }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(
        self,
        sizes: Sizes,
        stack: harness.Stack,
        profile: Path | None,
        max_streams: int | None = None,
        overload_caps: tuple[int | None, ...] = (0, None),
        tree: Path = harness.ROOT,
    ) -> None:
        self.sizes = sizes
        self.stack = stack
        self.profile = profile
        self.max_streams = max_streams  # `[server] max_streams` of the main gateway (None: default)
        self.overload_caps = overload_caps  # the gateways `overload` compares (None: default)
        self.tree = tree  # the checkout whose gateway is measured
        self.fake: harness.Child
        self.gateway: harness.Child
        self.floor: harness.Child
        self.floor_url = ""
        self.control: harness.Control
        self.fake_url = ""
        self.gateway_url = ""
        self.figures: dict[str, Any] = {}

    # -- plumbing -------------------------------------------------------------------------

    def client(self, target: str) -> SSEClient:
        if target == DIRECT:
            return SSEClient.for_url(self.fake_url, "/v1/chat/completions")
        if target == FLOOR:
            return SSEClient.for_url(self.floor_url, "/v1/chat/completions")
        if target == GW_MSG:
            return SSEClient.for_url(self.gateway_url, "/api/v1/messages", dialect="messages")
        if target == GW_RSP:
            return SSEClient.for_url(self.gateway_url, "/api/responses", dialect="responses")
        if target == GW_RES:
            resumable = "x-tokenrelay-resumable: true\r\n"
            return SSEClient.for_url(self.gateway_url, "/api/chat/completions", headers=resumable)
        return SSEClient.for_url(self.gateway_url, "/api/chat/completions")

    @staticmethod
    def model(target: str, name: str) -> str:
        return name if target in (DIRECT, FLOOR) else f"fake/{name}"

    async def measure(
        self, run: Callable[[], Awaitable[list[Result]]], target: str = GW_SSE
    ) -> Phase:
        """Run a phase; its `gateway_cpu` is the floor's when `target` is the floor."""
        relay = self.floor.pid if target == FLOOR else self.gateway.pid
        gc0 = _gc_reading(self.gateway_url) if _gateway(target) else None
        g0, f0 = harness.cpu_seconds(relay), harness.cpu_seconds(self.fake.pid)
        c0, t0 = _self_cpu(), time.monotonic()
        results = await run()
        phase = Phase(
            wall=time.monotonic() - t0,
            gateway_cpu=harness.cpu_seconds(relay) - g0,
            fake_cpu=harness.cpu_seconds(self.fake.pid) - f0,
            client_cpu=_self_cpu() - c0,
            results=results,
        )
        gc1 = _gc_reading(self.gateway_url) if gc0 is not None else None
        if gc0 is not None and gc1 is not None:
            phase.gc = {k: gc1[k] - gc0.get(k, 0.0) for k in gc1}
        return phase

    async def one_shot(
        self, target: str, model: str, count: int, spread: float, cancel_after: Callable[[int], int]
    ) -> list[Result]:
        """`count` streams started evenly over `spread` seconds; each its own connection."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        sockets: list[WSClient] = []

        async def sse(i: int) -> Result:
            await asyncio.sleep(max(0.0, start + spread * i / count - loop.time()))
            client = self.client(target)
            try:
                return await client.chat(self.model(target, model), cancel_after=cancel_after(i))
            finally:
                client.close()

        async def ws(i: int) -> Result:
            await asyncio.sleep(max(0.0, start + spread * i / count - loop.time()))
            socket = sockets[i // WS_STREAMS_PER_SOCKET]
            return await socket.chat(self.model(target, model), cancel_after=cancel_after(i))

        if target == GW_WS:
            n = math.ceil(count / WS_STREAMS_PER_SOCKET)
            sockets.extend(
                await asyncio.gather(*(WSClient.open(self.gateway_url) for _ in range(n)))
            )
        try:
            return list(await asyncio.gather(*((ws if sockets else sse)(i) for i in range(count))))
        finally:
            await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)

    async def closed_loop(
        self, target: str, model: str, concurrency: int, seconds: float, stagger: float
    ) -> list[Result]:
        """`concurrency` workers, each sending its next request as soon as one ends."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + stagger + seconds
        results: list[Result] = []
        stream = target != GW_JSON
        sockets: list[WSClient] = []
        if target == GW_WS:
            n = math.ceil(concurrency / WS_STREAMS_PER_SOCKET)
            sockets.extend(
                await asyncio.gather(*(WSClient.open(self.gateway_url) for _ in range(n)))
            )

        async def worker(i: int) -> None:
            await asyncio.sleep(stagger * i / concurrency)
            client = None if sockets else self.client(target)
            try:
                while loop.time() < deadline:
                    if client is None:
                        r = await sockets[i // WS_STREAMS_PER_SOCKET].chat(
                            self.model(target, model)
                        )
                    else:
                        r = await client.chat(self.model(target, model), stream=stream)
                    results.append(r)
            finally:
                if client is not None:
                    client.close()

        try:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        finally:
            await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
        return results

    @contextlib.contextmanager
    def profiled(self, name: str, seconds: float) -> Any:
        """py-spy samples the gateway for `seconds` while the block runs (with --profile)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.profile is None or not os.path.exists(spy):
            yield
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.profile / f"{name}.txt"
        # Without stopping the process to read each sample: stopped, it is caught mostly on
        # its way out of system calls, and those lines come out several times too heavy.
        argv = [spy, "record", "--pid", str(self.gateway.pid), "--rate", "250", "--nonblocking"]
        argv += ["--duration", str(max(1, int(seconds))), "--format", "raw", "-o", str(out)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            try:
                proc.wait(timeout=seconds + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- scenarios ------------------------------------------------------------------------

    async def ttft_c1(self) -> None:
        """Concurrency 1: the same short stream alternately direct, via SSE, via WebSocket."""
        await self.control.script("c1", tokens=8, pace=0.002)
        sse = {t: self.client(t) for t in (DIRECT, GW_SSE)}
        ws = await WSClient.open(self.gateway_url)
        samples: dict[str, list[float]] = {DIRECT: [], GW_SSE: [], GW_WS: []}
        try:
            for i, order in _c1_rounds(list(samples), self.sizes.c1_requests + 10):
                for target in order:
                    if target == GW_WS:
                        r = await ws.chat(self.model(target, "c1"))
                    else:
                        r = await sse[target].chat(self.model(target, "c1"))
                    if i >= 10 and r.ttft is not None and r.error is None:  # 10 warm-ups
                        samples[target].append(r.ttft)
        finally:
            await ws.close()
            for client in sse.values():
                client.close()
        out: dict[str, Any] = {t: summary(v) for t, v in samples.items()}
        for t in (GW_SSE, GW_WS):
            out[t]["added_p50_ms"] = _minus(out[t]["p50_ms"], out[DIRECT]["p50_ms"])
            out[t]["added_p99_ms"] = _minus(out[t]["p99_ms"], out[DIRECT]["p99_ms"])
        self.figures["ttft_c1"] = out

    async def c1_streams(self) -> None:
        """Concurrency 1, no pacing: whole 64-delta streams back to back, targets alternating.
        Streams per second, and the gateway's CPU per relayed chunk when nothing is waited for."""
        s = self.sizes
        await self.control.script("unpaced", tokens=s.tokens, pace=0.0)
        phases: dict[str, list[Phase]] = {DIRECT: [], FLOOR: [], GW_SSE: [], GW_WS: []}
        for _ in range(s.c1_rounds):
            for target in phases:
                with self.profiled(f"c1-{target}", s.c1_seconds if _gateway(target) else 0):
                    phase = await self.measure(
                        lambda t=target: self.closed_loop(  # type: ignore[misc]
                            t, "unpaced", 1, s.c1_seconds, 0.0
                        ),
                        target,
                    )
                phases[target].append(phase)
                await self.control.forget()
        out: dict[str, Any] = {}
        for target, runs in phases.items():
            figures = self._load_figures(runs, pace=1.0)  # no pacing: nothing counts as stalled
            wall = sum(p.wall for p in runs)
            figures["streams_per_s"] = round((figures["requests"] - figures["errors"]) / wall, 1)
            out[target] = figures
        self.figures["c1_streams"] = {"tokens": s.tokens, **out}

    async def workers(self) -> None:
        """`tokenrelay serve --workers 2` against one worker: streams per second of short
        unpaced streams at fixed concurrency (closed loop), the two gateways alternating; then
        the same under wrk with nginx as the upstream (see `loadtests.native`)."""
        s = self.sizes
        await self.control.script("short", tokens=s.workers_tokens, pace=0.0)
        child, url, _ = harness.start_gateway(self.fake_url, workers=2, tree=self.tree)
        self.stack.add(child)
        try:
            await asyncio.sleep(2.0)  # both workers up, not just the first to answer
            gateways = {"1 worker": (self.gateway, self.gateway_url), "2 workers": (child, url)}
            runs: dict[str, list[tuple[int, float, float, float, float]]] = {
                k: [] for k in gateways
            }
            for _ in range(s.workers_rounds):
                for name, (gateway, gateway_url) in gateways.items():
                    runs[name].append(await self._workers_phase(gateway.pid, gateway_url))
                    await self.control.forget()
        finally:
            self.stack.remove(child)
        out: dict[str, Any] = {"concurrency": s.workers_concurrency, "tokens": s.workers_tokens}
        for name, phases in runs.items():
            done = sum(p[0] for p in phases)
            wall = sum(p[1] for p in phases)
            out[name] = {
                "streams": done,
                "streams_per_s": round(done / wall, 1),
                "gateway_cpu_share": round(sum(p[2] for p in phases) / wall, 3),
                "client_cpu_share": round(sum(p[3] for p in phases) / wall, 3),
                "fake_cpu_share": round(sum(p[4] for p in phases) / wall, 3),
                # Every process of the run (gateway, load generator, fake upstream), in cores:
                # near the machine's count, the figure measures the machine, not the gateway.
                "machine_busy_cores": round(sum(p[2] + p[3] + p[4] for p in phases) / wall, 2),
                "gateway_cpu_per_stream_ms": round(sum(p[2] for p in phases) / done * 1e3, 3)
                if done
                else None,
                "all_cpu_per_stream_ms": round(
                    sum(p[2] + p[3] + p[4] for p in phases) / done * 1e3, 3
                )
                if done
                else None,
            }
        one, two = out["1 worker"]["streams_per_s"], out["2 workers"]["streams_per_s"]
        out["ratio"] = _ratio(two, one)
        out["ceiling"] = harness.ceilings(out["1 worker"], out["2 workers"])
        # The same comparison with C programs as load and upstream, which leave the gateway
        # more of the machine: fresh gateways in front of nginx, under wrk.
        out["native"] = native.compare_workers(
            self.stack,
            tokens=s.workers_tokens,
            connections=s.workers_concurrency,
            seconds=s.native_seconds,
            rounds=s.workers_rounds,
            tree=self.tree,
        )
        self.figures["workers"] = out

    async def _workers_phase(self, pid: int, url: str) -> tuple[int, float, float, float, float]:
        """(streams done, wall seconds, and the CPU seconds of the gateway, the load generator
        and the fake upstream)."""
        s = self.sizes
        self.gateway_url, kept = url, self.gateway_url
        try:
            g0, c0 = harness.tree_cpu_seconds(pid), _self_cpu()
            f0, t0 = harness.cpu_seconds(self.fake.pid), time.monotonic()
            results = await self.closed_loop(
                GW_SSE, "short", s.workers_concurrency, s.workers_seconds, 0.1
            )
            wall = time.monotonic() - t0
            gateway_cpu = harness.tree_cpu_seconds(pid) - g0
            client_cpu = _self_cpu() - c0
            fake_cpu = harness.cpu_seconds(self.fake.pid) - f0
        finally:
            self.gateway_url = kept
        done = sum(1 for r in results if r.error is None)
        return done, wall, gateway_cpu, client_cpu, fake_cpu

    async def load(self) -> None:
        """Paced streams at fixed concurrency (closed loop), targets alternating by phase."""
        s = self.sizes
        await self.control.script("paced", tokens=s.tokens, pace=s.pace)
        stream_time = s.tokens * s.pace
        phases: dict[str, list[Phase]] = {DIRECT: [], FLOOR: [], GW_SSE: [], GW_WS: []}
        splits: dict[str, list[tuple[float, float, float]]] = {t: [] for t in phases}
        for _ in range(s.load_rounds):
            for target in phases:
                seconds = stream_time + s.load_seconds
                with self.profiled(f"load-{target}", seconds if _gateway(target) else 0):
                    phase = await self.measure(
                        lambda t=target: self.closed_loop(  # type: ignore[misc]
                            t, "paced", s.load_concurrency, s.load_seconds, stream_time
                        ),
                        target,
                    )
                phases[target].append(phase)
                splits[target] += _ttft_split(phase.results, await self.control.requests())
                await self.control.forget()
        out = {t: self._load_figures(p, s.pace) for t, p in phases.items()}
        for t in (FLOOR, GW_SSE, GW_WS):
            d, g = out[DIRECT]["ttft"], out[t]["ttft"]
            out[t]["ttft_p99_ratio"] = _ratio(g["p99_ms"], d["p99_ms"])
            out[t]["ttft_p50_ratio"] = _ratio(g["p50_ms"], d["p50_ms"])
        for t, split in splits.items():
            out[t]["ttft_split"] = {
                leg: summary([legs[i] for legs in split]) for i, leg in enumerate(TTFT_LEGS)
            }
        self.figures["load"] = {"concurrency": s.load_concurrency, **out}

    @staticmethod
    def _load_figures(phases: list[Phase], pace: float) -> dict[str, Any]:
        results = [r for p in phases for r in p.results]
        ok = [r for r in results if r.error is None]
        gaps = [g for r in ok for g in r.gaps()]
        chunks = sum(r.chunks for r in ok)
        cpu = sum(p.gateway_cpu for p in phases)
        wall = sum(p.wall for p in phases)
        return {
            "requests": len(results),
            "errors": len(results) - len(ok),
            "refused": refused(results),
            "chunks": chunks,
            "ttft": summary([r.ttft for r in ok if r.ttft is not None]),
            "gap": summary(gaps),
            "stalled_streams": sum(1 for r in ok if max(r.gaps(), default=0) > 10 * pace),
            "gateway_cpu_s": round(cpu, 3),
            "gateway_cpu_share": round(cpu / wall, 3) if wall else None,
            "cpu_per_chunk_us": round(cpu / chunks * 1e6, 1) if chunks else None,
            "cpu_per_request_ms": round(cpu / len(ok) * 1e3, 3) if ok else None,
            "gc": _gc_figures(phases, len(results)),
            "fake_cpu_share": round(sum(p.fake_cpu for p in phases) / wall, 3) if wall else None,
            "client_cpu_share": round(sum(p.client_cpu for p in phases) / wall, 3)
            if wall
            else None,
        }

    async def fixed_cost(self) -> None:
        """One-token answers back to back: the gateway's CPU per request (streamed and not)."""
        s = self.sizes
        await self.control.script("one", tokens=1, pace=0.0)
        out: dict[str, Any] = {}
        for target in (DIRECT, GW_SSE, GW_WS, GW_JSON):
            with self.profiled(f"fixed-{target}", s.fixed_seconds if target != DIRECT else 0):
                phase = await self.measure(
                    lambda t=target: self.closed_loop(  # type: ignore[misc]
                        t, "one", s.fixed_concurrency, s.fixed_seconds, 0.1
                    )
                )
            await self.control.forget()
            ok = [r for r in phase.results if r.error is None]
            out[target] = {
                "requests": len(phase.results),
                "errors": len(phase.results) - len(ok),
                "refused": refused(phase.results),
                "requests_per_s": round(len(ok) / phase.wall, 1),
                "cpu_per_request_ms": round(phase.gateway_cpu / len(ok) * 1e3, 3) if ok else None,
                "gateway_cpu_share": round(phase.gateway_cpu / phase.wall, 3),
                "client_cpu_share": round(phase.client_cpu / phase.wall, 3),
            }
        load = self.figures.get("load")
        if load is not None:
            tokens = self.sizes.tokens
            for target in (GW_SSE, GW_WS):
                full = load[target]["cpu_per_request_ms"]
                one = out[target]["cpu_per_request_ms"]
                if full is not None and one is not None:
                    # Marginal cost of one more relayed chunk: two request sizes, one line.
                    out[target]["marginal_cpu_per_chunk_us"] = round(
                        (full - one) / (tokens - 1) * 1e3, 1
                    )
        self.figures["fixed_cost"] = out

    async def messages(self) -> None:
        """The Messages route next to the Chat Completions one (see `_beside_chat`)."""
        await self._beside_chat("messages", GW_MSG)

    async def responses(self) -> None:
        """The Responses route next to the Chat Completions one (see `_beside_chat`)."""
        await self._beside_chat("responses", GW_RSP)

    async def resumable(self) -> None:
        """Resumable streams (each event journalled in memory and, batched, in Redis) next to
        plain ones, on a gateway of their own whose `[cache] url` is a fresh redis-server."""
        redis, redis_url = harness.start_redis()
        self.stack.add(redis)
        child, url, _ = harness.start_gateway(
            self.fake_url, env={"TOKENRELAY_CACHE__URL": redis_url}, tree=self.tree
        )
        self.stack.add(child)
        main, main_url = self.gateway, self.gateway_url
        self.gateway, self.gateway_url = child, url
        try:
            await self._beside_chat("resumable", GW_RES)
        finally:
            self.gateway, self.gateway_url = main, main_url
            self.stack.remove(child)
            self.stack.remove(redis)

    async def _beside_chat(self, scenario: str, route: str) -> None:
        """Another dialect's route next to the Chat Completions one: TTFB at c=1, then CPU
        per relayed chunk with paced streams at fixed concurrency, the two routes alternating."""
        s = self.sizes
        await self.control.script("c1", tokens=8, pace=0.002)
        targets = (DIRECT, GW_SSE, route)
        clients = {t: self.client(t) for t in targets}
        samples: dict[str, list[float]] = {t: [] for t in targets}
        try:
            for i, order in _c1_rounds(targets, self.sizes.c1_requests + 10):
                for target in order:
                    r = await clients[target].chat(self.model(target, "c1"))
                    if i >= 10 and r.ttft is not None and r.error is None:  # 10 warm-ups
                        samples[target].append(r.ttft)
        finally:
            for client in clients.values():
                client.close()
        c1: dict[str, Any] = {t: summary(v) for t, v in samples.items()}
        for t in (GW_SSE, route):
            c1[t]["added_p50_ms"] = _minus(c1[t]["p50_ms"], c1[DIRECT]["p50_ms"])
            c1[t]["added_p99_ms"] = _minus(c1[t]["p99_ms"], c1[DIRECT]["p99_ms"])
        await self.control.script("paced", tokens=s.tokens, pace=s.pace)
        stream_time = s.tokens * s.pace
        phases: dict[str, list[Phase]] = {GW_SSE: [], route: []}
        for _ in range(s.load_rounds):
            for target in phases:
                with self.profiled(f"{scenario}-{target}", stream_time + s.load_seconds):
                    phase = await self.measure(
                        lambda t=target: self.closed_loop(  # type: ignore[misc]
                            t, "paced", s.load_concurrency, s.load_seconds, stream_time
                        )
                    )
                phases[target].append(phase)
                await self.control.forget()
        load = {t: self._load_figures(p, s.pace) for t, p in phases.items()}
        self.figures[scenario] = {"c1": c1, "load": load, "concurrency": s.load_concurrency}

    async def memory(self) -> None:
        """A fresh gateway: start-up time, idle RSS, then RSS with many open slow streams (more
        than `max_streams` allows by default: this gateway has no stream cap)."""
        s = self.sizes
        child, url, ready = harness.start_gateway(self.fake_url, max_streams=0, tree=self.tree)
        self.stack.add(child)
        try:
            await asyncio.sleep(0.5)
            out: dict[str, Any] = {
                "ready_s": round(ready, 3),
                "idle_rss_mb": round(harness.rss_bytes(child.pid) / 2**20, 1),
            }
            # Slow enough that 5,000 open streams cost the gateway little CPU (1,000 chunks/s).
            await self.control.script("slow", tokens=120, pace=5.0)
            client_url = url
            tasks: list[asyncio.Task[Result]] = []
            clients: list[SSEClient] = []
            levels: dict[str, Any] = {}
            for level in s.memory_levels:
                began = time.monotonic()
                while len(clients) < level:
                    client = SSEClient.for_url(client_url, "/api/chat/completions")
                    clients.append(client)
                    tasks.append(asyncio.create_task(client.chat("fake/slow")))
                    if len(clients) % 200 == 0:
                        await asyncio.sleep(0.05)  # let the accept queue drain
                opened = await _wait_first_tokens(tasks, clients, seconds=60)
                open_s = time.monotonic() - began
                await asyncio.sleep(1.0)
                levels[str(level)] = {
                    "streams_open": opened,
                    "open_s": round(open_s, 1),
                    "rss_mb": round(harness.rss_bytes(child.pid) / 2**20, 1),
                    "client_rss_mb": round(harness.rss_bytes(os.getpid()) / 2**20, 1),
                }
            lo, hi = s.memory_levels[0], s.memory_levels[-1]
            out["levels"] = levels
            out["kb_per_stream"] = round(
                (levels[str(hi)]["rss_mb"] - levels[str(lo)]["rss_mb"]) * 1024 / (hi - lo), 1
            )
            closed_at = time.monotonic()
            for client in clients:
                client.close()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Every client went away at once: how long until the upstream saw all of them go.
            out["upstream_open_after_close"] = await self._still_open("slow", seconds=60)
            out["close_drain_s"] = round(time.monotonic() - closed_at, 1)
            self.figures["memory"] = out
        finally:
            self.stack.remove(child)
            await self.control.forget()

    async def _still_open(self, model: str, seconds: float) -> int:
        """Upstream requests for `model` not yet closed, after waiting up to `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            records = await self.control.requests()
            still = sum(
                1
                for r in records
                if r["model"] == model and r["disconnected_at"] is None and not r["completed"]
            )
            if still == 0 or time.monotonic() > deadline:
                return still
            await asyncio.sleep(0.2)

    async def capacity(self) -> None:
        """Highest concurrency at which no stream stalls longer than 10x the pacing, on a
        fresh gateway without the `max_streams` cap (what one process relays, uncapped)."""
        async with self.own_gateway(0):
            await self._capacity()

    @contextlib.asynccontextmanager
    async def own_gateway(self, max_streams: int | None) -> AsyncIterator[None]:
        """Run the block against a fresh gateway with this `max_streams` (None: the default)."""
        main = self.gateway, self.gateway_url
        child, self.gateway_url, _ = harness.start_gateway(
            self.fake_url, max_streams=max_streams, tree=self.tree
        )
        self.gateway = self.stack.add(child)
        try:
            yield
        finally:
            self.stack.remove(child)
            self.gateway, self.gateway_url = main

    async def _capacity(self) -> None:
        s = self.sizes
        await self.control.script("cap", tokens=s.tokens, pace=s.pace)
        limit = 10 * s.pace
        passed: dict[str, int] = {DIRECT: 0, GW_SSE: 0, GW_WS: 0}
        failed: set[str] = set()
        levels: list[dict[str, Any]] = []
        for level in s.capacity_levels:
            for target in passed:
                if target in failed:
                    continue
                phase = await self.measure(
                    lambda t=target, n=level: self.one_shot(  # type: ignore[misc]
                        t, "cap", n, spread=1.0, cancel_after=lambda i: None
                    )
                )
                await self.control.forget()
                bad = [
                    r
                    for r in phase.results
                    if r.error is not None
                    or r.ttft is None
                    or r.ttft > limit
                    or max(r.gaps(), default=0) > limit
                ]
                gaps = [g for r in phase.results for g in r.gaps()]
                levels.append(
                    {
                        "target": target,
                        "streams": level,
                        "refused": refused(phase.results),
                        "stalled": len(bad),
                        "ttft": summary([r.ttft for r in phase.results if r.ttft is not None]),
                        "gap_max_ms": ms(max(gaps)) if gaps else None,
                        "gateway_cpu_share": round(phase.gateway_cpu / phase.wall, 3),
                        "client_cpu_share": round(phase.client_cpu / phase.wall, 3),
                    }
                )
                if bad:
                    failed.add(target)
                else:
                    passed[target] = level
            if len(failed) == len(passed):
                break
        self.figures["capacity"] = {
            "stall_limit_ms": ms(limit),
            "sustained": passed,
            "levels": levels,
        }

    async def cancel(self) -> None:
        """Cancel mid-stream: time until the upstream sees its connection closed, tokens after."""
        s = self.sizes
        await self.control.script("long", tokens=2000, pace=s.pace)
        out: dict[str, Any] = {}
        for level in s.cancel_levels:
            for target in (DIRECT, GW_SSE, GW_WS, GW_MSG):
                await self.control.forget()
                phase = await self.measure(
                    lambda t=target, n=level: self.one_shot(  # type: ignore[misc]
                        t, "long", n, spread=1.0, cancel_after=lambda i: 3 + i % 10
                    )
                )
                await self._still_open("long", seconds=5)
                records = {r["user"]: r for r in await self.control.requests(times=True)}
                figures = _cancel_figures(phase.results, records)
                figures["gateway_cpu_share"] = round(phase.gateway_cpu / phase.wall, 3)
                figures["fake_cpu_share"] = round(phase.fake_cpu / phase.wall, 3)
                figures["client_cpu_share"] = round(phase.client_cpu / phase.wall, 3)
                out[f"{target}@{level}"] = figures
        self.figures["cancel"] = out

    async def overload(self) -> None:
        """More streams offered at once than one process relays (1,000 over 1 s, 64 deltas
        20 ms apart, a quarter cancelled 10-29 deltas in), on a fresh gateway per cap: what was
        refused, what the admitted streams got (TTFB, stalls, cancel propagation) and the
        throughput (deltas relayed and streams completed per second)."""
        s = self.sizes
        await self.control.script("over", tokens=s.tokens, pace=s.pace)
        out: dict[str, Any] = {"offered": s.overload_streams}
        for cap in self.overload_caps:
            async with self.own_gateway(cap):
                for target in (GW_SSE, GW_WS):
                    await self.control.forget()
                    out[f"{target}@{_cap_label(cap)}"] = await self._overload_phase(target)
        self.figures["overload"] = out

    async def _overload_phase(self, target: str) -> dict[str, Any]:
        s = self.sizes
        phase = await self.measure(
            lambda: self.one_shot(
                target,
                "over",
                s.overload_streams,
                spread=1.0,
                cancel_after=lambda i: min(10 + i % 20, s.tokens // 2) if i % 4 == 0 else None,
            )
        )
        await self._still_open("over", seconds=10)
        records = {r["user"]: r for r in await self.control.requests(times=True)}
        admitted = [r for r in phase.results if not r.refused]
        figures = _cancel_figures(phase.results, records)
        completed = [r for r in admitted if r.done]
        chunks = sum(r.chunks for r in admitted)
        figures.update(
            admitted=len(admitted),
            completed=len(completed),
            ttft=summary([r.ttft for r in admitted if r.ttft is not None]),
            stalled=sum(1 for r in admitted if max(r.gaps(), default=0) > 10 * s.pace),
            wall_s=round(phase.wall, 2),
            deltas_per_s=round(chunks / phase.wall, 1),
            completed_per_s=round(len(completed) / phase.wall, 1),
            gateway_cpu_share=round(phase.gateway_cpu / phase.wall, 3),
            client_cpu_share=round(phase.client_cpu / phase.wall, 3),
        )
        return figures

    async def run(self, only: list[str]) -> dict[str, Any]:
        if not only or "workers" in only:
            native.tools()  # missing, fail now rather than at the end of the run
        fake, self.fake_url, control = harness.start_fake(self.sizes.tokens, self.sizes.pace)
        self.fake = self.stack.add(fake)
        floor, self.floor_url = harness.start_floor(self.fake_url)
        self.floor = self.stack.add(floor)
        self.control = harness.Control(control)
        scenarios: dict[str, Callable[[], Awaitable[None]]] = {
            "memory": self.memory,  # first, on its own fresh gateway
            "ttft_c1": self.ttft_c1,
            "c1_streams": self.c1_streams,
            "load": self.load,
            "fixed_cost": self.fixed_cost,
            "capacity": self.capacity,
            "cancel": self.cancel,
            "overload": self.overload,
            "messages": self.messages,
            "resumable": self.resumable,
            "responses": self.responses,
            "workers": self.workers,  # last: it starts a second gateway
        }
        gateway, self.gateway_url, ready = harness.start_gateway(
            self.fake_url, max_streams=self.max_streams, tree=self.tree
        )
        self.gateway = self.stack.add(gateway)
        self.figures["gateway_tree"] = str(self.tree)
        self.figures["machine"] = {
            "cpus": harness.cores(),
            "python": sys.version.split()[0],
            "fd_limit": harness.raise_fd_limit(),
        }
        for name, scenario in scenarios.items():
            if only and name not in only:
                continue
            started = time.monotonic()
            print(f"… {name}", file=sys.stderr, flush=True)
            await scenario()
            self.figures.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)
        return self.figures


def _gateway(target: str) -> bool:
    """Whether a target is served by the gateway (whose phases `--profile` samples)."""
    return target not in (DIRECT, FLOOR)


async def _wait_first_tokens(
    tasks: list[asyncio.Task[Result]], clients: list[SSEClient], seconds: float
) -> int:
    """Wait until every open stream got its first token; returns how many did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pending = [c for c in clients if not _has_first(c)]
        if not pending:
            break
        await asyncio.sleep(0.1)
    return sum(1 for c in clients if _has_first(c))


def _has_first(client: SSEClient) -> bool:
    proto = client._proto
    result = proto._result if proto is not None else None
    return result is not None and result.first_at is not None


# Where a stream's time to first token goes (see `_ttft_split`).
TTFT_LEGS = ("to_upstream", "upstream", "from_upstream")


def _ttft_split(
    results: list[Result], records: list[dict[str, Any]]
) -> list[tuple[float, float, float]]:
    """Each stream's TTFB in three legs (s), from the fake upstream's record of it (matched by
    the `user` tag; all processes read the same monotonic clock): request sent → the upstream
    has it, → the upstream wrote its first delta, → the client has that delta."""
    by_tag = {r["user"]: r for r in records if r.get("user")}
    out: list[tuple[float, float, float]] = []
    for r in results:
        record = by_tag.get(r.tag)
        if r.first_at is None or record is None or record.get("first_delta_at") is None:
            continue
        arrived, first = record["started_at"], record["first_delta_at"]
        out.append((arrived - r.sent_at, first - arrived, r.first_at - first))
    return out


def _cancel_figures(results: list[Result], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    latencies: list[float] = []
    after: list[int] = []
    acks: list[float] = []
    missing = 0
    cancelled = [r for r in results if r.cancelled_at is not None]
    for r in cancelled:
        assert r.cancelled_at is not None
        if r.acked_at is not None:
            acks.append(r.acked_at - r.cancelled_at)
        record = records.get(r.tag)
        if record is None or record["disconnected_at"] is None:
            missing += 1
            continue
        latencies.append(record["disconnected_at"] - r.cancelled_at)
        after.append(sum(1 for t in record["delta_times"] if t > r.cancelled_at))
    return {
        "streams": len(results),
        "refused": refused(results),
        "cancelled": len(cancelled),
        "errors": sum(
            1 for r in results if r.error is not None and r.cancelled_at is None and not r.refused
        ),
        "not_seen_upstream": missing,
        "propagation": summary(latencies),
        "tokens_after_cancel_max": max(after) if after else None,
        "tokens_after_cancel_mean": round(sum(after) / len(after), 2) if after else None,
        "streams_with_more_than_one_after": sum(1 for a in after if a > 1),
        "client_ack": summary(acks) if acks else None,
    }


def refused(results: list[Result]) -> int:
    """Streams refused by a cap (429) or a busy gateway (503): 0 expected at defaults."""
    return sum(1 for r in results if r.refused)


def _cap_label(cap: int | None) -> str:
    if cap is None:
        return f"max_streams={ServerSettings().max_streams} (default)"
    return "max_streams=0 (no cap)" if cap == 0 else f"max_streams={cap}"


def _c1_rounds(targets: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """The rounds of a c=1 comparison, each with its own order of the targets (shuffled, the
    same in every run), so no target always comes after the same one. One request at a time,
    each process runs its part from caches the others refilled while it waited: in a fixed
    order the target after the direct one paid that for all of them (loadtests/README.md,
    "Where one request's time goes")."""
    shuffle = random.Random(19).shuffle
    for i in range(rounds):
        order = list(targets)
        shuffle(order)
        yield i, order


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


_ratio = harness.ratio


def _get(figures: dict[str, Any], *path: str) -> Any:
    node: Any = figures
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _split_rows(load: dict[str, Any], target: str, c: int) -> list[tuple[str, Any, Any, Any, str]]:
    """The TTFB's legs, direct beside `target`: to the upstream / in it / back (p50, p99)."""
    direct, split = load[DIRECT].get("ttft_split"), load[target].get("ttft_split")
    if not direct or not split:
        return []
    out: list[tuple[str, Any, Any, Any, str]] = []
    for q in ("p50", "p99"):
        d = " / ".join(str(direct[leg][f"{q}_ms"]) for leg in TTFT_LEGS)
        g = " / ".join(str(split[leg][f"{q}_ms"]) for leg in TTFT_LEGS)
        label = f"  ... TTFB {q} to upstream / in it / back, c={c}, {target} (ms)"
        out.append((label, d, g, "", ""))
    return out


def rows(f: dict[str, Any]) -> list[tuple[str, Any, Any, Any, str]]:
    """(figure, direct, gateway, ratio or difference, goal) for the table."""
    out: list[tuple[str, Any, Any, Any, str]] = []
    c1 = f.get("ttft_c1")
    if c1:
        for q in ("p50", "p99"):
            d = c1[DIRECT][f"{q}_ms"]
            for t in (GW_SSE, GW_WS):
                goal = "added <= 1 ms" if q == "p50" else ""
                out.append((f"TTFB {q} c=1, {t} (ms)", d, c1[t][f"{q}_ms"], _plus(c1[t], q), goal))
    streams = f.get("c1_streams")
    if streams:
        d, n = streams[DIRECT]["streams_per_s"], streams["tokens"]
        floor = streams[FLOOR]["cpu_per_chunk_us"] if FLOOR in streams else None
        if floor is not None:
            g = streams[FLOOR]["streams_per_s"]
            out.append((f"{n}-token streams/s c=1 unpaced, {FLOOR}", d, g, _x(_ratio(g, d)), ""))
            out.append((f"CPU per relayed chunk c=1 unpaced, {FLOOR} (us)", "", floor, "", ""))
        for t in (GW_SSE, GW_WS):
            g = streams[t]["streams_per_s"]
            out.append((f"{n}-token streams/s c=1 unpaced, {t}", d, g, _x(_ratio(g, d)), ">= 500"))
            cpu = streams[t]["cpu_per_chunk_us"]
            out.append((f"CPU per relayed chunk c=1 unpaced, {t} (us)", "", cpu, "", "<= 30 us"))
            if floor is not None:
                out.append(
                    (f"  ... over the floor, {t} (us)", floor, cpu, _plus_us(cpu, floor), "")
                )
    load = f.get("load")
    if load:
        c = load["concurrency"]
        floor = load[FLOOR]["cpu_per_chunk_us"] if FLOOR in load else None
        if floor is not None:
            for q in ("p50", "p99"):
                d, g = load[DIRECT]["ttft"][f"{q}_ms"], load[FLOOR]["ttft"][f"{q}_ms"]
                out.append((f"TTFB {q} c={c} paced, {FLOOR} (ms)", d, g, _x(_ratio(g, d)), ""))
            out.append((f"CPU per relayed chunk, all-in, {FLOOR} (us)", "", floor, "", ""))
            share = load[FLOOR]["gateway_cpu_share"]
            out.append((f"floor CPU busy at c={c} (cores)", "", share, "", ""))
        for t in (GW_SSE, GW_WS):
            for q in ("p50", "p99"):
                d, g = load[DIRECT]["ttft"][f"{q}_ms"], load[t]["ttft"][f"{q}_ms"]
                goal = "<= 1.5x direct" if q == "p99" else ""
                out.append((f"TTFB {q} c={c} paced, {t} (ms)", d, g, _x(_ratio(g, d)), goal))
            out += _split_rows(load, t, c)
            d, g = load[DIRECT]["gap"]["p99_ms"], load[t]["gap"]["p99_ms"]
            out.append((f"inter-chunk gap p99 c={c}, {t} (ms)", d, g, _x(_ratio(g, d)), ""))
            out.append((f"stalled streams c={c}, {t}", 0, load[t]["stalled_streams"], "", "0"))
            cpu = load[t]["cpu_per_chunk_us"]
            out.append((f"CPU per relayed chunk, all-in, {t} (us)", "", cpu, "", "<= 30 us"))
            if floor is not None:
                out.append(
                    (f"  ... over the floor, {t} (us)", floor, cpu, _plus_us(cpu, floor), "")
                )
            out.append(
                (
                    f"CPU per 64-token stream, {t} (ms)",
                    "",
                    load[t]["cpu_per_request_ms"],
                    "",
                    "",
                )
            )
            share = load[t]["gateway_cpu_share"]
            out.append((f"gateway CPU busy at c={c}, {t} (cores)", "", share, "", ""))
            gc = load[t].get("gc")
            if gc:
                runs = gc["collections"]
                if gc["paused_ms"] is not None:
                    runs = f"{runs} ({gc['paused_ms']} ms, {gc['pauses_over_5ms']} > 5 ms)"
                out.append((f"cycle collector runs at c={c}, {t}", "", runs, "", ""))
                freed = gc["freed_per_stream"]
                out.append((f"  ... objects it freed per stream, {t}", "", freed, "", ""))
    fixed = f.get("fixed_cost")
    if fixed:
        for t in (GW_SSE, GW_WS):
            marginal = fixed[t].get("marginal_cpu_per_chunk_us")
            out.append((f"CPU per relayed chunk, marginal, {t} (us)", "", marginal, "", "<= 30 us"))
            cpu = fixed[t]["cpu_per_request_ms"]
            out.append((f"CPU per 1-token stream, {t} (ms)", "", cpu, "", ""))
        cpu = fixed[GW_JSON]["cpu_per_request_ms"]
        out.append(("CPU per non-streamed request (ms)", "", cpu, "", "<= 0.5 ms"))
        for t in (DIRECT, GW_SSE, GW_WS, GW_JSON):
            out.append((f"1-token requests/s, {t}", "", fixed[t]["requests_per_s"], "", ""))
    mem = f.get("memory")
    if mem:
        out.append(("ready to serve after start (s)", "", mem["ready_s"], "", "<= 1.5 s"))
        out.append(("idle RSS (MB)", "", mem["idle_rss_mb"], "", "<= 80 MB"))
        for level, m in mem["levels"].items():
            goal = "< 500 MB" if level == "5000" else ""
            out.append((f"RSS with {level} open streams (MB)", "", m["rss_mb"], "", goal))
        out.append(("memory per open stream (kB)", "", mem["kb_per_stream"], "", ""))
        for level, m in mem["levels"].items():
            out.append((f"seconds to open {level} streams", "", m["open_s"], "", ""))
        out.append(
            ("all clients gone: upstream closed after (s)", "", mem["close_drain_s"], "", "")
        )
        left = mem["upstream_open_after_close"]
        out.append(("upstream streams still open 60 s later", "", left, "", "0"))
    workers = f.get("workers")
    if workers:
        c, n = workers["concurrency"], workers["tokens"]
        for name in ("1 worker", "2 workers"):
            w = workers[name]
            out.append((f"{n}-token streams/s c={c}, {name}", "", w["streams_per_s"], "", ""))
        ratio = _x(workers["ratio"])
        out.append(("streams/s, 2 workers vs 1", "", ratio, "", ">= 1.7x"))
        cores = (f.get("machine") or {}).get("cpus")
        for name in ("1 worker", "2 workers"):
            busy = workers[name].get("machine_busy_cores")
            if busy is not None:
                label = f"CPU of all processes, {name} (cores of {cores})"
                out.append((label, "", busy, "", ""))
        for name in ("1 worker", "2 workers"):
            per_stream = workers[name].get("gateway_cpu_per_stream_ms")
            if per_stream is not None:
                out.append((f"gateway CPU per stream, {name} (ms)", "", per_stream, "", ""))
        out += harness.ceiling_rows(workers)
        out += native.rows(workers.get("native"))
    for scenario, route in (("messages", GW_MSG), ("responses", GW_RSP), ("resumable", GW_RES)):
        out += _beside_chat_rows(f.get(scenario), scenario, route)
    cap = f.get("capacity")
    if cap:
        s = cap["sustained"]
        for t in (GW_SSE, GW_WS):
            out.append((f"streams sustained, {t}", s[DIRECT], s[t], "", ">= 5000 open"))
    cancel = f.get("cancel")
    if cancel:
        for key, c in cancel.items():
            target, level = key.split("@")
            if target == DIRECT:
                continue
            d = cancel.get(f"{DIRECT}@{level}", {})
            for q in ("p50", "p99"):
                out.append(
                    (
                        f"cancel->upstream {q} @{level}, {target} (ms)",
                        _get(d, "propagation", f"{q}_ms"),
                        c["propagation"][f"{q}_ms"],
                        "",
                        "p99 <= 20 ms" if q == "p99" else "",
                    )
                )
            out.append(
                (
                    f"tokens after cancel max/mean @{level}, {target}",
                    f"{d.get('tokens_after_cancel_max')}/{d.get('tokens_after_cancel_mean')}",
                    f"{c['tokens_after_cancel_max']}/{c['tokens_after_cancel_mean']}",
                    "",
                    "<= 1",
                )
            )
            out.append(
                (
                    f"cancels not seen upstream @{level}, {target}",
                    d.get("not_seen_upstream"),
                    c["not_seen_upstream"],
                    "",
                    "0",
                )
            )
    out += _overload_rows(f.get("overload"))
    out += _refusal_rows(f)
    return out


def _refusal_rows(f: dict[str, Any]) -> list[tuple[str, Any, Any, Any, str]]:
    """Streams refused (429/503) in each gateway phase at default settings: 0 expected."""
    phases: list[tuple[str, Any]] = []
    for scenario in ("load", "fixed_cost"):
        for t in (GW_SSE, GW_WS, GW_JSON):
            phases.append((f"{scenario}, {t}", _get(f, scenario, t, "refused")))
    for scenario, route in (("messages", GW_MSG), ("responses", GW_RSP), ("resumable", GW_RES)):
        for t in (GW_SSE, route):
            phases.append((f"{scenario}, {t}", _get(f, scenario, "load", t, "refused")))
    for level in _get(f, "capacity", "levels") or ():
        if level["target"] != DIRECT:
            phases.append((f"capacity {level['streams']}, {level['target']}", level["refused"]))
    default_cap = ServerSettings().max_streams
    rows: list[tuple[str, Any, Any, Any, str]] = []
    for name, n in phases:
        if n is not None:
            rows.append((f"refused (429/503), {name}", "", n, "", "0"))
    for key, c in (f.get("cancel") or {}).items():
        if not key.startswith(DIRECT):
            # Past the default cap, refusals are the cap at work (see `overload`).
            goal = "0" if int(key.split("@")[1]) <= default_cap else ""
            rows.append((f"refused (429/503), cancel {key}", "", c["refused"], "", goal))
    return rows


def _overload_rows(figures: dict[str, Any] | None) -> list[tuple[str, Any, Any, Any, str]]:
    """Each cap's gateway under `offered` streams at once: refusals, latency, throughput."""
    out: list[tuple[str, Any, Any, Any, str]] = []
    if not figures:
        return out
    n = figures["offered"]
    for key, o in figures.items():
        if key == "offered":
            continue
        target, cap = key.split("@")
        where = f"@{n} offered, {target}, {cap}"
        out.append((f"refused / admitted {where}", "", f"{o['refused']}/{o['admitted']}", "", ""))
        out.append((f"TTFB p99 of admitted {where} (ms)", "", o["ttft"]["p99_ms"], "", ""))
        out.append((f"stalled admitted streams {where}", "", o["stalled"], "", ""))
        p99 = o["propagation"]["p99_ms"]
        out.append((f"cancel->upstream p99 {where} (ms)", "", p99, "", "<= 50 ms"))
        out.append((f"deltas relayed/s {where}", "", o["deltas_per_s"], "", ""))
        out.append((f"streams completed/s {where}", "", o["completed_per_s"], "", ""))
    return out


def _beside_chat_rows(
    figures: dict[str, Any] | None, scenario: str, route: str
) -> list[tuple[str, Any, Any, Any, str]]:
    """The rows of a dialect's route next to the Chat Completions one."""
    out: list[tuple[str, Any, Any, Any, str]] = []
    if not figures:
        return out
    c1, load, c = figures["c1"], figures["load"], figures["concurrency"]
    for q in ("p50", "p99"):
        for t in (GW_SSE, route):
            d = c1[DIRECT][f"{q}_ms"]
            out.append((f"TTFB {q} c=1, {t} (ms)", d, c1[t][f"{q}_ms"], _plus(c1[t], q), ""))
    for t in (GW_SSE, route):
        cpu = load[t]["cpu_per_chunk_us"]
        out.append((f"CPU per relayed chunk, all-in, c={c}, {t} (us)", "", cpu, "", ""))
        ttft = load[t]["ttft"]["p50_ms"]
        out.append((f"TTFB p50 c={c} paced, {t} (ms)", "", ttft, "", ""))
    ratio = _ratio(load[route]["cpu_per_chunk_us"], load[GW_SSE]["cpu_per_chunk_us"])
    goal = "<= 1.25x" if route == GW_RES else "<= 1.1x"
    out.append((f"CPU per chunk, {scenario} vs chat completions", "", _x(ratio), "", goal))
    if route == GW_RES:
        added = _ratio(c1[route]["added_p50_ms"], c1[GW_SSE]["added_p50_ms"])
        out.append(("added TTFB p50 c=1, resumable vs plain", "", _x(added), "", "<= 1.25x"))
    return out


def _plus(entry: dict[str, Any], q: str) -> str:
    added = entry.get(f"added_{q}_ms")
    return "" if added is None else f"+{added:g} ms"


def _plus_us(a: float | None, b: float | None) -> str:
    """`a` over `b`, in microseconds and as a ratio."""
    if a is None or b is None:
        return ""
    return f"+{a - b:.1f} ({_x(_ratio(a, b))})"


_x = harness.times


def table(figures: dict[str, Any]) -> str:
    header = ("figure", "direct", "gateway", "vs direct", "goal")
    lines = [header, *((a, _cell(b), _cell(c), _cell(d), e) for a, b, c, d, e in rows(figures))]
    widths = [max(len(str(line[i])) for line in lines) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    text = [fmt.format(*lines[0]), "  ".join("-" * w for w in widths)]
    text += [fmt.format(*line) for line in lines[1:]]
    return "\n".join(text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--out", default="loadtests/results/bench.json", help="JSON report")
    parser.add_argument(
        "--only", action="append", default=[], help="run only this scenario (repeatable)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy the gateway into this folder")
    parser.add_argument(
        "--max-streams",
        type=int,
        help="[server] max_streams of the gateway (0: no cap; default: the setting's default)",
    )
    parser.add_argument(
        "--overload-caps",
        default="0,default",
        help="comma-separated max_streams values the overload scenario compares "
        "('default' for the setting's default, 0 for no cap)",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=harness.ROOT,
        help="run the gateway from this checkout (an older commit, say; default: this one)",
    )
    args = parser.parse_args(argv)
    caps = tuple(None if c.strip() == "default" else int(c) for c in args.overload_caps.split(","))
    harness.raise_fd_limit()
    harness.stop_on_signals()
    sizes = TINY if args.tiny else Sizes()
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    with harness.Stack() as stack:
        try:
            bench = Bench(sizes, stack, args.profile, args.max_streams, caps, args.tree.resolve())
            figures = runner(bench.run(args.only))
        except KeyboardInterrupt:
            print("interrupted; stopped everything started", file=sys.stderr)
            return 130
    figures["sizes"] = asdict(sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
