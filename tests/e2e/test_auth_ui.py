"""The UI with gateway keys configured: asked once, kept in the browser, never in a URL."""

from __future__ import annotations

from tests.e2e.conftest import UIFactory
from tests.fakeupstream import Script

KEY = "tr-ui-test-key-0123456789abcdef"


def test_the_ui_asks_for_a_key_once_and_streams_over_the_socket(make_ui: UIFactory) -> None:
    with make_ui(auth_keys=[KEY], fast=Script(tokens=4)) as ui:
        page = ui.page
        page.goto(ui.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "not-the-key")
        page.press("#key-input", "Enter")
        # The wrong key is refused and asked for again, saying so.
        page.wait_for_selector("#key-dialog[open] #key-reason:has-text('refused')")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#model option", state="attached")
        page.select_option("#model", ui.models["fast"])
        page.wait_for_selector("#connection[data-mode=websocket]")
        ui.send("hello with a key")
        ui.wait_state("done")
        assert "tok0 tok1 tok2 tok3" in ui.answer().inner_text()
        assert ui.upstream_request("fast") is not None
        assert page.evaluate("localStorage.getItem('tokenrelay.key')") == KEY
        # After a reload the stored key is used without asking.
        page.reload()
        page.wait_for_selector("#model option", state="attached")
        page.wait_for_selector("#connection[data-mode=websocket]")
        assert not page.locator("#key-dialog[open]").count()
        assert all(KEY not in url for url in ui.requests)  # never in a URL
        ui.assert_only_local_requests()
