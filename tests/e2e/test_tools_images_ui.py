"""Tool calls and images in the UI: calls shown and answered, images attached, kept on reload."""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

from playwright.sync_api import WebSocket

from tests.e2e.conftest import UI, UIFactory, screenshot


def png(width: int = 96, height: int = 64, rgb: tuple[int, int, int] = (234, 88, 12)) -> bytes:
    """A small solid-colour PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels stored uncompressed: about width * height * 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + os.urandom(width * 3) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 0))
        + chunk(b"IEND", b"")
    )


def record_starts(ui: UI) -> list[dict[str, Any]]:
    """Every `chat.start` request the page sends over its socket, in order."""
    requests: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        frame = json.loads(payload)
        if frame.get("type") == "chat.start":
            requests.append(frame["request"])

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", on_frame)

    ui.page.on("websocket", on_socket)
    return requests


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def attach(ui: UI, *files: tuple[str, str, bytes]) -> None:
    ui.page.set_input_files(
        "#attach-input",
        files=[{"name": name, "mimeType": mime, "buffer": data} for name, mime, data in files],
    )


# Pastes one file into the message box, as Ctrl+V of a copied image does.
PASTE = """([name, type, bytes]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, {type}));
  const event = new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
  document.getElementById('prompt').dispatchEvent(event);
}"""


# Records the tool call's shown arguments after every DOM change.
OBSERVE_ARGS = """() => {
  window.__args = [];
  new MutationObserver(() => {
    const args = document.querySelector('article.assistant:last-of-type .tool-args');
    if (args) window.__args.push(args.textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_tool_call_is_shown_answered_and_kept_on_reload(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        starts = record_starts(ui)
        ui.open()
        assert not ui.page.is_checked("#example-tool")
        ui.page.select_option("#model", "demo/tools")
        assert ui.page.is_checked("#example-tool")  # picking the tools model offers the tool
        ui.page.evaluate(OBSERVE_ARGS)
        ui.send("What is the weather in Lisbon?")
        ui.wait_state("done")
        # The arguments streamed in: some states shown were unfinished JSON, shown raw.
        states = ui.page.evaluate("window.__args")
        assert any(s.startswith("{") and not _is_json(s) for s in states), states
        call = ui.answer().locator(".tool-call")
        assert call.count() == 1
        assert call.locator(".tool-name").inner_text() == "get_weather"
        shown = call.locator(".tool-args").inner_text()
        assert json.loads(shown).keys() >= {"city"}
        assert "\n" in shown  # pretty-printed
        assert not ui.answer().locator(".empty-answer").is_visible()
        assert starts[0]["tools"][0]["function"]["name"] == "get_weather"
        screenshot(ui.page, "ui-tool-call.png")
        ui.page.emulate_media(color_scheme="dark")
        screenshot(ui.page, "ui-tool-call-dark.png")
        ui.page.emulate_media(color_scheme="light")
        ui.page.set_viewport_size({"width": 390, "height": 780})
        assert ui.page.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(ui.page, "ui-tool-call-phone.png", settled=True)
        ui.page.set_viewport_size({"width": 1100, "height": 760})

        stored = ui.page.evaluate(
            "JSON.parse(localStorage.getItem('tokenrelay.conversations.v1'))"
            ".conversations[0].messages[1]"
        )
        calls = stored["tool_calls"]
        assert [(c["type"], c["function"]["name"]) for c in calls] == [("function", "get_weather")]
        assert json.loads(calls[0]["function"]["arguments"]) == json.loads(shown)

        ui.page.reload()
        ui.page.wait_for_selector("article.assistant .tool-call")
        call = ui.answer().locator(".tool-call")
        assert call.locator(".tool-name").inner_text() == "get_weather"
        assert json.loads(call.locator(".tool-args").inner_text()) == json.loads(shown)

        # The page runs no tool: the user types its result, and the model goes on from it.
        form = ui.answer().locator("form.tool-reply-form")
        form.locator("textarea").fill('{"temperature": 21, "sky": "clear"}')
        form.get_by_role("button", name="Send result").click()
        ui.page.wait_for_selector("article.assistant:last-of-type[data-state=done]")
        ui.wait_state("done")
        result = ui.page.locator("article.tool")
        assert "Result of get_weather" in result.inner_text()
        assert "The tool get_weather answered" in ui.answer().inner_text()
        assert '"sky": "clear"' in ui.answer().locator(".content").inner_text()
        sent = starts[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["content"] is None
        assert sent[1]["tool_calls"][0]["id"] == sent[2]["tool_call_id"] == calls[0]["id"]
        screenshot(ui.page, "ui-tool-result.png")


def test_a_call_left_unanswered_is_not_sent(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        starts = record_starts(ui)
        ui.open()
        ui.page.select_option("#model", "demo/tools")
        ui.send("Weather?")
        ui.wait_state("done")
        assert ui.answer().locator("form.tool-reply-form").is_visible()
        # A new message instead of a result: the call is marked and left out of the history.
        ui.page.uncheck("#example-tool")
        ui.send("Never mind, just echo this")
        ui.wait_state("done")
        assert ui.page.locator("article.assistant").count() == 2
        first = ui.answer(0)
        assert first.locator("form.tool-reply-form").count() == 0
        assert "Not answered" in first.locator(".tool-note").inner_text()
        assert "You wrote" in ui.answer().locator(".content").inner_text()
        sent = starts[-1]
        assert "tools" not in sent
        assert sent["messages"] == [
            {"role": "user", "content": "Weather?"},
            {"role": "user", "content": "Never mind, just echo this"},
        ]


def test_history_rules_for_tool_calls_and_images(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        out = ui.page.evaluate(
            """async () => {
              const { requestMessages } = await import('./js/tools.js');
              const call = (id) => ({ id, type: 'function', function: { name: 'f', arguments: '{}' } });
              const img = 'data:image/png;base64,AAAA';
              const messages = [
                { role: 'user', content: 'look', images: [img] },
                { role: 'assistant', content: 'Let me check.', status: 'done', tool_calls: [call('a'), call('b')] },
                { role: 'tool', tool_call_id: 'a', content: '1' },
                { role: 'tool', tool_call_id: 'b', content: '2' },
                { role: 'assistant', content: '', refusal: 'I cannot.', status: 'done' },
                { role: 'user', content: 'next' },
                { role: 'assistant', content: '', status: 'stopped', tool_calls: [call('c')] },
                { role: 'user', content: '', images: [img] },
              ];
              // Images past the budget are left out, oldest first.
              const big = 'data:image/png;base64,' + 'A'.repeat(400000);
              const many = [1, 2, 3].map((n) => ({ role: 'user', content: `p${n}`, images: [big] }));
              return [
                requestMessages(messages),
                requestMessages(messages, { images: false }),
                requestMessages(many).map((m) => m.content.map((p) => p.type)),
              ];
            }"""
        )
        vision, text_only, budgeted = out
        assert budgeted == [["text", "text"], ["text", "image_url"], ["text", "image_url"]]
        assert vision[0] == {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"},
                },
            ],
        }
        assert [m["role"] for m in vision] == [
            "user",
            "assistant",
            "tool",
            "tool",
            "assistant",
            "user",
            "user",
        ]
        assert vision[1]["content"] == "Let me check."
        assert [c["id"] for c in vision[1]["tool_calls"]] == ["a", "b"]
        assert vision[4] == {"role": "assistant", "content": "I cannot."}
        assert text_only[0] == {"role": "user", "content": "look"}
        assert text_only[-1]["content"] == "[an image this model cannot read]"


def test_an_attached_image_is_sent_shown_and_kept(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        starts = record_starts(ui)
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        assert ui.page.is_visible("#attach")
        attach(
            ui, ("blue.png", "image/png", png()), ("red.png", "image/png", png(rgb=(220, 38, 38)))
        )
        tray = ui.page.locator("#attachments")
        tray.locator("img").nth(1).wait_for()
        assert tray.locator("img").count() == 2
        tray.get_by_role("button", name="Remove image 2").click()
        assert tray.locator("img").count() == 1
        # A file that is not an image of an accepted type is refused in words.
        attach(ui, ("notes.txt", "text/plain", b"hello"))
        assert "not a PNG, JPEG, GIF or WebP" in ui.page.inner_text("#composer-note")
        ui.page.fill("#prompt", "What is in this picture?")
        screenshot(ui.page, "ui-image-attached.png")
        ui.send("What is in this picture?")
        ui.wait_state("done")
        assert not tray.is_visible()
        shown = ui.page.locator("article.user .images img")
        assert shown.count() == 1
        assert (shown.get_attribute("src") or "").startswith("data:image/png;base64,")
        assert shown.evaluate("img => img.complete && img.naturalWidth") == 96
        row = ui.answer().locator("tr", has_text="images attached")
        assert row.locator("td").all_inner_texts() == ["images attached", "1"]
        content = starts[-1]["messages"][0]["content"]
        assert [p["type"] for p in content] == ["text", "image_url"]
        assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
        shown.scroll_into_view_if_needed()
        screenshot(ui.page, "ui-image.png")
        zoom = ui.page.get_by_role("button", name="Image 1: show full size")
        zoom.click()
        assert zoom.get_attribute("aria-pressed") == "true"
        assert shown.evaluate("img => getComputedStyle(img).maxHeight") == "none"
        ui.assert_only_local_requests()

        ui.page.reload()
        ui.page.wait_for_selector("article.user .images img")
        assert ui.page.locator("article.user .images img").count() == 1


def test_paste_attaches_and_large_images_are_shrunk(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        starts = record_starts(ui)
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        ui.page.evaluate(PASTE, ["pasted.png", "image/png", list(png())])
        ui.page.locator("#attachments img").wait_for()
        # A picture with a side over 1568 px goes as a JPEG that fits.
        attach(ui, ("wide.png", "image/png", png(width=3000, height=10)))
        ui.page.locator("#attachments img").nth(1).wait_for()
        ui.send("Two images")
        ui.wait_state("done")
        parts = starts[-1]["messages"][0]["content"]
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert urls[0].startswith("data:image/png;base64,")
        assert urls[1].startswith("data:image/jpeg;base64,")
        row = ui.answer().locator("tr", has_text="images attached")
        assert row.locator("td").all_inner_texts() == ["images attached", "2"]
        # A file over the size limit is refused in words.
        big = b"\x89PNG" + bytes(11 * 1024 * 1024)
        attach(ui, ("huge.png", "image/png", big))
        assert "over 10 MB" in ui.page.inner_text("#composer-note")
        assert ui.page.locator("#attachments img").count() == 0


def test_attach_is_unavailable_for_a_model_without_vision(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        ui.page.select_option("#model", "demo/reasoner")
        assert not ui.page.is_visible("#attach")
        assert ui.page.is_disabled("#attach-input")
        ui.page.evaluate(PASTE, ["pasted.png", "image/png", list(png())])
        assert "does not read images" in ui.page.inner_text("#composer-note")
        assert ui.page.locator("#attachments img").count() == 0
        # Picking a vision model makes it available; going back hides it again.
        ui.page.select_option("#model", "demo/echo")
        assert ui.page.is_visible("#attach")
        ui.page.select_option("#model", "demo/reasoner")
        assert not ui.page.is_visible("#attach")


def test_tool_calls_over_sse(make_ui: UIFactory) -> None:
    with make_ui(block_websocket=True) as ui:
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=sse]")
        ui.page.select_option("#model", "demo/tools")
        ui.send("Weather over SSE?")
        ui.wait_state("done")
        call = ui.answer().locator(".tool-call")
        assert call.locator(".tool-name").inner_text() == "get_weather"
        assert "city" in json.loads(call.locator(".tool-args").inner_text())
        assert "via SSE" in ui.answer().locator(".meta").inner_text()


# An upstream that refuses, as OpenAI streams a refusal for a structured-output request.
REFUSAL_SSE = (
    "".join(
        f"data: {json.dumps(chunk)}\n\n"
        for chunk in [
            {"model": "demo/echo", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"model": "demo/echo", "choices": [{"index": 0, "delta": {"refusal": "I can't "}}]},
            {
                "model": "demo/echo",
                "choices": [{"index": 0, "delta": {"refusal": "help with that."}}],
            },
            {"model": "demo/echo", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
    )
    + "data: [DONE]\n\n"
)


def test_a_refusal_is_shown_as_such(make_ui: UIFactory) -> None:
    with make_ui(block_websocket=True) as ui:
        ui.page.route(
            "**/api/chat/completions",
            lambda route: route.fulfill(
                status=200, content_type="text/event-stream", body=REFUSAL_SSE
            ),
        )
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=sse]")
        ui.page.select_option("#model", "demo/echo")
        ui.send("Something it will not do")
        ui.wait_state("done")
        refusal = ui.answer().locator(".refusal")
        assert refusal.inner_text() == "The model refused: I can't help with that."
        assert not ui.answer().locator(".empty-answer").is_visible()
        stored = ui.page.evaluate(
            "JSON.parse(localStorage.getItem('tokenrelay.conversations.v1'))"
            ".conversations[0].messages[1].refusal"
        )
        assert stored == "I can't help with that."


def test_a_request_too_big_for_a_socket_frame_goes_over_sse(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        starts = record_starts(ui)
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=websocket]")
        ui.page.select_option("#model", "demo/echo")
        # Over the socket's 1 MiB frame limit, which would close the socket: it goes over SSE,
        # where the gateway answers with its own size limit, and the socket stays up.
        ui.send("x" * (1024 * 1024 + 10))
        ui.wait_state("error")
        assert starts == []
        assert "over the limit of 1000000" in ui.answer().locator(".error").inner_text()
        assert ui.page.get_attribute("#connection", "data-mode") == "websocket"
        ui.page.click("#new-chat")
        ui.send("small again")
        ui.wait_state("done")
        assert len(starts) == 1


# Fills this origin's storage to the brim; returns how many characters went in.
FILL_STORAGE = """() => {
  let size = 1 << 20, total = 0, i = 0;
  while (size >= 1024) {
    try { localStorage.setItem('filler' + i, 'x'.repeat(size)); total += size; i += 1; }
    catch { size >>= 1; }
  }
  return total;
}"""


def test_full_storage_is_reported(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        ui.page.select_option("#model", "demo/echo")
        assert ui.page.evaluate(FILL_STORAGE) > 0
        ui.send("This will not fit in storage")
        ui.wait_state("done")
        note = ui.page.locator("#storage-note")
        assert note.is_visible() and "storage is full" in note.inner_text()
        ui.page.evaluate(
            "Object.keys(localStorage).filter(k => k.startsWith('filler'))"
            ".forEach(k => localStorage.removeItem(k))"
        )
        ui.send("Now it fits")
        ui.wait_state("done")
        assert not note.is_visible()


EVIL = '<img src=x onerror="window.__pwned=1">'
EVIL_SSE = (
    "".join(
        f"data: {json.dumps(chunk)}\n\n"
        for chunk in [
            {"choices": [{"index": 0, "delta": {"refusal": EVIL}}]},
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": EVIL, "arguments": ""},
                                }
                            ]
                        },
                    }
                ]
            },
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": EVIL}}]},
                    }
                ]
            },
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
    )
    + "data: [DONE]\n\n"
)


def test_tool_calls_refusals_and_stored_images_stay_inert(make_ui: UIFactory) -> None:
    with make_ui(block_websocket=True) as ui:
        ui.page.route(
            "**/api/chat/completions",
            lambda route: route.fulfill(
                status=200, content_type="text/event-stream", body=EVIL_SSE
            ),
        )
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=sse]")
        ui.page.select_option("#model", "demo/echo")
        ui.send("Say something dangerous")
        ui.wait_state("done")
        answer = ui.answer()
        assert EVIL in answer.locator(".refusal").inner_text()
        assert answer.locator(".tool-name").inner_text() == EVIL
        assert answer.locator(".tool-args").inner_text() == EVIL
        assert ui.page.locator("#messages img").count() == 0
        # Stored images that are not image data URLs are never put in an <img>.
        ui.page.evaluate(
            """() => {
              const saved = JSON.parse(localStorage.getItem('tokenrelay.conversations.v1'));
              saved.conversations[0].messages[0].images = [
                'http://203.0.113.7/pixel.png', 'data:image/svg+xml;base64,PHN2Zz4=',
                'data:image/png;base64,AAAA" onerror="window.__pwned=2',
              ];
              localStorage.setItem('tokenrelay.conversations.v1', JSON.stringify(saved));
            }"""
        )
        ui.page.reload()
        ui.page.wait_for_selector("article.assistant .tool-call")
        assert ui.page.locator("#messages img").count() == 0
        assert ui.page.evaluate("window.__pwned") is None
        ui.assert_only_local_requests()
