"""Two checkouts side by side, in the same minutes: gateway CPU per request and per relayed
chunk, and time to first token, with the two gateways' batches interleaved.

    python -m loadtests.bench_ab TREE_A TREE_B [--kind openai|anthropic] [--rounds N] [--tiny]

`make bench` runs one checkout at a time (`--tree`), minutes apart; on a shared machine whose
speed drifts within those minutes (other tenants' load shows as CPU steal), a difference of 10 %
is lost in it. Here one fake upstream serves two gateways, one per checkout, and every figure
is taken in short batches that alternate between them (A, B, then B, A), so drift hits both
alike. Reported per checkout: the median of the batches and every batch.

- `request`: closed loop of one-token streams, 8 at a time (SSE, non-streamed JSON, WebSocket):
  gateway CPU per request;
- `paced`: 100 concurrent 64-token streams at 10 ms per token, so each chunk arrives alone:
  gateway CPU per relayed chunk, all-in;
- `ttfb`: one request at a time, alternating gateways request by request: time to first token,
  p10 / p50 / p90 (p10 shows the path's own length best on a noisy machine).

`--kind anthropic` puts the gateways' provider on the fake's Anthropic Messages API instead of
its OpenAI one (the client side is Chat Completions either way). Process CPU comes from
`/proc` (10 ms ticks: the batches are sized to take a second or more; `--tiny` ones do not, and
only show that it runs). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import harness
from loadtests.clients import SSEClient, WSClient, percentile


@dataclass
class Sizes:
    requests: int = 2000  # one-token requests per batch
    paced_streams: int = 800  # 64-token streams per paced batch
    ttfb_requests: int = 1000  # per gateway
    concurrency: int = 8
    paced_concurrency: int = 100
    tokens: int = 64
    pace: float = 0.01


TINY = Sizes(requests=40, paced_streams=20, ttfb_requests=20, paced_concurrency=10, tokens=8)


class AB:
    def __init__(self, urls: list[str], pids: list[int], sizes: Sizes, control: str) -> None:
        self.urls, self.pids, self.sizes = urls, pids, sizes
        self.control = harness.Control(control)

    async def _one_token(self, url: str, kind: str, n: int) -> None:
        c = self.sizes.concurrency
        if kind == "ws":
            ws = await WSClient.open(url)
            try:
                await asyncio.gather(*(self._ws_loop(ws, "fake/one", n // c) for _ in range(c)))
            finally:
                await ws.close()
            return
        await asyncio.gather(
            *(self._sse_loop(url, "fake/one", n // c, kind == "sse") for _ in range(c))
        )

    async def _paced(self, url: str, n: int) -> None:
        c = self.sizes.paced_concurrency
        await asyncio.gather(*(self._sse_loop(url, "fake/paced", n // c, True) for _ in range(c)))

    @staticmethod
    async def _sse_loop(url: str, model: str, n: int, stream: bool) -> None:
        client = SSEClient.for_url(url, "/api/chat/completions")
        try:
            for _ in range(n):
                result = await client.chat(model, stream=stream)
                if result.error is not None:
                    raise RuntimeError(f"{url}: {result.error}")
        finally:
            client.close()

    @staticmethod
    async def _ws_loop(ws: WSClient, model: str, n: int) -> None:
        for _ in range(n):
            result = await ws.chat(model)
            if result.error is not None:
                raise RuntimeError(f"WebSocket: {result.error}")

    async def cpu(
        self, run: Callable[[str], Awaitable[None]], per: int, rounds: int
    ) -> list[list[float]]:
        """µs of gateway CPU per unit (`per` units a batch), batches alternating A, B / B, A."""
        out: list[list[float]] = [[], []]
        for url in self.urls:  # warm-up: connections, caches, the first collections
            await run(url)
        for r in range(rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                before = harness.cpu_seconds(self.pids[i])
                await run(self.urls[i])
                out[i].append((harness.cpu_seconds(self.pids[i]) - before) / per * 1e6)
        return out

    async def ttfb(self) -> list[list[float]]:
        out: list[list[float]] = [[], []]
        clients = [SSEClient.for_url(u, "/api/chat/completions") for u in self.urls]
        try:
            for r in range(self.sizes.ttfb_requests + 10):
                for i in (0, 1) if r % 2 == 0 else (1, 0):
                    result = await clients[i].chat("fake/c1")
                    if r >= 10 and result.ttft is not None:
                        out[i].append(result.ttft * 1e3)
        finally:
            for client in clients:
                client.close()
        return out


def _line(name: str, tree: Path, values: list[float], unit: str) -> str:
    batches = " ".join(f"{v:.1f}" for v in values)
    return f"{name:28} {str(tree):24} median {statistics.median(values):8.1f} {unit}  [{batches}]"


async def _run(ab: AB, trees: list[Path], rounds: int) -> None:
    s = ab.sizes
    await ab.control.script("one", tokens=1, pace=0.0)
    await ab.control.script("paced", tokens=s.tokens, pace=s.pace)
    await ab.control.script("c1", tokens=8, pace=0.002)
    for kind in ("sse", "json", "ws"):

        async def one(url: str, kind: str = kind) -> None:
            await ab._one_token(url, kind, s.requests)

        figures = await ab.cpu(one, s.requests, rounds)
        for i, tree in enumerate(trees):
            print(_line(f"CPU per request, {kind}", tree, figures[i], "µs"), flush=True)
        await ab.control.forget()

    async def paced(url: str) -> None:
        await ab._paced(url, s.paced_streams)

    figures = await ab.cpu(paced, s.paced_streams * s.tokens, max(2, rounds // 2))
    for i, tree in enumerate(trees):
        print(_line("CPU per chunk, 100 paced", tree, figures[i], "µs"), flush=True)
    await ab.control.forget()
    ttfb = await ab.ttfb()
    for i, tree in enumerate(trees):
        p10, p50, p90 = (percentile(ttfb[i], q) for q in (10, 50, 90))
        print(f"{'TTFB c=1, SSE':28} {str(tree):24} p10 {p10:.3f}  p50 {p50:.3f}  p90 {p90:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_ab", description=__doc__)
    parser.add_argument("trees", nargs=2, type=Path, help="two checkouts (A, B)")
    parser.add_argument("--kind", choices=("openai", "anthropic"), default="openai")
    parser.add_argument("--rounds", type=int, default=8, help="batches per checkout")
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    trees = [t.resolve() for t in args.trees]
    harness.raise_fd_limit()
    harness.stop_on_signals()
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    with harness.Stack() as stack:
        fake, fake_url, control = harness.start_fake(sizes.tokens, sizes.pace)
        stack.add(fake)
        urls, pids = [], []
        for tree in trees:
            child, url, _ = harness.start_gateway(fake_url, tree=tree, kind=args.kind)
            stack.add(child)
            urls.append(url)
            pids.append(child.pid)
        print(f"provider kind: {args.kind}; A = {trees[0]}, B = {trees[1]}", flush=True)
        runner(_run(AB(urls, pids, sizes, control), trees, 2 if args.tiny else args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
