"""Model output, model names and error texts are untrusted: they must stay inert in the page."""

from __future__ import annotations

from tests.e2e.conftest import UIFactory
from tests.fakeupstream import Script

# Payloads split across chunks, so only a renderer that re-reads the whole text could assemble
# them. If anything ran, it would set window.__pwned or fetch from 203.0.113.7 (TEST-NET-3).
PAYLOAD = [
    "Hello <img src=x one",
    'rror="window.__pwned=1">',
    " and <scr",
    "ipt>window.__pwned=2; fetch('http://203.0.113.7/s')</scr",
    "ipt>\n\n",
    "[click me](java",
    "script:window.__pwned=3)",
    " [spaced](  JaVaScRiPt:window.__pwned=4 )",
    " [entity](&#106;avascript:window.__pwned=5)",
    " <javascript:window.__pwned=6>\n\n",
    "<svg onl",
    'oad="window.__pwned=7"><circle r=5></circle></svg>\n\n',
    '<a href="javascript:window.__pwned=8">raw link</a> ',
    '<iframe src="http://203.0.113.7/frame"></iframe>\n\n',
    "![tracker](http://203.0.113.7/pixel.png) ",
    "![inline](data:image/svg+xml,%3Csvg onload=window.__pwned=9%3E)\n\n",
    '<div style="background:url(http://203.0.113.7/bg)">styled</div>\n\n',
    "```html\n<script>window.__pwned=10</script>\n```\n\n",
    "[fine](https://127.0.0.1/docs) end",
]

RECORD = """() => {
  window.__violations = [];
  document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.blockedURI + ' ' + e.violatedDirective));
}"""


def test_xss_payloads_in_model_output_stay_inert(make_ui: UIFactory) -> None:
    with make_ui(evil=Script(text=PAYLOAD, pace=0.005)) as ui:
        dialogs: list[str] = []
        ui.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        ui.page.add_init_script(f"({RECORD})()")
        ui.open()
        ui.page.select_option("#model", ui.models["evil"])
        ui.send("Say something dangerous")
        ui.wait_state("done")
        content = ui.answer().locator(".content")
        # The text arrives (as text), nothing active is in the DOM.
        text = content.inner_text()
        assert '<img src=x onerror="window.__pwned=1">' in text
        assert "<script>" in text and "<svg" in text and "end" in text
        for tag in ("img", "script", "svg", "iframe", "object", "embed", "style", "form"):
            assert content.locator(tag).count() == 0, tag
        assert content.locator("[style]").count() == 0
        assert content.locator("[onerror], [onload], [onclick]").count() == 0
        hrefs = content.locator("a[href]").evaluate_all(
            "els => els.map(a => a.getAttribute('href'))"
        )
        # Only http(s) links survive (the image became a link, never an <img>); none is followed.
        assert all(h.startswith(("http://", "https://")) for h in hrefs), hrefs
        assert {"http://203.0.113.7/pixel.png", "https://127.0.0.1/docs"} <= set(hrefs)
        assert all(
            a["rel"] == "noopener noreferrer nofollow"
            for a in content.locator("a[href]").evaluate_all("els => els.map(a => ({rel: a.rel}))")
        )
        # Clicking what were javascript: links does nothing.
        content.get_by_text("click me").click()
        content.get_by_text("spaced").click()
        assert ui.page.evaluate("window.__pwned") is None
        assert dialogs == []
        assert ui.page.evaluate("window.__violations") == []  # nothing even tried
        # After a reload the stored answer is rendered again from text: still inert.
        ui.page.reload()
        ui.page.wait_for_selector("article.assistant .content a")
        assert (
            ui.page.locator(
                "article.assistant .content img, article.assistant .content svg"
            ).count()
            == 0
        )
        assert ui.page.evaluate("window.__pwned") is None
        ui.assert_only_local_requests()


def test_error_text_and_model_names_are_shown_as_text(make_ui: UIFactory) -> None:
    message = '<img src=x onerror="window.__pwned=1">upstream broke'
    with make_ui(broken=Script(status=503, error_message=message)) as ui:
        ui.open()
        ui.page.select_option("#model", ui.models["broken"])
        ui.send("Hi")
        ui.wait_state("error")
        error = ui.answer().locator(".error")
        assert "The model's provider is down or unreachable right now." in error.inner_text()
        assert error.locator("img").count() == 0
        assert ui.page.evaluate("window.__pwned") is None
        # An unknown model's name (from the request) is quoted as text in the explanation.
        ui.page.evaluate(
            """() => { const o = document.createElement('option');
               o.value = 'oai/<img src=x onerror=window.__pwned=2>'; o.textContent = 'x';
               document.querySelector('#model').append(o); }"""
        )
        ui.page.select_option("#model", "oai/<img src=x onerror=window.__pwned=2>")
        ui.send("Again")
        ui.wait_state("error")
        text = ui.answer().locator(".error").inner_text()
        assert "<img src=x onerror=window.__pwned=2>" in text and "not known" in text
        assert ui.page.locator("#messages img").count() == 0
        assert ui.page.evaluate("window.__pwned") is None
        ui.assert_only_local_requests()
