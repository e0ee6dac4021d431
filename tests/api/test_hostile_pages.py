"""Web pages in a real browser (Debian's chromium) against the live server at its defaults: a page on another site
can neither use the model nor read an answer (nor can a sandboxed frame it makes), a page whose name was rebound to
127.0.0.1 meets the Host check, and the original project's UI works from a loopback port, and from a file when
`--cors-origins null` allows it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, running_server
from tests.helpers import chromium_or_skip

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = chromium_or_skip()

ASK = """async (url) => {
  try {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                body: JSON.stringify({query: "hi", max_tokens: 2})});
    return {status: r.status, body: await r.text()};
  } catch (e) { return {blocked: String(e)}; }
}"""
SIMPLE = """async (url) => {  // text/plain: what a page may send without a preflight
  try {
    const r = await fetch(url, {method: "POST", body: JSON.stringify({query: "hi", max_tokens: 2})});
    return {status: r.status};
  } catch (e) { return {blocked: String(e)}; }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        # Chromium's own Local Network Access check blocks a public page's requests to 127.0.0.1 before they leave
        # the browser; other browsers (Firefox, Safari) have none. Off here, so what is tested is the server's defence
        args = [
            "--no-sandbox",
            "--headless",
            "--host-resolver-rules=MAP evil.example 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessSendPreflights,"
            "BlockInsecurePrivateNetworkRequests",
        ]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    yield context.new_page()
    context.close()


def metric(server: LiveServer, name: str, label: str = "") -> float:
    """The sum of a metric's samples on the server's /metrics whose labels include `label`."""
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name) and label in line.split()[0])


PROMPT_TOKENS = "chat_prompt_tokens_total"
REQUESTS = "chat_requests_total{"
REFUSED = 'status="403"'  # a preflight is "unmatched" (no OPTIONS route), the request itself "/chat"


def evil_page(page: Any, url: str) -> None:
    """Open `url` as the attacker's page: the document comes from the attacker, whatever the name resolves to."""
    page.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body="<h1>cats</h1>"))
    page.goto(url)


def test_a_page_on_another_site_cannot_use_the_model(page: Any, tiny_server: LiveServer) -> None:
    tokens, refused = metric(tiny_server, PROMPT_TOKENS), metric(tiny_server, REQUESTS, REFUSED)
    evil_page(page, "https://evil.example/")
    read = page.evaluate(ASK, tiny_server.url + "/chat")
    assert "blocked" in read, read  # the answer is unreadable: no CORS headers for that origin
    simple = page.evaluate(SIMPLE, tiny_server.url + "/chat")
    assert "blocked" in simple, simple
    # the server saw both (the preflight, the text/plain post) and refused them: the model never ran
    assert metric(tiny_server, REQUESTS, REFUSED) == refused + 2
    assert metric(tiny_server, PROMPT_TOKENS) == tokens


def test_a_rebound_name_meets_the_host_check(page: Any, tiny_server: LiveServer) -> None:
    """evil.example now resolves to 127.0.0.1: to the browser the server is the page's own origin."""
    port = tiny_server.url.rsplit(":", 1)[1]
    evil_page(page, f"http://evil.example:{port}/")
    got = page.evaluate(ASK, "/chat")  # same origin: the page may read whatever comes back
    assert got.get("status") == 403, (got, tiny_server.log.read_text()[-1500:])
    assert "Host" in json.loads(got["body"])["error"]["message"]


def test_a_sandboxed_frame_on_another_site_is_refused(page: Any, tiny_server: LiveServer) -> None:
    """Any site can make a frame whose origin is `null`, the origin a page opened from a file has too: so `null`
    is refused unless `--cors-origins null` allows it."""
    refused = metric(tiny_server, REQUESTS, REFUSED)
    evil_page(page, "https://evil.example/")
    script = f"<script>({ASK})({json.dumps(tiny_server.url + '/chat')}).then(r => parent.postMessage(r, '*'))</script>"
    got = page.evaluate(
        """(srcdoc) => new Promise(done => {
             addEventListener("message", e => done(e.data));
             const frame = document.createElement("iframe");
             frame.sandbox = "allow-scripts";
             frame.srcdoc = srcdoc;
             document.body.append(frame);
           })""",
        script,
    )
    assert "blocked" in got, got
    assert metric(tiny_server, REQUESTS, REFUSED) == refused + 1  # seen and refused (a preflight or the post)


def test_the_original_ui_from_a_loopback_port_works(page: Any, tiny_server: LiveServer, tmp_path: Path) -> None:
    """The original project's UI served on a loopback port (`python -m http.server` in its folder)."""
    url = "http://localhost:8123/index.html"
    page.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body="<title>chat</title>"))
    page.goto(url)
    got = page.evaluate(ASK, tiny_server.url + "/chat")
    assert got.get("status") == 200, got
    assert json.loads(got["body"])["success"] is True


def test_a_page_opened_from_a_file_works_when_allowed(page: Any, tiny_dir: Path, tmp_path: Path) -> None:
    """The original project's UI opened from disk (`Origin: null`): refused by default, served with
    `--cors-origins null`."""
    html = tmp_path / "ui.html"
    html.write_text("<!doctype html><title>chat</title>")
    args = ["--model", str(tiny_dir), "--device", "cpu", "--cors-origins", "null"]
    with running_server(args, tmp_path / "server.log") as allowing:
        page.goto(html.as_uri())
        got = page.evaluate(ASK, allowing.url + "/chat")
    assert got.get("status") == 200, got
    assert json.loads(got["body"])["success"] is True
