"""The published OpenAPI document, and schemathesis against the REST API it describes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.auth import digest, new_key
from server.settings import AuthSettings
from tests.fakeupstream import FakeUpstream
from tests.support.gateways import gateway_with

KEY = new_key()


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    with gateway_with(upstream, auth=AuthSettings(keys=[digest(KEY)])) as url:
        yield url


def test_the_document_is_published_behind_the_key(gateway: str) -> None:
    assert httpx2.get(gateway + "/api/openapi.json").status_code == 401
    response = httpx2.get(gateway + "/api/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/api/chat/completions",
        "/api/chat/completions/{stream_id}/cancel",
        "/api/chat/completions/{stream_id}/stream",
        "/api/models",
        "/api/responses",
        "/api/responses/{response_id}",
        "/api/responses/{response_id}/input_items",
        "/api/v1/messages",
        "/api/v1/messages/count_tokens",
        "/api/v1/models",
    }


@pytest.mark.parametrize(
    "operation", ["POST /api/chat/completions", "POST /api/responses", "GET /api/models"]
)
def test_api_conforms_and_never_fails(gateway: str, operation: str) -> None:
    api = schemathesis.openapi.from_url(
        gateway + "/api/openapi.json", headers={"Authorization": f"Bearer {KEY}"}
    )
    method, path = operation.split(" ")
    strategy = api[path][method].as_strategy()

    @given(case=strategy)
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert response.status_code < 500, response.text
        # Schema-valid bodies may still be refused for reasons a schema does not say (an
        # unknown model, a feature not served yet, a `[limits]` limit): those are 4xx by design.
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    check()
