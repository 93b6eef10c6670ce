"""The model catalogue against the fake upstream: single-flight, TTL, providers down, call counts."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx2

from providers.registry import Registry
from providers.settings import ProviderSettings
from server.app import create_app
from server.catalog import Catalog
from server.settings import CatalogSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, UPSTREAM_KEY, model_calls, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread


def registry_for(providers: list[ProviderSettings]) -> Registry:
    return Registry.from_settings(providers, ENVIRON)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def test_concurrent_requests_share_one_fetch_per_provider(fake: FakeUpstream) -> None:
    registry = registry_for(provider_settings(fake))
    catalog = Catalog(registry)
    try:
        snapshots = await asyncio.gather(*(catalog.snapshot() for _ in range(50)))
        assert all(s is snapshots[0] for s in snapshots)
        assert model_calls(fake) == 2  # oai and ant, once each; demo has no upstream
        ids = [m.id for m in snapshots[0].models]
        assert ids[:3] == ["oai/gpt-4.1", "oai/gpt-4o-mini", "oai/o4-mini"]
        assert "ant/claude-sonnet-4-5" in ids and "demo/echo" in ids
        assert snapshots[0].unavailable == []
        assert await catalog.snapshot() is snapshots[0]
        assert model_calls(fake) == 2
    finally:
        await catalog.aclose()
        await registry.aclose()


async def test_an_expired_snapshot_is_served_while_one_refresh_runs(fake: FakeUpstream) -> None:
    registry = registry_for(provider_settings(fake)[:1])
    catalog = Catalog(registry, ttl=0.05)
    try:
        first = await catalog.snapshot()
        fake.models = ["gpt-4o-mini", "gpt-5"]
        await asyncio.sleep(0.1)
        served = await asyncio.gather(*(catalog.snapshot() for _ in range(20)))
        assert all(s is first for s in served)  # nobody waited for the refresh
        fresh = await catalog.refresh()  # joins the refresh those requests started
        assert [m.id for m in fresh.models] == ["oai/gpt-4o-mini", "oai/gpt-5"]
        assert model_calls(fake) == 2
    finally:
        await catalog.aclose()
        await registry.aclose()


async def test_a_failed_refresh_keeps_the_last_good_list(fake: FakeUpstream) -> None:
    registry = registry_for(provider_settings(fake)[:1])
    catalog = Catalog(registry, ttl=0.05, retry=0.05)
    try:
        first = await catalog.snapshot()
        fake.api_key = "sk-rotated-somewhere-else"  # every call is now refused with a 401
        await asyncio.sleep(0.1)
        after = await catalog.refresh()
        assert after.models == first.models
        assert after.unavailable == []
        assert model_calls(fake) == 2
    finally:
        fake.api_key = UPSTREAM_KEY
        await catalog.aclose()
        await registry.aclose()


async def test_a_provider_that_is_down_does_not_hide_the_others(fake: FakeUpstream) -> None:
    down = ProviderSettings(
        name="down",
        kind="openai",
        base_url=closed_port_url(),
        api_key_env="FAKE_OPENAI_KEY",
        connect_timeout=2.0,
    )
    registry = registry_for([down, *provider_settings(fake)])
    catalog = Catalog(registry)
    try:
        snapshot = await catalog.snapshot()
        assert snapshot.unavailable == ["down"]
        assert {m.provider for m in snapshot.models} == {"oai", "ant", "demo"}
        assert b'"unavailable":["down"]' in snapshot.models_body
        assert b'"unavailable":["down"]' in snapshot.categories_body
    finally:
        await catalog.aclose()
        await registry.aclose()


async def test_allow_lists_filter_and_aliases_follow_listed_models(fake: FakeUpstream) -> None:
    providers = provider_settings(
        fake, models=["gpt-4o-mini", "not-upstream"], aliases={"fast": "gpt-4o-mini"}
    )[:1]
    registry = registry_for(providers)
    catalog = Catalog(registry)
    try:
        snapshot = await catalog.snapshot()
        assert [(m.id, m.upstream_id) for m in snapshot.models] == [
            ("oai/gpt-4o-mini", "gpt-4o-mini"),
            ("oai/fast", "gpt-4o-mini"),
        ]
        assert [c.family for c in snapshot.classes] == ["gpt-4o", "gpt-4o"]
    finally:
        await catalog.aclose()
        await registry.aclose()


def gateway_settings(upstream: FakeUpstream, **catalog: Any) -> Settings:
    return Settings(providers=provider_settings(upstream), catalog=CatalogSettings(**catalog))


def test_both_endpoints_come_from_one_fetch(fake: FakeUpstream) -> None:
    settings = gateway_settings(fake)
    with serve_in_thread(create_app(settings, ENVIRON), options=uvicorn_options(settings)) as url:
        with httpx2.Client(base_url=url, timeout=10) as client:
            for _ in range(5):
                listed = client.get("/api/models")
                grouped = client.get("/api/models/categories")
                assert listed.status_code == grouped.status_code == 200
    assert model_calls(fake) == 2
    ids = [m["id"] for m in listed.json()["data"]]
    body = grouped.json()
    assert [m["id"] for m in body["models"]] == ids
    assert body["object"] == "model.categories"
    assert (body["source"], body["degraded"], body["unavailable"]) == ("local", False, [])
    assert [c["id"] for c in body["categories"]] == ["chat", "reasoning", "vision", "code"]
    by_id = {m["id"]: m for m in body["models"]}
    assert by_id["oai/gpt-4o-mini"] == {
        "id": "oai/gpt-4o-mini",
        "provider": "oai",
        "upstream_id": "gpt-4o-mini",
        "family": "gpt-4o",
        "categories": ["chat", "vision"],
        "tier": "small",
        "context_window": 128000,
        "display_name": "GPT-4o mini",
    }
    for category in body["categories"]:
        assert all(category["id"] in by_id[m]["categories"] for m in category["models"])


def test_no_alias_routes(fake: FakeUpstream) -> None:
    settings = gateway_settings(fake)
    with serve_in_thread(create_app(settings, ENVIRON), options=uvicorn_options(settings)) as url:
        for path in ("/api/categories", "/api/model-categories", "/api/models/classes"):
            assert httpx2.get(url + path, timeout=10).status_code == 404
