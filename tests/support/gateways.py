"""Gateways with `[auth]` and `[limits]` settings, on the shared fake upstream."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from server.app import create_app
from server.settings import AuthSettings, LimitSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread


@contextlib.contextmanager
def gateway_with(
    upstream: FakeUpstream,
    *,
    auth: AuthSettings | None = None,
    limits: LimitSettings | None = None,
    **settings: Any,
) -> Iterator[str]:
    """Serve a gateway with these settings on 127.0.0.1; yields its base URL."""
    config = Settings(
        auth=auth or AuthSettings(),
        limits=limits or LimitSettings(),
        providers=provider_settings(upstream),
        **settings,
    )
    with serve_in_thread(create_app(config, ENVIRON), options=uvicorn_options(config)) as url:
        yield url
