"""The chat UI in headless Chromium: streaming, stop, picker, storage, SSE fallback, errors."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from tests.e2e.conftest import UIFactory, screenshot, wait_disconnected
from tests.fakeupstream import Script

# A markdown answer in small pieces, as a model streams it: heading, table, list, code block.
MARKDOWN = [
    "## Stream",
    "ing ",
    "report\n\n",
    "The gateway relays ",
    "each token ",
    "as it ",
    "arrives.\n\n",
    "| transport ",
    "| first token |\n",
    "|---|---|\n",
    "| WebSocket ",
    "| fast |\n",
    "| SSE ",
    "| fast too |\n\n",
    "Steps:\n\n",
    "1. Open ",
    "the page\n",
    "2. Pick ",
    "a model\n",
    "3. Ask\n\n",
    "```python\n",
    "from openai ",
    "import OpenAI\n",
    "client = OpenAI(",
    'base_url="http://127.0.0.1:8000/api")\n',
    "```\n\n",
    *[f"word{i} " for i in range(30)],
    "\n\nDone.",
]

# Records the answer's text after every DOM change, so the test sees each intermediate state.
OBSERVE = """() => {
  window.__states = [];
  const log = document.getElementById('messages');
  new MutationObserver(() => {
    const answer = log.querySelector('article.assistant:last-of-type .content');
    if (answer) window.__states.push(answer.textContent);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""


def test_answer_streams_progressively_with_ttft(make_ui: UIFactory) -> None:
    with make_ui(md=Script(text=MARKDOWN, pace=0.03)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["md"])
        ui.page.evaluate(OBSERVE)
        ui.send("Show me a report")
        # Mid-stream: the table is rendered while later pieces are still coming.
        ui.page.wait_for_selector("article.assistant[data-state=streaming] table td")
        assert ui.answer().get_attribute("aria-busy") == "true"
        mid = screenshot(ui.page, "ui-mid-stream.png")
        ui.wait_state("done")
        screenshot(ui.page, "ui-finished.png")
        states = [s for s in ui.page.evaluate("window.__states") if s]
        final = ui.answer().locator(".content").inner_text()
        partial = {s for s in states if s.strip() and "Done." not in s}
        assert len(partial) >= 5, f"too few intermediate states: {len(partial)}"
        # Each observed state extends the one before: text is appended, never redrawn from scratch.
        lengths = [len(s) for s in states]
        assert lengths == sorted(lengths)
        assert "Done." in final and "word29" in final
        answer = ui.answer()
        assert answer.locator("h2", has_text="Streaming report").count() == 1
        assert answer.locator("table tr").count() == 3
        assert answer.locator("ol li").count() == 3
        assert answer.locator("pre code .hljs-keyword").count() >= 1  # highlighted
        assert answer.locator(".code button", has_text="Copy").count() == 1  # the code block's
        meta = answer.locator(".meta").inner_text()
        assert re.search(r"TTFT \d+(\.\d+)? (ms|s)", meta), meta
        assert "tok/s" in meta and ui.models["md"] in meta
        assert ui.page.locator("#messages").get_attribute("aria-live") == "polite"
        assert mid.exists()
        ui.assert_only_local_requests()


def test_stop_cancels_upstream_and_keeps_the_partial_answer(make_ui: UIFactory) -> None:
    with make_ui(long=Script(tokens=400, pace=0.02)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["long"])
        ui.send("Talk for a long time")
        ui.page.wait_for_selector("article.assistant .content:has-text('tok3 ')")
        ui.page.click("#stop")
        ui.wait_state("stopped")
        recorded = ui.upstream_request("long")
        wait_disconnected(recorded)
        assert recorded.deltas_sent < 400
        answer = ui.answer()
        text = answer.locator(".content").inner_text()
        assert text.startswith("tok0 tok1 tok2 tok3")
        assert "tok399" not in text
        assert answer.locator(".meta .badge", has_text="stopped").is_visible()
        assert ui.page.locator("#send").is_visible() and not ui.page.locator("#stop").is_visible()
        # The stopped answer can be regenerated; Esc stops too.
        ui.answer().get_by_role("button", name="Regenerate").click()
        ui.page.wait_for_selector(
            "article.assistant[data-state=streaming] .content:has-text('tok1 ')"
        )
        ui.page.keyboard.press("Escape")
        ui.wait_state("stopped")
        assert ui.page.locator("article.assistant").count() == 1
        wait_disconnected(ui.upstream.by_model(recorded.model or "")[-1])


def test_model_picker_groups_by_category_each_model_once_and_switches(make_ui: UIFactory) -> None:
    with make_ui(first=Script(tokens=2), second=Script(tokens=3)) as ui:
        categories = ui.url + "/api/models/categories"
        try:
            with urllib.request.urlopen(categories) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"the gateway does not serve {categories}: {exc}") from None
        ui.open()
        groups = ui.page.eval_on_selector_all(
            "#model optgroup",
            "els => els.map(g => [g.label, [...g.querySelectorAll('option')].map(o => o.value)])",
        )
        # Each model once, in the first category that lists it.
        seen: set[str] = set()
        expected = []
        for category in body["categories"]:
            fresh = [m for m in category["models"] if m not in seen]
            seen.update(fresh)
            if fresh:
                expected.append([category["label"], fresh])
        assert groups == expected
        values = ui.page.eval_on_selector_all("#model option", "els => els.map(o => o.value)")
        assert sorted(values) == sorted(m["id"] for m in body["models"])
        ui.page.select_option("#model", ui.models["second"])
        assert ui.models["second"].split("/")[0] in ui.page.inner_text("#model-info")
        ui.send("Which model?")
        ui.wait_state("done")
        assert ui.upstream_request("second").body["model"] == ui.models["second"].split("/", 1)[1]
        assert ui.answer().locator(".meta").inner_text().endswith(ui.models["second"])
        ui.page.reload()
        ui.page.wait_for_selector("#model option", state="attached")
        assert ui.page.input_value("#model") == ui.models["second"]  # remembered


def test_without_categories_endpoint_models_form_one_group(make_ui: UIFactory) -> None:
    with make_ui(only=Script(tokens=1)) as ui:
        # A gateway without the endpoint answers 404; the picker must still list every model.
        ui.page.route(
            "**/api/models/categories", lambda route: route.fulfill(status=404, body="{}")
        )
        ui.open()
        labels = ui.page.eval_on_selector_all("#model optgroup", "els => els.map(g => g.label)")
        assert labels == ["Models"]
        values = ui.page.eval_on_selector_all("#model option", "els => els.map(o => o.value)")
        assert ui.models["only"] in values and "demo/echo" in values


def test_conversations_survive_reload(make_ui: UIFactory) -> None:
    with make_ui(quick=Script(tokens=2)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["quick"])
        ui.send("First conversation")
        ui.wait_state("done")
        ui.page.click("#new-chat")
        ui.send("Second conversation")
        ui.wait_state("done")
        second = ui.page.locator("li.conversation.current")
        second.get_by_role("button", name=re.compile("Rename")).click()
        ui.page.fill(".rename-input", "Renamed chat")
        ui.page.press(".rename-input", "Enter")
        ui.page.reload()
        ui.page.wait_for_selector("li.conversation")
        titles = ui.page.locator("li.conversation .open").all_inner_texts()
        assert titles == ["Renamed chat", "First conversation"]
        assert (
            ui.page.locator("article.user .content").inner_text().strip() == "Second conversation"
        )
        assert ui.answer().locator(".content").inner_text().strip() == "tok0 tok1"
        ui.page.locator("li.conversation .open", has_text="First conversation").click()
        assert ui.page.locator("article.user .content").inner_text().strip() == "First conversation"
        delete = ui.page.locator("li.conversation.current .delete")
        delete.click()
        delete.click()  # the second click confirms
        ui.page.reload()
        ui.page.wait_for_selector("li.conversation")
        assert ui.page.locator("li.conversation .open").all_inner_texts() == ["Renamed chat"]


def test_sse_fallback_when_websocket_is_blocked(make_ui: UIFactory) -> None:
    with make_ui(
        block_websocket=True, sse=Script(tokens=5), slow=Script(tokens=300, pace=0.02)
    ) as ui:
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=sse]")
        ui.page.select_option("#model", ui.models["sse"])
        ui.send("Over SSE please")
        ui.wait_state("done")
        answer = ui.answer()
        assert answer.locator(".content").inner_text().strip() == "tok0 tok1 tok2 tok3 tok4"
        meta = answer.locator(".meta").inner_text()
        assert "via SSE" in meta and "TTFT" in meta and "5 tokens" in meta
        assert ui.upstream_request("sse").stream is True
        # Stop works over SSE too: the aborted fetch closes the upstream stream.
        ui.page.select_option("#model", ui.models["slow"])
        ui.send("Long one")
        ui.page.wait_for_selector("article.assistant:last-of-type .content:has-text('tok2 ')")
        ui.page.keyboard.press("Escape")
        ui.wait_state("stopped")
        wait_disconnected(ui.upstream_request("slow"))
        assert len(ui.upstream.by_model(ui.models["sse"].split("/", 1)[1])) == 1  # sent once


def test_rate_limit_error_in_plain_words_then_retry(make_ui: UIFactory) -> None:
    with make_ui(limited=Script(status=429, retry_after=7, error_message="slow down")) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["limited"])
        ui.send("Hello?")
        ui.wait_state("error")
        error = ui.answer().locator(".error")
        assert error.get_attribute("role") == "alert"
        assert "Rate limited by the model's provider. Try again in 7 s." in error.inner_text()
        # The upstream recovers; Retry sends the conversation once more, and only once.
        name = ui.models["limited"].split("/", 1)[1]
        ui.upstream.scripts[name] = Script(tokens=2)
        ui.answer().get_by_role("button", name="Retry").click()
        ui.wait_state("done")
        assert ui.answer().locator(".content").inner_text().strip() == "tok0 tok1"
        assert ui.page.locator("article.assistant").count() == 1
        assert len(ui.upstream.by_model(name)) == 2


def test_edit_a_previous_message_and_resend(make_ui: UIFactory) -> None:
    with make_ui(echo=Script(tokens=1)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["echo"])
        ui.send("Original question")
        ui.wait_state("done")
        ui.send("Follow-up")
        ui.wait_state("done")
        ui.page.locator("article.user").first.get_by_role("button", name=re.compile("Edit")).click()
        ui.page.fill("form.edit textarea", "Edited question")
        ui.page.press("form.edit textarea", "Enter")
        ui.wait_state("done")
        assert (
            ui.page.locator("article.user .content").all_inner_texts()[0].strip()
            == "Edited question"
        )
        assert ui.page.locator("article.message").count() == 2
        sent = ui.upstream_request("echo").body["messages"]
        assert sent == [{"role": "user", "content": "Edited question"}]


def test_demo_provider_renders_in_a_phone_width_page(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.page.set_viewport_size({"width": 390, "height": 780})
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        ui.send("Hi")
        ui.wait_state("done")
        width = ui.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390  # nothing overflows sideways
        assert ui.answer().locator("table").count() == 1
        toggle = ui.page.get_by_role("button", name="Show conversations")
        toggle.click()
        assert toggle.get_attribute("aria-expanded") == "true"
        assert ui.page.locator("li.conversation .open").first.is_visible()
