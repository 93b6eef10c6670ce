"""The UI when models are missing, and the everyday extras: system prompt, export, copy,
model search, reasoning while it streams, the phone header and the model info line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page

from providers.settings import ProviderSettings
from server.app import create_app
from server.settings import Settings, uvicorn_options
from tests.conftest import ENVIRON
from tests.e2e.conftest import UIFactory, screenshot
from tests.fakeupstream import Script
from tests.support.process import free_port
from tests.support.servers import serve_in_thread


def unreachable_provider() -> ProviderSettings:
    """An OpenAI-kind provider on a loopback port where nothing listens."""
    return ProviderSettings(
        name="openai",
        kind="openai",
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        api_key_env="FAKE_OPENAI_KEY",
        retries=0,
    )


@contextlib.contextmanager
def page_on(browser: Browser, settings: Settings) -> Iterator[Page]:
    """A page on a gateway with exactly these settings; fails on uncaught page errors."""
    with serve_in_thread(create_app(settings, ENVIRON), options=uvicorn_options(settings)) as url:
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(url + "/")
            yield page
            assert errors == [], errors
        finally:
            context.close()


def test_no_model_disables_sending_and_says_why(browser: Browser) -> None:
    settings = Settings(providers=[unreachable_provider()], demo=False)
    with page_on(browser, settings) as page:
        notice = page.locator("#notice.blocking")
        notice.wait_for()
        text = notice.inner_text()
        assert "No model is available" in text
        assert "openai: upstream unreachable (connection refused)" in text
        assert page.is_disabled("#send")
        assert "No model is available" in (page.get_attribute("#send", "title") or "")
        page.fill("#prompt", "Hello?")
        page.press("#prompt", "Enter")
        assert page.locator("article.assistant").count() == 0  # nothing was sent
        assert page.input_value("#prompt") == "Hello?"  # and nothing was lost
        screenshot(page, "ui-no-model.png", settled=True)


def test_no_provider_configured_is_said_plainly(browser: Browser) -> None:
    with page_on(browser, Settings(providers=[], demo=False)) as page:
        notice = page.locator("#notice.blocking")
        notice.wait_for()
        assert "no provider configured" in notice.inner_text()
        assert page.is_disabled("#send")


def test_unreachable_provider_is_visible_while_the_demo_serves(browser: Browser) -> None:
    providers = [unreachable_provider(), ProviderSettings(name="demo", kind="demo", pace=0.001)]
    with page_on(browser, Settings(providers=providers)) as page:
        notice = page.locator("#notice")
        notice.wait_for()
        assert "blocking" not in (notice.get_attribute("class") or "")
        text = notice.inner_text()
        assert "openai is unavailable" in text
        assert "connection refused" in text
        assert "127.0.0.1" not in text  # the cause, not the address
        page.select_option("#model", "demo/echo")
        assert page.is_enabled("#send")
        page.fill("#prompt", "Still works")
        page.press("#prompt", "Enter")
        page.wait_for_selector("article.assistant[data-state=done]")


def test_system_prompt_is_kept_per_conversation(make_ui: UIFactory) -> None:
    with make_ui(plain=Script(tokens=2)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["plain"])
        ui.page.click("#system summary")
        ui.page.fill("#system-prompt", "Answer in French.")
        assert "Answer in French." in ui.page.inner_text("#system-state")
        ui.send("Hello")
        ui.wait_state("done")
        messages = ui.upstream_request("plain").body["messages"]
        assert messages[0] == {"role": "system", "content": "Answer in French."}
        assert messages[1]["role"] == "user"
        # A new conversation starts without one; the first keeps its own, across a reload.
        ui.page.click("#new-chat")
        assert ui.page.input_value("#system-prompt") == ""
        ui.page.reload()
        ui.page.wait_for_selector("#model option", state="attached")
        ui.page.locator("li.conversation .open", has_text="Hello").click()
        assert ui.page.input_value("#system-prompt") == "Answer in French."


def test_export_markdown_and_json(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        ui.send("Export me")
        ui.wait_state("done")
        ui.page.click("#export-menu summary")
        with ui.page.expect_download() as markdown:
            ui.page.click("#export-md")
        assert markdown.value.suggested_filename == "export-me.md"
        text = Path(markdown.value.path()).read_text(encoding="utf-8")
        assert text.startswith("# Export me\n")
        assert "## You\n\nExport me\n" in text
        assert "## Assistant (demo/echo)" in text
        assert "You wrote: *Export me*" in text
        ui.page.click("#export-menu summary")
        with ui.page.expect_download() as exported:
            ui.page.click("#export-json")
        assert exported.value.suggested_filename == "export-me.json"
        body = json.loads(Path(exported.value.path()).read_text(encoding="utf-8"))
        assert body["format"] == "tokenrelay.conversation.v1"
        assert body["title"] == "Export me"
        assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
        assert body["messages"][1]["model"] == "demo/echo"
        assert "You wrote" in body["messages"][1]["content"]
        # The menu closes on a click elsewhere and on Escape.
        ui.page.click("#export-menu summary")
        assert ui.page.is_visible("#export-md")
        ui.page.click("#messages")
        assert not ui.page.is_visible("#export-md")
        ui.page.click("#export-menu summary")
        ui.page.keyboard.press("Escape")
        assert not ui.page.is_visible("#export-md")


def test_copy_a_whole_answer(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ui.url)
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        ui.send("Copy this")
        ui.wait_state("done")
        ui.answer().locator(".actions button", has_text="Copy").click()
        ui.answer().locator(".actions button", has_text="Copied").wait_for()
        copied = ui.page.evaluate("navigator.clipboard.readText()")
        stored = ui.page.evaluate(
            "JSON.parse(localStorage.getItem('tokenrelay.conversations.v1'))"
            ".conversations[0].messages[1].content"
        )
        assert copied == stored
        assert copied.startswith("## tokenrelay demo") and "```python" in copied


def test_model_search_filters_and_lists_each_model_once(make_ui: UIFactory) -> None:
    with make_ui(alpha=Script(tokens=1), beta=Script(tokens=1)) as ui:
        ui.open()
        values = ui.page.eval_on_selector_all("#model option", "els => els.map(o => o.value)")
        assert len(values) == len(set(values))  # demo/echo is vision and chat, shown once
        assert {ui.models["alpha"], ui.models["beta"], "demo/echo"} <= set(values)
        ui.page.fill("#model-search", "alpha")
        options = ui.page.eval_on_selector_all("#model option", "els => els.map(o => o.value)")
        assert options == [ui.models["alpha"]]
        assert ui.page.input_value("#model") == ui.models["alpha"]
        ui.page.fill("#model-search", "no such model")
        assert ui.page.locator("#model option").count() == 0
        assert "No model matches" in ui.page.inner_text("#model-info")
        assert ui.page.is_disabled("#send")
        ui.page.press("#model-search", "Escape")
        assert ui.page.locator("#model option").count() == len(values)
        assert ui.page.input_value("#model") == ui.models["alpha"]  # the pick is kept
        assert ui.page.is_enabled("#send")


def test_reasoning_is_open_while_it_streams(make_ui: UIFactory) -> None:
    # Three reasoning pieces, one word of the answer, then the upstream holds the stream.
    with make_ui(think=Script(reasoning=["Let ", "me ", "think. "], tokens=3, hang_after=4)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["think"])
        ui.send("Think first")
        ui.page.wait_for_selector("article.assistant[data-state=streaming] .content :text('tok0')")
        reasoning = ui.answer().locator("details.reasoning")
        assert reasoning.get_attribute("open") is not None
        assert "think." in reasoning.inner_text()
        ui.page.click("#stop")
        ui.wait_state("stopped")
        assert reasoning.get_attribute("open") is None  # folded once the answer ends
        reasoning.locator("summary").click()
        assert reasoning.get_attribute("open") is not None


def test_phone_header_is_compact(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        ui.page.set_viewport_size({"width": 390, "height": 780})
        ui.page.select_option("#model", "demo/reasoner")
        header = ui.page.locator("header.toolbar").bounding_box()
        assert header is not None
        assert header["height"] <= 90, header  # one row of controls and one line of details
        for selector in ("#toggle-sidebar", "#model", "#model-search", "#export-menu summary"):
            box = ui.page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        assert ui.page.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(ui.page, "ui-phone-header.png", settled=True)


def test_model_info_line_says_each_thing_once(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        for model in ("demo/echo", "demo/reasoner", "demo/tools"):
            ui.page.select_option("#model", model)
            parts = [p.strip().lower() for p in ui.page.inner_text("#model-info").split("·")]
            assert parts[0] == "demo"
            assert len(parts) == len(set(parts)), parts
