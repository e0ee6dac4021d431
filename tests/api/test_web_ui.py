"""The web UI in headless Chromium (Debian's, driven by playwright), against live servers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, LiveServer
from tests.helpers import chromium_or_skip

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = chromium_or_skip()

ARTIFACTS = ROOT / "artifacts"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **not bold**'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--headless"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(locale="en-US", viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.requests = []  # every URL the page asks for
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: pytest.fail(f"page error: {e}"))
    yield page
    context.close()


def open_page(page: Any, server: LiveServer, settings: dict[str, Any] | None = None) -> None:
    if settings:
        # only before the first load: a reload must show what the page itself saved
        value = json.dumps(json.dumps(settings))
        page.add_init_script(
            f"localStorage.getItem('chat.settings.v1') || localStorage.setItem('chat.settings.v1', {value})"
        )
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")


def force_long_answers(page: Any) -> None:
    """The random test model may pick its end token early; ask the server to ignore it (an extension field)."""

    def extend(route: Any) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/stream", extend)


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answer_done(page: Any, count: int) -> None:
    """Until `count` assistant messages exist and none is streaming."""
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant').length === {count} && !document.querySelector('.msg.streaming')",
        timeout=60_000,
    )


def answer_with(page: Any, response: str) -> None:
    """The next answers are `response`, in one final frame of the ChatGLM stream."""
    final = {"delta": "", "query": "q", "response": response, "finished": True, "history": []}
    final.update(finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    frame = f"event: delta\ndata: {json.dumps(final)}\n\n"
    page.route("**/stream", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=frame))


def only_local(page: Any, server: LiveServer) -> None:
    assert page.requests, "no requests recorded"
    outside = [u for u in page.requests if not (u.startswith(server.url) or u.startswith("data:"))]
    assert outside == []


def test_answer_streams_renders_and_survives_reload(page: Any, tiny_server: LiveServer) -> None:
    open_page(page, tiny_server, {"max_tokens": 200, "temperature": 0.7, "top_p": 0.9})
    assert page.text_content("#model") == "tiny"
    force_long_answers(page)
    # record the answer's length at every change, to see it grow frame by frame
    page.evaluate(
        """() => { window.__sizes = []; new MutationObserver(() => {
             const b = document.querySelector('.msg.assistant:last-child .bubble');
             if (b) window.__sizes.push(b.textContent.length);
           }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }"""
    )
    send(page, "Hello there")
    wait_answer_done(page, 1)
    sizes = page.evaluate("window.__sizes")
    assert len(set(sizes)) >= 3, f"answer did not grow over several frames: {sizes}"
    stats = page.text_content(".msg.assistant .stats")
    assert "200 tokens" in stats and "tok/s" in stats
    answer = page.text_content(".msg.assistant .bubble")

    # settings change, reload: conversation and settings are still there
    page.click("#open-settings")
    page.fill("#set-max_tokens", "33")
    page.press("#set-max_tokens", "Tab")
    page.click("#settings button[value=close]")
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.text_content(".msg.user .bubble") == "Hello there"
    assert page.text_content(".msg.assistant .bubble") == answer
    page.click("#open-settings")
    assert page.input_value("#set-max_tokens") == "33"
    page.click("#settings button[value=close]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui_conversation.png"), full_page=True)
    only_local(page, tiny_server)


def test_user_and_model_text_cannot_inject_html(page: Any, tiny_server: LiveServer) -> None:
    open_page(page, tiny_server, {"max_tokens": 4})
    send(page, XSS)
    wait_answer_done(page, 1)
    assert page.text_content(".msg.user .bubble") == XSS
    assert page.query_selector(".messages img") is None
    assert page.query_selector(".messages script") is None

    # a model answer full of HTML: markdown is rendered, the HTML is sanitized away
    answer_with(page, XSS + "\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    send(page, "next")
    wait_answer_done(page, 2)
    last = ".msg.assistant:last-child .bubble"
    assert page.query_selector(f"{last} img[onerror]") is None
    assert page.query_selector(f"{last} script") is None
    assert page.query_selector(f"{last} table") is not None  # GFM table rendered
    assert page.query_selector(f"{last} strong") is not None
    assert page.evaluate("window.__xss") is None


def test_stop_ends_the_answer_and_the_server_generation(page: Any, bundled_server: LiveServer) -> None:
    open_page(page, bundled_server, {"max_tokens": 2000})
    force_long_answers(page)
    send(page, "Write a very long story.")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').textContent.length > 5", timeout=60_000)
    page.click("#stop")
    wait_answer_done(page, 1)
    assert "stopped" in page.text_content(".msg.assistant .stats")
    assert page.is_visible("#send")
    deadline = time.monotonic() + 2
    while bundled_server.get("/health")["running"] != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.05)


def test_conversations_regenerate_and_edit(page: Any, tiny_server: LiveServer) -> None:
    open_page(page, tiny_server, {"max_tokens": 6})
    force_long_answers(page)
    send(page, "first question")
    wait_answer_done(page, 1)
    streams_before = sum(url.endswith("/stream") for url in page.requests)
    page.click(".msg.assistant .regenerate")
    wait_answer_done(page, 1)
    assert page.locator(".msg").count() == 2
    assert sum(url.endswith("/stream") for url in page.requests) == streams_before + 1  # asked the server again
    assert page.text_content(".msg.user .bubble") == "first question"

    page.click(".msg.user .edit")
    assert page.input_value("#input") == "first question"
    assert page.locator(".msg").count() == 0
    page.fill("#input", "edited question")
    page.press("#input", "Enter")
    wait_answer_done(page, 1)
    assert page.text_content(".msg.user .bubble") == "edited question"

    page.click("#new-chat")
    send(page, "second conversation")
    wait_answer_done(page, 1)
    assert page.locator("#conversations li").count() == 2
    page.once("dialog", lambda d: d.accept("Renamed"))
    page.click("#conversations li.active .rename")
    assert page.text_content("#title") == "Renamed"
    page.click("#conversations li:not(.active) .name")
    assert page.text_content(".msg.user .bubble") == "edited question"
    page.once("dialog", lambda d: d.accept())
    page.click("#conversations li.active .delete")
    assert page.locator("#conversations li").count() == 1
    assert page.text_content("#title") == "Renamed"

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.wait_for_function("performance.getEntriesByType('resource').some(e => e.name.endsWith('/clear'))")


# Answers that call tools, as each model family writes them: (answer, the calls it makes, the text around them)
TOOL_ANSWERS: dict[str, tuple[str, list[tuple[str, dict[str, Any]]], str]] = {
    "hermes": (
        'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})],
        "Let me look that up.",
    ),
    "chatglm3": (
        "get_weather\n```python\ntool_call(city='Paris', days=3, metric=True, around=None)\n```",
        [("get_weather", {"city": "Paris", "days": 3, "metric": True, "around": None})],
        "",
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]',
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})],
        "",
    ),
}
RAW_MARKUP = ["<tool_call>", "</tool_call>", "tool_call(", "[TOOL_CALLS]", "```"]
HOSTILE = '<img src=x onerror="window.__xss=1">'


@pytest.mark.parametrize("shape", TOOL_ANSWERS)
def test_tool_calls_show_as_cards(page: Any, tiny_server: LiveServer, shape: str) -> None:
    answer, calls, text = TOOL_ANSWERS[shape]
    open_page(page, tiny_server)
    answer_with(page, answer)
    send(page, "What is the weather in Paris?")
    wait_answer_done(page, 1)
    bubble = ".msg.assistant .bubble"
    cards = page.locator(f"{bubble} .tool-call")
    assert cards.count() == len(calls)
    for i, (name, arguments) in enumerate(calls):
        card = cards.nth(i)
        assert card.is_visible()
        assert card.locator(".tool-call-label").text_content() == "Tool call"
        assert card.locator(".tool-call-name").text_content() == name
        shown = card.locator("pre.tool-call-args").text_content()
        assert json.loads(shown) == arguments
        assert shown == json.dumps(arguments, indent=2)  # pretty-printed
    seen = page.text_content(bubble)
    assert [m for m in RAW_MARKUP if m in seen] == []
    if text:
        assert page.text_content(f"{bubble} .answer-text").strip() == text
    else:
        assert page.query_selector(f"{bubble} .answer-text") is None
    page.reload()  # a stored answer renders the same way
    page.wait_for_selector(f"{bubble} .tool-call")
    assert page.locator(f"{bubble} .tool-call").count() == len(calls)
    assert page.text_content(bubble) == seen


def test_tool_call_names_and_arguments_stay_text(page: Any, tiny_server: LiveServer) -> None:
    hermes = json.dumps({"name": HOSTILE, "arguments": {"q": HOSTILE}})
    mistral = json.dumps([{"name": HOSTILE, "arguments": {"q": HOSTILE}}])
    glm = f"search\n```python\ntool_call(q={HOSTILE!r})\n```"
    open_page(page, tiny_server)
    answer_with(page, f"<tool_call>\n{hermes}\n</tool_call>\n{glm}\n[TOOL_CALLS]{mistral}")
    send(page, "hello")
    wait_answer_done(page, 1)
    bubble = ".msg.assistant .bubble"
    names = page.locator(f"{bubble} .tool-call-name").all_text_contents()
    assert names == [HOSTILE, "search", HOSTILE]
    for shown in page.locator(f"{bubble} .tool-call-args").all_text_contents():
        assert json.loads(shown) == {"q": HOSTILE}
    assert page.query_selector(".messages img") is None
    assert page.evaluate("window.__xss") is None


def test_unfinished_tool_call_streams_as_a_pending_card(page: Any, tiny_server: LiveServer) -> None:
    """The answer as it grows, rendered the way the streaming loop renders it (the page's own module)."""
    open_page(page, tiny_server)
    growing = {
        "hermes_tag": ("Checking.\n<tool_c", None, ""),
        "hermes_name": ('Checking.\n<tool_call>\n{"name": "get_wea', "get_wea", ""),
        "hermes_args": (
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
            "get_weather",
            '{"city": "Pa',
        ),
        "hermes_close": (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_',
            "get_weather",
            None,
        ),
        "chatglm3_fence": ("get_weather\n```pyth", None, ""),
        "chatglm3_args": ("get_weather\n```python\ntool_call(city='Pa", "get_weather", "city='Pa"),
        "mistral": (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_ti',
            "get_ti",
            "",
        ),
    }
    shown = page.evaluate(
        """async (growing) => {
             const app = await import(document.querySelector('script[type=module]').src);
             const view = document.createElement('div');
             view.className = 'msg assistant streaming';
             const bubble = document.createElement('div');
             bubble.className = 'bubble';
             view.append(bubble);
             document.getElementById('messages').append(view);
             const out = {};
             for (const [key, [text]] of Object.entries(growing)) {
               app.renderAnswer(bubble, text, true);
               const pending = bubble.querySelector('.tool-call.pending');
               out[key] = {
                 text: bubble.textContent,
                 pending: bubble.querySelectorAll('.tool-call.pending').length,
                 visible: pending ? pending.getBoundingClientRect().height > 0 : false,
                 name: pending?.querySelector('.tool-call-name').textContent ?? null,
                 args: pending?.querySelector('.tool-call-args').textContent ?? null,
               };
             }
             return out;
           }""",
        growing,
    )
    for key, (_, name, args) in growing.items():
        got = shown[key]
        assert [m for m in [*RAW_MARKUP, "<tool_c", "</tool_", "```pyth"] if m in got["text"]] == [], key
        if name is None:  # only the start of a marker so far: held back, not shown
            assert got["pending"] == 0, key
            continue
        assert got["pending"] == 1 and got["visible"], key
        assert got["name"] == name, key
        assert "Calling tool" in got["text"], key
        if args is not None:
            assert got["args"] == args, key
    assert shown["hermes_name"]["text"].startswith("Checking.")
    assert "get_weather" in shown["mistral"]["text"]  # the list's finished call is a card already


@pytest.mark.parametrize(
    ("status", "text"),
    [(429, "busy"), (503, "not ready"), (401, "API key")],
    ids=["busy", "unavailable", "unauthorized"],
)
def test_error_statuses_are_explained(page: Any, tiny_server: LiveServer, status: int, text: str) -> None:
    open_page(page, tiny_server)
    body = json.dumps({"error": {"message": "nope", "type": "x"}})
    headers = {"Retry-After": "3"} if status == 429 else {}
    page.route(
        "**/stream",
        lambda route: route.fulfill(status=status, content_type="application/json", body=body, headers=headers),
    )
    send(page, "hello")
    page.wait_for_selector("#error:not([hidden])")
    assert text in page.text_content("#error")
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 0
    if status == 401:
        assert page.is_visible("#settings")


def test_chinese_interface_and_phone_screen(browser: Any, tiny_server: LiveServer) -> None:
    context = browser.new_context(locale="zh-CN", viewport={"width": 390, "height": 800})
    page = context.new_page()
    page.goto(tiny_server.url + "/")
    assert page.text_content("#send") == "发送"
    # the sidebar folds away on a phone, and the menu button brings it back
    assert page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right") <= 0
    page.click("#toggle-sidebar")
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    page.mouse.click(370, 400)  # a tap beside the sidebar closes it
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(Path(ARTIFACTS, "web_ui_phone_zh.png")))
    context.close()
