"""The UI in headless Chromium (Debian's binary) against a real gateway and the fake upstream."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, Request, sync_playwright
from starlette.types import ASGIApp, Receive, Scope, Send

from providers.settings import ProviderSettings
from server.app import create_app
from server.auth import digest
from server.settings import AuthSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, RecordedRequest, Script
from tests.support.servers import serve_in_thread

CHROMIUM = os.environ.get("TOKENRELAY_CHROMIUM", "/usr/bin/chromium")
# The browser talks to the gateway on loopback and to nothing else. Without these switches
# Chromium calls Google services (autofill predictions, sign-in, updates, DNS-over-HTTPS
# probes) even with background networking off: every name but the loopback ones resolves to
# nothing, and whatever is left goes to a proxy port where nothing listens.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-pings",
    "--disable-features=AutofillServerCommunication,DnsOverHttps,OptimizationHints,"
    "MediaRouter,Translate,InterestFeedContentSuggestions,CertificateTransparencyComponentUpdater",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
]
# What remains is Chromium's IPv6 reachability check: a UDP socket connected (not written to)
# to learn the local route, which sends no packet.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    # Module scope: the sync API's event loop must not outlive the e2e modules, whose neighbours
    # are asyncio tests.
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"Chromium not found at {CHROMIUM}; run scripts/install-system-deps")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


class _RefuseWebSockets:
    """Refuses every WebSocket handshake (403), as a proxy that does not pass upgrades would."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._app(scope, receive, send)


@dataclass
class UI:
    """One page on a fresh gateway; `requests` is every URL the page asked for."""

    url: str
    page: Page
    upstream: FakeUpstream
    models: dict[str, str]  # label given by the test -> model id the gateway serves
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("#model option", state="attached")

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answer(self, n: int = -1) -> Any:
        """The n-th assistant message (default the last) as a locator."""
        answers = self.page.locator("article.assistant")
        return answers.last if n == -1 else answers.nth(n)

    def wait_state(self, state: str, timeout: float = 10_000) -> None:
        self.page.wait_for_selector(
            f"article.assistant:last-of-type[data-state={state}]", timeout=timeout
        )

    def upstream_request(self, label: str, timeout: float = 5.0) -> RecordedRequest:
        model = self.models[label].split("/", 1)[1]
        deadline = time.monotonic() + timeout
        while not (found := self.upstream.by_model(model)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the upstream saw no request for {model}")
            time.sleep(0.005)
        return found[-1]

    def assert_only_local_requests(self) -> None:
        origin = self.url + "/"
        remote = [
            u
            for u in self.requests
            if not u.startswith(origin) and not u.startswith(self.url.replace("http", "ws") + "/")
        ]
        assert remote == [], f"requests left the test server: {remote}"


def wait_disconnected(req: RecordedRequest, timeout: float = 5.0) -> float:
    """Poll (from a sync test) until the fake upstream recorded the client's disconnect."""
    deadline = time.monotonic() + timeout
    while req.disconnected_at is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the upstream saw no disconnect")
        time.sleep(0.005)
    return req.disconnected_at


UIFactory = Callable[..., contextlib.AbstractContextManager[UI]]


@pytest.fixture(scope="module")
def ui_upstream() -> Iterator[FakeUpstream]:
    """A fake upstream of the browser tests' own, whose model list each test extends."""
    with FakeUpstream(api_key=UPSTREAM_KEY, models=[]).running_in_thread() as fake:
        yield fake


@pytest.fixture
def make_ui(browser: Browser, ui_upstream: FakeUpstream) -> UIFactory:
    """Start a gateway serving one scripted upstream model per keyword, and a page on it.

    `make_ui(fast=Script(tokens=3), slow=Script(pace=0.02))` serves `oai/<fresh name>` for each
    label next to the demo provider; `block_websocket=True` refuses upgrades.
    """

    @contextlib.contextmanager
    def start(
        *, block_websocket: bool = False, auth_keys: list[str] | None = None, **scripts: Script
    ) -> Iterator[UI]:
        names = {label: f"ui-{label}-{uuid.uuid4().hex[:8]}" for label in scripts}
        upstream = ui_upstream
        for label, script in scripts.items():
            upstream.scripts[names[label]] = script
        # The catalogue lists only what the upstream lists, like a real provider would.
        assert upstream.models is not None
        upstream.models.extend(names.values())
        providers = [
            ProviderSettings(
                name="oai",
                kind="openai",
                base_url=upstream.url + "/v1",
                api_key_env="FAKE_OPENAI_KEY",
                models=list(names.values()),
                first_token_timeout=10.0,
                idle_timeout=10.0,
                retries=0,  # upstream errors reach the page at once: the page is under test
            ),
            ProviderSettings(name="demo", kind="demo", pace=0.001),
        ]
        auth = AuthSettings(keys=[digest(key) for key in auth_keys or ()])
        settings = Settings(providers=providers, auth=auth)
        app: ASGIApp = create_app(settings, ENVIRON)
        if block_websocket:
            app = _RefuseWebSockets(app)
        with serve_in_thread(app, options=uvicorn_options(settings)) as url:
            context = browser.new_context(viewport={"width": 1100, "height": 760})
            page = context.new_page()
            ui = UI(url, page, upstream, {label: f"oai/{n}" for label, n in names.items()})

            def record(request: Request) -> None:
                ui.requests.append(request.url)

            page.on("request", record)
            page.on("websocket", lambda ws: ui.requests.append(ws.url))
            page.on("pageerror", lambda exc: ui.errors.append(str(exc)))
            try:
                yield ui
                assert ui.errors == [], f"uncaught errors in the page: {ui.errors}"
            finally:
                context.close()

    return start


def screenshot(page: Page, name: str, *, settled: bool = False) -> Path:
    """Write `test-artifacts/<name>`; `settled` finishes running CSS transitions first."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), animations="disabled" if settled else "allow")
    return path
