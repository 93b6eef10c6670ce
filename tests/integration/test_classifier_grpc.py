"""The classifier over real gRPC: a grpc.aio server on 127.0.0.1:0 and the gateway's client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx2
import msgspec
import pytest

from providers.registry import Registry
from providers.settings import ProviderSettings
from server.app import create_app
from server.catalog import Catalog
from server.classification import ClassifierUnavailableError
from server.classification.client import RemoteClassifier
from server.classification.rules import ModelRef, classify
from server.classification.service import ClassifierServer, ClassifierServicer
from server.classification.stubs import classifier_pb2 as pb
from server.settings import ClassifierSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread
from tests.unit.test_classification_rules import CASES

DEADLINE = 0.3  # short, so the failure cases stay fast; the guard below is what fails a hang
GUARD = 10.0


class SlowServicer(ClassifierServicer):
    """Answers long after any deadline the gateway uses."""

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        await asyncio.sleep(30)
        return await super().Classify(request, context)


@pytest.fixture
async def server() -> AsyncIterator[ClassifierServer]:
    running = ClassifierServer("127.0.0.1", 0)
    await running.start()
    try:
        yield running
    finally:
        await running.stop(grace=None)


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, outcome: str, seconds: float) -> None:
        self.seen.append(outcome)


def provider_settings_demo() -> ProviderSettings:
    return ProviderSettings(name="demo", kind="demo")


REFS = [ModelRef(id=f"p/{m}", provider="p", upstream_id=m) for m in CASES] + [
    ModelRef(id="q/named", provider="q", upstream_id="gpt-4o", display_name="Named upstream")
]


async def test_classify_over_the_wire_equals_in_process(server: ClassifierServer) -> None:
    outcomes = Outcomes()
    client = RemoteClassifier(f"127.0.0.1:{server.port}", deadline=GUARD, observe=outcomes)
    try:
        assert await client.classify(REFS) == classify(REFS)
        assert await client.classify([]) == []
    finally:
        await client.aclose()
    assert outcomes.seen == ["ok", "ok"]


@pytest.fixture
def registry(upstream: FakeUpstream) -> Registry:
    return Registry.from_settings(provider_settings(upstream), ENVIRON)


async def test_catalogue_results_are_identical_in_process_and_remote(
    server: ClassifierServer, registry: Registry
) -> None:
    local = Catalog(registry)
    remote = Catalog(registry, classifier_address=f"127.0.0.1:{server.port}")
    try:
        here, there = await local.snapshot(), await remote.snapshot()
    finally:
        await local.aclose()
        await remote.aclose()
        await registry.aclose()
    assert (here.source, there.source) == ("local", "classifier")
    assert (local.classifier_status, remote.classifier_status) == ("local", "serving")
    assert here.classes == there.classes
    a, b = msgspec.json.decode(here.categories_body), msgspec.json.decode(there.categories_body)
    assert {**a, "source": None} == {**b, "source": None}
    assert remote.classifier_calls == {"ok": 1}


async def fallback_of(catalog: Catalog) -> tuple[str, bytes]:
    async with asyncio.timeout(GUARD):
        snapshot = await catalog.snapshot()
    return snapshot.source, snapshot.categories_body


def assert_same_as_local(body: bytes, source: str) -> None:
    decoded = msgspec.json.decode(body)
    assert decoded["source"] == source
    assert decoded["degraded"] is True
    expected = classify([ModelRef(id="demo/echo", provider="demo", upstream_id="echo")])
    assert decoded["models"][0] == msgspec.to_builtins(expected[0])


async def test_server_not_started_falls_back_to_local_rules() -> None:
    registry = Registry.from_settings([provider_settings_demo()], {})
    catalog = Catalog(registry, classifier_address=free_address(), classifier_deadline=DEADLINE)
    try:
        source, body = await fallback_of(catalog)
    finally:
        await catalog.aclose()
    assert source == "fallback"
    assert_same_as_local(body, "fallback")
    assert catalog.classifier_status == "degraded"
    assert catalog.classifier_calls == {"deadline_exceeded": 1}


async def test_server_stopped_mid_run_reuses_the_last_good_answer(
    server: ClassifierServer,
) -> None:
    registry = Registry.from_settings([provider_settings_demo()], {})
    catalog = Catalog(
        registry,
        ttl=0.05,
        classifier_address=f"127.0.0.1:{server.port}",
        classifier_deadline=DEADLINE,
    )
    try:
        first = await catalog.snapshot()
        assert (first.source, catalog.classifier_status) == ("classifier", "serving")
        await server.stop(grace=None)
        await asyncio.sleep(0.1)
        async with asyncio.timeout(GUARD):
            assert await catalog.snapshot() is first  # served at once while it refreshes
            after = await catalog.refresh()
    finally:
        await catalog.aclose()
    assert after.source == "stale"
    assert after.classes == first.classes
    assert_same_as_local(after.categories_body, "stale")
    assert catalog.classifier_status == "degraded"
    assert catalog.classifier_calls["ok"] == 1
    assert sum(catalog.classifier_calls.values()) == 2


async def test_a_slow_server_is_cut_off_at_the_deadline() -> None:
    slow = ClassifierServer("127.0.0.1", 0, servicer=SlowServicer())
    await slow.start()
    registry = Registry.from_settings([provider_settings_demo()], {})
    catalog = Catalog(
        registry, classifier_address=f"127.0.0.1:{slow.port}", classifier_deadline=DEADLINE
    )
    try:
        source, body = await fallback_of(catalog)
    finally:
        await catalog.aclose()
        await slow.stop(grace=None)
    assert source == "fallback"
    assert_same_as_local(body, "fallback")
    assert catalog.classifier_calls == {"deadline_exceeded": 1}


async def test_a_server_not_serving_is_not_asked(server: ClassifierServer) -> None:
    await server.set_serving(False)
    registry = Registry.from_settings([provider_settings_demo()], {})
    catalog = Catalog(
        registry, classifier_address=f"127.0.0.1:{server.port}", classifier_deadline=DEADLINE
    )
    try:
        source, body = await fallback_of(catalog)
        assert catalog.classifier_calls == {"not_serving": 1}
        await server.set_serving(True)
        assert (await catalog.refresh()).source == "classifier"
        assert catalog.classifier_status == "serving"
    finally:
        await catalog.aclose()
    assert source == "fallback"
    assert_same_as_local(body, "fallback")


async def test_the_client_raises_only_its_own_error() -> None:
    client = RemoteClassifier(free_address(), deadline=DEADLINE, observe=Outcomes())
    try:
        with pytest.raises(ClassifierUnavailableError) as caught:
            async with asyncio.timeout(GUARD):
                await client.classify(REFS)
    finally:
        await client.aclose()
    assert caught.value.outcome == "deadline_exceeded"
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


def test_the_gateway_answers_categories_with_the_classifier_down() -> None:
    settings = Settings(
        providers=[provider_settings_demo()],
        classifier=ClassifierSettings(address=free_address(), deadline=DEADLINE),
    )
    with serve_in_thread(create_app(settings, {}), options=uvicorn_options(settings)) as url:
        response = httpx2.get(url + "/api/models/categories", timeout=GUARD)
        models = httpx2.get(url + "/api/models", timeout=GUARD)
    assert response.status_code == models.status_code == 200
    body = response.json()
    assert (body["source"], body["degraded"]) == ("fallback", True)
    assert [m["id"] for m in body["models"]] == [m["id"] for m in models.json()["data"]]


def test_the_classifier_command_serves_and_stops_on_sigterm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "classifier", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("tokenrelay classifier listening on 127.0.0.1:")
        address = line.rsplit(" ", 1)[-1].strip()

        async def ask() -> list[Any]:
            client = RemoteClassifier(address, deadline=GUARD, observe=Outcomes())
            try:
                return await client.classify(REFS[:3])
            finally:
                await client.aclose()

        assert asyncio.run(ask()) == classify(REFS[:3])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_restarted_server_is_used_again_without_a_gateway_restart() -> None:
    first_server = ClassifierServer("127.0.0.1", 0)
    await first_server.start()
    port = first_server.port
    registry = Registry.from_settings([provider_settings_demo()], {})
    catalog = Catalog(
        registry,
        ttl=0.05,
        retry=0.05,
        classifier_address=f"127.0.0.1:{port}",
        classifier_deadline=DEADLINE,
    )
    second_server = ClassifierServer("127.0.0.1", port)
    try:
        assert (await catalog.refresh()).source == "classifier"
        await first_server.stop(grace=None)  # killed
        await asyncio.sleep(0.1)  # past the TTL: a fresh classification is not asked again
        assert (await catalog.refresh()).source == "stale"
        assert catalog.classifier_status == "degraded"
        await second_server.start()  # back, on the same port
        async with asyncio.timeout(GUARD):
            while catalog.classifier_status != "serving":
                await catalog.refresh()
                await asyncio.sleep(0.05)
        assert catalog.classifier_status == "serving"
    finally:
        await catalog.aclose()
        await second_server.stop(grace=None)
