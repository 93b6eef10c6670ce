"""Resumable answers in the UI: a reload or a dropped socket mid-answer continues the same answer."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from playwright.sync_api import Request, WebSocket, WebSocketRoute

from tests.e2e.conftest import UI, UIFactory, wait_disconnected
from tests.fakeupstream import RecordedRequest, Script

# An answer of many small pieces, paced so that a reload lands in the middle of it.
PIECES = [f"w{i:03d} " for i in range(160)]
FULL = "".join(PIECES)
PACE = 0.025

# Every text the answer showed after the page loaded, so a repeat that was later redrawn away
# would still be seen.
OBSERVE = """() => {
  window.__states = [];
  const log = document.getElementById('messages');
  const record = () => {
    const answer = log.querySelector('article.assistant:last-of-type .content');
    if (answer) window.__states.push(answer.textContent);
  };
  record();
  new MutationObserver(record).observe(log, {subtree: true, childList: true, characterData: true});
}"""

STORED_ANSWER = (
    "JSON.parse(localStorage.getItem('tokenrelay.conversations.v1')).conversations[0].messages[1]"
)


def frames(ui: UI) -> list[tuple[str, dict[str, Any]]]:
    """Every frame of the page's sockets, as ("sent" | "received", frame), in order."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: seen.append(("sent", json.loads(payload))))
        ws.on("framereceived", lambda payload: seen.append(("received", json.loads(payload))))

    ui.page.on("websocket", on_socket)
    return seen


def of_type(seen: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [frame for _, frame in seen if frame.get("type") == kind]


def shown(ui: UI) -> str:
    return str(ui.page.evaluate("document.querySelector('article.assistant .content').textContent"))


def reload_mid_answer(ui: UI, label: str, *, after: str = "w030 ") -> RecordedRequest:
    """Send, wait for `after` to show, reload; returns the upstream request."""
    ui.open()
    ui.page.select_option("#model", ui.models[label])
    ui.send("Count slowly")
    ui.page.wait_for_selector(f"article.assistant .content:has-text('{after}')")
    ui.page.reload()
    ui.page.wait_for_selector("article.assistant")
    ui.page.evaluate(OBSERVE)
    return ui.upstream_request(label)


def assert_never_repeated(ui: UI) -> None:
    """Each text the answer showed after the reload was a start of the full answer."""
    states = [s for s in ui.page.evaluate("window.__states") if s]
    assert states, "the answer was never shown after the reload"
    bad = [s[-40:] for s in states if not FULL.startswith(s.replace("▍", "").rstrip())]
    assert bad == [], f"shown text that is not a start of the answer: {bad[:3]}"


def test_reload_mid_answer_continues_it_exactly(make_ui: UIFactory) -> None:
    with make_ui(slow=Script(text=PIECES, pace=PACE)) as ui:
        seen = frames(ui)
        recorded = reload_mid_answer(ui, "slow")
        assert recorded.disconnected_at is None  # a reload is not a stop
        ui.wait_state("done", timeout=20_000)
        assert ui.page.evaluate(STORED_ANSWER)["content"] == FULL
        assert shown(ui).strip() == FULL.strip()
        assert_never_repeated(ui)
        # The reloaded page showed the saved part at once and went on from it in place.
        assert "w030 " in ui.page.evaluate("window.__states")[0]
        # One request upstream, carried to its end; the page asked for the rest, not again.
        assert len(ui.upstream.by_model(recorded.model or "")) == 1
        assert recorded.completed and recorded.deltas_sent == len(PIECES)
        [start] = of_type(seen, "chat.start")
        assert start["resumable"] is True
        started = of_type(seen, "chat.started")
        [resume] = of_type(seen, "chat.resume")
        assert resume["stream_id"] == started[0]["stream_id"]
        assert resume["stream_id"].startswith("chatcmpl-")
        assert 30 <= resume["after"] < len(PIECES) - 1  # after what the first page had saved
        replayed = [f["seq"] for f in of_type(seen, "chat.delta") if f["id"] == resume["id"]]
        assert replayed == list(range(resume["after"] + 1, len(PIECES)))
        meta = ui.answer().locator(".meta").inner_text()
        assert "resumed" in meta and "reconnecting" not in meta
        assert "resume" not in ui.page.evaluate(STORED_ANSWER)  # nothing left to resume


def test_stop_after_a_reload_stops_the_upstream_at_once(make_ui: UIFactory) -> None:
    with make_ui(slow=Script(text=PIECES, pace=PACE)) as ui:
        seen = frames(ui)
        recorded = reload_mid_answer(ui, "slow", after="w020 ")
        ui.page.wait_for_selector("article.assistant .content:has-text('w060 ')")
        ui.page.click("#stop")
        ui.wait_state("stopped")
        wait_disconnected(recorded, timeout=2.0)
        assert recorded.deltas_sent < len(PIECES)
        [resume] = of_type(seen, "chat.resume")
        assert of_type(seen, "chat.cancel") == [{"type": "chat.cancel", "id": resume["id"]}]
        kept = ui.page.evaluate(STORED_ANSWER)
        assert kept["status"] == "stopped" and "resume" not in kept
        assert FULL.startswith(kept["content"]) and "w060 " in kept["content"]
        assert_never_repeated(ui)
        # Stopped stays stopped: a reload does not bring the answer back.
        ui.page.reload()
        ui.page.wait_for_selector("article.assistant[data-state=stopped]")
        assert ui.page.evaluate(STORED_ANSWER)["content"] == kept["content"]
        assert len(of_type(seen, "chat.resume")) == 1


def test_a_dropped_socket_resumes_on_the_next_one(make_ui: UIFactory) -> None:
    with make_ui(slow=Script(text=PIECES, pace=PACE)) as ui:
        # The page's sockets go through a relay in the test, which can cut one, as a network
        # change or a proxy recycling connections would: both the page's and the gateway's side
        # close, and nothing is said first.
        sockets: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        seen: list[tuple[str, dict[str, Any]]] = []

        def relay(page_side: WebSocketRoute) -> None:
            server_side = page_side.connect_to_server()

            def upward(message: str | bytes) -> None:
                seen.append(("sent", json.loads(message)))
                server_side.send(message)

            def downward(message: str | bytes) -> None:
                seen.append(("received", json.loads(message)))
                page_side.send(message)

            page_side.on_message(upward)
            server_side.on_message(downward)
            sockets.append((page_side, server_side))

        ui.page.route_web_socket("**/api/ws", relay)
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=websocket]")
        ui.page.select_option("#model", ui.models["slow"])
        ui.page.evaluate(OBSERVE)
        ui.send("Count slowly")
        ui.page.wait_for_selector("article.assistant .content:has-text('w040 ')")
        page_side, server_side = sockets[0]
        server_side.close(code=1001)
        page_side.close(code=1001)
        ui.wait_state("done", timeout=20_000)
        assert ui.page.evaluate(STORED_ANSWER)["content"] == FULL
        assert shown(ui).strip() == FULL.strip()
        assert_never_repeated(ui)
        recorded = ui.upstream_request("slow")
        assert len(ui.upstream.by_model(recorded.model or "")) == 1
        assert recorded.completed
        assert len(sockets) >= 2  # the page opened a new socket and went on over it
        [start] = of_type(seen, "chat.start")
        [resume] = of_type(seen, "chat.resume")
        assert resume["after"] >= 40
        assert "resumed" in ui.answer().locator(".meta").inner_text()
        assert start["id"] != resume["id"]


def test_without_a_new_socket_the_answer_goes_on_over_sse_and_stop_cancels(
    make_ui: UIFactory,
) -> None:
    with make_ui(slow=Script(text=PIECES, pace=PACE)) as ui:
        # The first socket is cut mid-answer and every later one is refused at once, as behind a
        # proxy that stopped passing upgrades: the page follows the same stream over SSE.
        first: list[tuple[WebSocketRoute, WebSocketRoute]] = []

        def relay(page_side: WebSocketRoute) -> None:
            if first:
                page_side.close(code=1011)
                return
            first.append((page_side, page_side.connect_to_server()))

        asked: list[Request] = []
        ui.page.on("request", lambda request: asked.append(request))
        ui.page.route_web_socket("**/api/ws", relay)
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=websocket]")
        ui.page.select_option("#model", ui.models["slow"])
        ui.page.evaluate(OBSERVE)
        ui.send("Count slowly")
        ui.page.wait_for_selector("article.assistant .content:has-text('w030 ')")
        page_side, server_side = first[0]
        server_side.close(code=1001)
        page_side.close(code=1001)
        ui.page.wait_for_selector("article.assistant .content:has-text('w070 ')")
        [resume] = [r for r in asked if r.url.endswith("/stream")]
        assert int(resume.headers["last-event-id"]) >= 30
        ui.page.click("#stop")
        ui.wait_state("stopped")
        recorded = ui.upstream_request("slow")
        wait_disconnected(recorded, timeout=2.0)
        assert any(r.method == "POST" and r.url.endswith("/cancel") for r in asked)
        kept = ui.page.evaluate(STORED_ANSWER)
        assert FULL.startswith(kept["content"]) and "w070 " in kept["content"]
        assert_never_repeated(ui)
        assert len(ui.upstream.by_model(recorded.model or "")) == 1


def test_sse_fallback_reload_resumes_with_last_event_id_and_stop_cancels(
    make_ui: UIFactory,
) -> None:
    with make_ui(block_websocket=True, slow=Script(text=PIECES, pace=PACE)) as ui:
        asked: list[Request] = []
        ui.page.on("request", lambda request: asked.append(request))
        recorded = reload_mid_answer(ui, "slow")
        ui.wait_state("done", timeout=20_000)
        assert ui.page.evaluate(STORED_ANSWER)["content"] == FULL
        assert_never_repeated(ui)
        assert recorded.completed and len(ui.upstream.by_model(recorded.model or "")) == 1
        [post] = [r for r in asked if r.method == "POST" and r.url.endswith("/completions")]
        assert post.headers.get("x-tokenrelay-resumable") == "true"
        [resume] = [r for r in asked if r.url.endswith("/stream")]
        assert resume.method == "GET"
        assert int(resume.headers["last-event-id"]) >= 30
        assert "via SSE" in ui.answer().locator(".meta").inner_text()

        # Stop over SSE is an explicit cancel: the upstream closes at once.
        ui.answer().get_by_role("button", name="Regenerate").click()
        ui.page.wait_for_selector(
            "article.assistant[data-state=streaming] .content:has-text('w005 ')"
        )
        ui.page.click("#stop")
        ui.wait_state("stopped")
        latest = ui.upstream.by_model(recorded.model or "")[-1]
        wait_disconnected(latest, timeout=2.0)
        assert any(r.method == "POST" and r.url.endswith("/cancel") for r in asked)


def test_stop_before_the_first_token_over_sse_stops_the_upstream(make_ui: UIFactory) -> None:
    with make_ui(block_websocket=True, late=Script(tokens=5, first_token_delay=4.0)) as ui:
        ui.open()
        ui.page.wait_for_selector("#connection[data-mode=sse]")
        ui.page.select_option("#model", ui.models["late"])
        ui.send("Take your time")
        recorded = ui.upstream_request("late")
        ui.page.click("#stop")
        ui.wait_state("stopped")
        stopped_at = time.monotonic()
        wait_disconnected(recorded, timeout=6.0)
        assert recorded.deltas_sent == 0
        assert recorded.disconnected_at is not None
        assert recorded.disconnected_at - stopped_at < 1.0, "the upstream ran on after Stop"


def test_an_answer_that_ended_while_away_is_completed_on_return(make_ui: UIFactory) -> None:
    with make_ui(quick=Script(text=PIECES[:60], pace=0.02)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["quick"])
        ui.send("Count")
        ui.page.wait_for_selector("article.assistant .content:has-text('w010 ')")
        ui.page.goto("about:blank")
        recorded = ui.upstream_request("quick")
        deadline = time.monotonic() + 10
        while not recorded.completed:
            assert time.monotonic() < deadline, "the upstream answer did not finish"
            time.sleep(0.02)
        ui.open()
        ui.wait_state("done")
        assert ui.page.evaluate(STORED_ANSWER)["content"] == "".join(PIECES[:60])


# Before the page's scripts run: points the saved answer (in the conversation, and in the copy
# saved alone as it streamed) at a stream the gateway never had.
FORGET_STREAM = """(id) => {
  const conversations = JSON.parse(localStorage.getItem('tokenrelay.conversations.v1'));
  conversations.conversations[0].messages[1].resume.stream_id = id;
  localStorage.setItem('tokenrelay.conversations.v1', JSON.stringify(conversations));
  const streaming = JSON.parse(localStorage.getItem('tokenrelay.streaming.v1'));
  if (streaming) {
    streaming.message.resume.stream_id = id;
    localStorage.setItem('tokenrelay.streaming.v1', JSON.stringify(streaming));
  }
}"""


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_a_resume_the_gateway_refuses_keeps_the_partial_text(
    make_ui: UIFactory, transport: str
) -> None:
    with make_ui(block_websocket=transport == "sse", slow=Script(text=PIECES, pace=PACE)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["slow"])
        ui.send("Count slowly")
        ui.page.wait_for_selector("article.assistant .content:has-text('w010 ')")
        unknown = f"chatcmpl-{uuid.uuid4().hex}"
        ui.page.add_init_script(f"({FORGET_STREAM})({json.dumps(unknown)})")
        ui.page.reload()
        ui.wait_state("error")
        error = ui.answer().locator(".error")
        assert "could not be fetched" in error.inner_text()
        assert "no longer has it" in error.inner_text()
        kept = ui.page.evaluate(STORED_ANSWER)
        assert kept["error"]["code"] == "stream_not_found" and "resume" not in kept
        assert kept["content"].startswith("w000 w001 w002") and FULL.startswith(kept["content"])
        assert shown(ui).strip() == kept["content"].strip()
        assert ui.answer().get_by_role("button", name="Retry").is_visible()


# The page's seq bookkeeping against a scripted SSE body: held events are applied with the id
# that closes their record, repeats are skipped, and a gap is reported rather than rendered.
SSE_RECORDS = """async () => {
  const { Stream } = await import('./js/stream.js');
  const { follow } = await import('./js/sse.js');
  const chunk = (content, finish = null) =>
    JSON.stringify({ id: 'chatcmpl-x', model: 'm', choices: [{ index: 0, delta: content === null ? {} : { content }, finish_reason: finish }] });
  const run = async (body, seq) => {
    const parts = [];
    let end = null;
    const stream = new Stream({
      onDelta: (d) => parts.push([d.seq, d.text]),
      onDone: (f) => { end = ['done', f.finish_reason]; },
      onError: (e) => { end = ['error', e.code]; },
    }, { streamId: 'chatcmpl-x', seq });
    const response = new Response(body, { headers: { 'content-type': 'text/event-stream' } });
    const outcome = await follow(response, stream, { model: 'm' });
    return { parts, end, outcome, seq: stream.seq };
  };
  const ev = (data, id) => (id === undefined ? '' : `id: ${id}\\n`) + `data: ${data}\\n\\n`;
  return {
    replay: await run(
      ev(chunk(null)) + ev(chunk('a'), 0) + ev(chunk('b'), 1) + ': keepalive\\n\\n' + ev(chunk('c'), 2)
      + ev(chunk(null, 'stop')) + ev('[DONE]', 3), 0),
    gap: await run(ev(chunk('b'), 1) + ev(chunk('d'), 3), 0),
    cut: await run(ev(chunk('b'), 1) + ev(chunk(null, 'stop')), 0),
  };
}"""


def test_seq_bookkeeping_of_an_sse_body(make_ui: UIFactory) -> None:
    with make_ui() as ui:
        ui.open()
        out = ui.page.evaluate(SSE_RECORDS)
        assert out["replay"] == {
            "parts": [[1, "b"], [2, "c"]],
            "end": ["done", "stop"],
            "outcome": "ended",
            "seq": 3,
        }
        assert out["gap"] == {"parts": [[1, "b"]], "end": None, "outcome": "gap", "seq": 1}
        # A record cut before its id is not rendered: a resume after seq 1 brings it whole.
        assert out["cut"] == {"parts": [[1, "b"]], "end": None, "outcome": "cut", "seq": 1}
