"""The UI with gateway keys configured: asked once, kept in the browser, never in a URL."""

from __future__ import annotations

from playwright.sync_api import Route

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


def test_a_refusal_that_arrives_after_a_new_key_does_not_forget_it(make_ui: UIFactory) -> None:
    """A request sent without a key (the socket's probe, say) whose 401 comes back only after
    the user entered one: that refusal is of no key, and the new key is kept (it used to be
    forgotten, the dialog reopened and the socket never opened)."""
    with make_ui(auth_keys=[KEY], fast=Script(tokens=1)) as ui:
        page = ui.page
        held: list[Route] = []
        let_through: list[str] = []

        def hold_late_refusals(route: Route) -> None:
            if "authorization" in route.request.headers:
                route.continue_()
            elif not let_through:  # the first one opens the key dialog
                let_through.append(route.request.url)
                route.continue_()
            else:
                held.append(route)

        page.route("**/api/models", hold_late_refusals)
        page.goto(ui.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        for _ in range(200):  # the socket, refused without a key, asks over HTTP why
            if held:
                break
            page.wait_for_timeout(25)
        assert held, "no request without a key was held"
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#model option", state="attached")
        for route in held:  # their 401s arrive now, after the key
            route.continue_()
        page.wait_for_selector("#connection[data-mode=websocket]")
        page.wait_for_timeout(300)
        assert not page.locator("#key-dialog[open]").count()
        assert page.evaluate("localStorage.getItem('tokenrelay.key')") == KEY
