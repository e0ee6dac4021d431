"""Scale out: the same APIs in front of an OpenAI-compatible upstream, here a second instance of this server on the
tiny model, started through its CLI on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.config import ServerConfig
from backends.upstream import PROBE_EVERY, UpstreamBackend, UpstreamConfig, url_problem
from backends.upstream_checks import MESSAGE_LIMIT
from server import create_app
from tests.conftest import LiveServer, build_tiny_model, free_port, running_server
from tests.helpers import delta_frames, parse_frames, wait_until
from tests.server.test_cli import run_cli

HISTORY = [["Hi, my name is Ada.", "Nice to meet you!"]]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The upstream engine: this server on a tiny model with a long context, as a user would start it."""
    folder = build_tiny_model(tmp_path_factory.mktemp("upstream-model"), context=8192)
    args = ["--model", str(folder), "--device", "cpu", "--served-model-name", "tiny", "--max-connections", "4"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "upstream.log") as server:
        yield server


async def proxy_of(aiohttp_client: Any, url: str, **upstream: Any) -> TestClient[web.Request, web.Application]:
    app = create_app(ServerConfig(), UpstreamBackend(UpstreamConfig(url, **upstream)))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    return client


async def open_stream(client: TestClient[web.Request, web.Application], body: dict[str, Any]) -> asyncio.StreamWriter:
    """POST /stream on a raw connection the test closes itself: a client that really goes away."""
    assert client.port is not None
    _, writer = await asyncio.open_connection("127.0.0.1", client.port)
    data = json.dumps(body).encode()
    head = (
        f"POST /stream HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    return writer


def post(server: LiveServer, path: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST", headers=JSON)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return bytes(resp.read())


async def test_chatglm_frames_through_the_proxy_are_the_upstreams(upstream: LiveServer, aiohttp_client: Any) -> None:
    proxy = await proxy_of(aiohttp_client, upstream.url + "/v1")
    body = {"query": "Repeat my name.", "history": HISTORY, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    direct = delta_frames(post(upstream, "/stream", body))
    through = delta_frames(await (await proxy.post("/stream", json=body)).read())
    assert [(f["delta"], f["response"]) for f in through] == [(f["delta"], f["response"]) for f in direct]
    assert "".join(f["delta"] for f in through) == through[-1]["response"]
    for key in ("response", "history", "finish_reason", "usage"):
        assert through[-1][key] == direct[-1][key]
    answer = await (await proxy.post("/chat", json=body)).json()
    assert answer["response"] == direct[-1]["response"] and answer["usage"] == direct[-1]["usage"]


async def test_openai_requests_pass_through(upstream: LiveServer, aiohttp_client: Any) -> None:
    proxy = await proxy_of(aiohttp_client, upstream.url + "/v1")
    assert [m["id"] for m in (await (await proxy.get("/v1/models")).json())["data"]] == ["tiny"]
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "n": 2, "seed": 7, "stop": ["zz"]}
    direct = json.loads(post(upstream, "/v1/chat/completions", body))
    through = await (await proxy.post("/v1/chat/completions", json=body)).json()
    assert [c["message"]["content"] for c in through["choices"]] == [c["message"]["content"] for c in direct["choices"]]
    assert through["usage"] == direct["usage"] and through["model"] == "tiny"
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    frames = [
        json.loads(d)
        for _, d in parse_frames(await (await proxy.post("/v1/chat/completions", json=stream)).read())[:-1]
    ]
    texts = [
        "".join(c["delta"].get("content", "") for f in frames for c in f["choices"] if c["index"] == i) for i in (0, 1)
    ]
    assert texts == [c["message"]["content"] for c in direct["choices"]]
    assert frames[-1]["usage"] == direct["usage"]


async def test_a_client_that_leaves_the_proxy_stops_the_upstream(upstream: LiveServer, aiohttp_client: Any) -> None:
    proxy = await proxy_of(aiohttp_client, upstream.url + "/v1")
    writer = await open_stream(proxy, {"query": "go", "max_tokens": 6000, "ignore_eos": True})
    await wait_until(lambda: upstream.get("/health")["running"] == 1, within=10)
    writer.close()
    left = time.monotonic()
    await wait_until(lambda: upstream.get("/health")["running"] == 0, within=3)
    assert time.monotonic() - left < 3


async def test_the_upstreams_refusals_keep_their_meaning(upstream: LiveServer, aiohttp_client: Any) -> None:
    proxy = await proxy_of(aiohttp_client, upstream.url + "/v1", model="no-such-model")
    resp = await proxy.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    error = (await resp.json())["error"]
    # the upstream's 404 is about this server's --upstream-model, not the client's request: a 502, saying why
    assert resp.status == 502 and "rejected the request (404)" in error["message"]
    assert "no-such-model" in error["message"]
    # the upstream allows 4 requests in flight: a fifth gets its 429, Retry-After included
    proxy = await proxy_of(aiohttp_client, upstream.url + "/v1")
    body = {"query": "go", "max_tokens": 4000, "ignore_eos": True}
    busy = [await open_stream(proxy, body) for _ in range(4)]
    await wait_until(lambda: upstream.get("/health")["running"] == 4, within=10)
    resp = await proxy.post("/chat", json={"query": "hi"})
    message = (await resp.json())["error"]["message"]
    assert resp.status == 429 and resp.headers["Retry-After"] == "1" and "busy" in message
    for writer in busy:
        writer.close()
    await wait_until(lambda: upstream.get("/health")["running"] == 0, within=5)
    assert (await proxy.post("/chat", json={"query": "hi", "max_tokens": 3})).status == 200  # and it goes on


async def test_an_upstream_that_fails_is_a_502(aiohttp_client: Any) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "CUDA out of memory"}}, status=500)

    async def listed(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "big"}]})

    failing = web.Application()
    failing.router.add_post("/v1/chat/completions", broken)
    failing.router.add_get("/v1/models", listed)
    server = await aiohttp_client(failing)
    proxy = await proxy_of(aiohttp_client, str(server.make_url("/v1")))
    resp = await proxy.post("/chat", json={"query": "hi"})
    body = await resp.json()
    assert resp.status == 502 and "CUDA out of memory" in body["error"]["message"] and body["success"] is False
    assert (await proxy.get("/health")).status == 200  # the upstream answers, it just failed that request
    clear = await (await proxy.get("/clear")).json()
    assert clear["success"] is True and "upstream" in clear["note"]


def test_down_at_start_up_then_up_and_killed_mid_stream(tmp_path: Path) -> None:
    port = free_port()
    proxy_log, upstream_log = tmp_path / "proxy.log", tmp_path / "up.log"
    with running_server(["--upstream", f"http://127.0.0.1:{port}/v1"], proxy_log, healthy=False) as proxy:
        health = proxy.get_status("/health")
        assert health[0] == 503 and health[1]["status"] == "unavailable"
        status, body = proxy.post_status("/chat", {"query": "hi"})
        assert status == 502 and "cannot be reached" in body["error"]["message"]
        # the upstream comes up: the proxy serves through it without a restart
        folder = build_tiny_model(tmp_path / "model", context=8192)
        with running_server(["--model", str(folder), "--device", "cpu"], upstream_log, port=port) as upstream:
            wait_for_health(proxy, 200, within=PROBE_EVERY + 8)
            answer = proxy.post("/chat", {"query": "hi", "max_tokens": 3, "ignore_eos": True})
            assert answer["usage"]["completion_tokens"] == 3
            # killed mid-stream: the stream ends with an error frame and the proxy goes on answering
            frames: list[bytes] = []
            streaming = threading.Event()

            def read() -> None:  # until the proxy's stream has begun, then to its end
                body = json.dumps({"query": "go", "max_tokens": 6000, "ignore_eos": True}).encode()
                req = urllib.request.Request(proxy.url + "/stream", data=body, method="POST", headers=JSON)
                with urllib.request.urlopen(req, timeout=60) as resp:
                    first = resp.readline()
                    streaming.set()
                    frames.append(first + resp.read())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            # killed only once tokens flow through the proxy: before that the proxy answers a plain 502
            assert streaming.wait(10)
            upstream.process.send_signal(signal.SIGKILL)
            upstream.process.wait()
            reader.join(15)
            assert not reader.is_alive() and frames, "the proxy's stream did not end when its upstream died"
            last = delta_frames(frames[0])[-1]
            assert last["finished"] and last["finish_reason"] == "error" and "upstream" in last["error"]["message"]
        # the upstream is gone: the proxy's next check of it reports so (health 503, "unavailable"), while the proxy
        # itself goes on answering, each request with the 502 of an upstream that cannot be reached
        body = wait_for_health(proxy, 503, within=PROBE_EVERY + 8)
        assert body["status"] == "unavailable" and body["upstream_status"] != "ok"
        status, body = proxy.post_status("/chat", {"query": "hi"})
        assert status == 502 and "cannot be reached" in body["error"]["message"]
        assert proxy.process.poll() is None


def wait_for_health(server: LiveServer, status: int, within: float) -> Any:
    """Poll GET /health until it answers `status`; its body. Fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        got, body = server.get_status("/health")
        if got == status:
            return body
        assert time.monotonic() < deadline, f"/health still answers {got} {body}, not {status}"
        time.sleep(0.1)


def test_upstream_and_a_local_model_are_one_or_the_other(tiny_dir: Path) -> None:
    result = run_cli("--upstream", "http://127.0.0.1:9/v1", "--model", str(tiny_dir), "--quantize", "8")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: --upstream serves from another engine: --model, --quantize belong to a local model"
    )


# ---- an upstream that misbehaves as the test asks --------------------------------------------------


def chunk(text: str = "", reason: str | None = None) -> bytes:
    """One well-formed SSE line of an OpenAI chat.completion.chunk for choice 0."""
    choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}).encode()


class FakeUpstream:
    """An OpenAI-compatible upstream in the test's process: `POST /v1/chat/completions` answers `status` (and
    `reason`) with `body`, or (200) replays `lines` as an event stream, then ends it, or with `hold`, keeps it open
    until the proxy lets go (or the test sets `released`). It notes the Authorization header and the body of every
    request, and when the proxy let go of a stream."""

    def __init__(
        self,
        lines: Sequence[bytes] = (),
        *,
        status: int = 200,
        body: bytes = b"",
        content_type: str = "application/json",
        hold: bool = False,
        reason: str | None = None,
    ) -> None:
        self.lines, self.status, self.body, self.content_type, self.hold = list(lines), status, body, content_type, hold
        self.reason = reason
        self.authorizations: list[str | None] = []
        self.bodies: list[Any] = []
        self.let_go = asyncio.Event()
        self.released = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        if self.status in (401, 403):
            return web.Response(status=self.status, body=self.body, content_type=self.content_type)
        return web.json_response({"object": "list", "data": [{"id": "fake"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        self.bodies.append(json.loads(await request.read()))
        if self.status != 200:
            return web.Response(status=self.status, reason=self.reason, body=self.body, content_type=self.content_type)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for line in self.lines:
                await response.write(line + b"\n\n")
            if self.hold:  # until the proxy closes the connection (that cancels this handler), or the test says
                await self.released.wait()
        except ConnectionError:  # the proxy let go mid-write
            pass
        finally:
            self.let_go.set()
        return response


async def fake_proxy(aiohttp_client: Any, fake: FakeUpstream, url: str | None = None, **upstream: Any) -> Any:
    """The proxy in front of `fake`, at `url` ({port} filled in) or plainly at its /v1."""
    server = await aiohttp_client(fake.app())
    where = (url or "http://127.0.0.1:{port}/v1").format(port=server.port)
    return await proxy_of(aiohttp_client, where, **upstream)


def one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message and len(message) <= MESSAGE_LIMIT + 60


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_that_refuses_our_key_is_a_502_not_the_clients_401(
    status: int, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = json.dumps({"error": {"message": "Invalid API key sk-wrong"}}).encode()
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(status=status, body=refusal), api_key="sk-wrong")
    openai = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/chat", {"query": "hi"}), ("/stream", {"query": "hi"}), ("/v1/chat/completions", openai)):
        resp = await proxy.post(path, json=body)
        message = (await resp.json())["error"]["message"]
        assert resp.status == 502, (path, resp.status, message)  # never the 401/403 of a client with a wrong key
        assert "refused this server's credentials" in message and "--upstream-api-key" in message
    health = await (await proxy.get("/health")).json()
    assert "credentials" in health["upstream_status"]
    # the operator learns why, without the key the upstream quoted
    assert "refused this server's credentials" in caplog.text and "Invalid API key ***" in caplog.text
    assert "sk-wrong" not in caplog.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><head><title>500</title></head><body>" + b"<p>Traceback line\n</p>" * 250 + b"</body>"),
        ("text/plain", b"Traceback (most recent call last):\n\x1b[31m  File ...\r\n" * 120),
        ("application/json", json.dumps({"error": {"message": "CUDA out of memory.\n" * 300}}).encode()),
    ],
    ids=["html-page", "multi-line-text", "long-json-message"],
)
async def test_an_upstream_error_page_reaches_the_client_as_one_short_line(
    content_type: str, body: bytes, aiohttp_client: Any
) -> None:
    assert len(body) > 5000
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(status=500, body=body, content_type=content_type))
    resp = await proxy.post("/chat", json={"query": "hi"})
    message = (await resp.json())["error"]["message"]
    assert resp.status == 502 and message.startswith("the upstream failed (500)")
    assert one_line(message) and "\x1b" not in message and "<" not in message, message


async def test_credentials_in_the_upstream_url_are_sent_and_never_shown(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeUpstream([chunk("Hello"), chunk(reason="stop"), b"data: [DONE]"])
    proxy = await fake_proxy(aiohttp_client, fake, "http://ada:s3cret-pw@127.0.0.1:{port}/v1")
    health = await (await proxy.get("/health")).text()
    assert "s3cret" not in health and json.loads(health)["upstream"].startswith("http://127.0.0.1:")
    assert (await (await proxy.post("/chat", json={"query": "hi"})).json())["response"] == "Hello"
    basic = "Basic " + base64.b64encode(b"ada:s3cret-pw").decode()
    assert len(fake.authorizations) >= 2 and set(fake.authorizations) == {basic}  # GET /models and the chat
    # the upstream breaks: its errors, the proxy's answers and its log lines still show no password
    fake.lines = [chunk("Hel"), b"data: {not json"]
    assert (await (await proxy.post("/chat", json={"query": "hi"})).text()).count("s3cret") == 0
    assert "malformed" in caplog.text and "s3cret" not in caplog.text


async def test_an_api_key_wins_over_the_urls_credentials(aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeUpstream([chunk("Hi", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake, "http://ada:s3cret-pw@127.0.0.1:{port}/v1", api_key="sk-op")
    assert (await proxy.post("/chat", json={"query": "hi"})).status == 200
    assert set(fake.authorizations) == {"Bearer sk-op"}
    assert "credentials in the --upstream URL are not sent" in caplog.text and "s3cret" not in caplog.text


async def test_an_unreachable_upstream_never_shows_its_credentials(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_of(aiohttp_client, f"http://ada:s3cret-pw@127.0.0.1:{free_port()}/v1")
    resp = await proxy.post("/chat", json={"query": "hi"})
    text = await resp.text()
    assert resp.status == 502 and "cannot be reached" in text and "s3cret" not in text and "ada" not in text
    assert "cannot serve yet" in caplog.text and "s3cret" not in caplog.text
    assert "s3cret" not in await (await proxy.get("/health")).text()


# a chunk of text "x" whose logprobs entry is the %s
LOGPROB = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": [%s]}}]}'


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (b'data: {"error": "boom"}', "boom"),
        (b'data: {"error": {"message": "CUDA error:\\n device-side assert"}}', "CUDA error: device-side assert"),
        (b"data: [1,2,3]", "malformed"),
        (b'data: {"choices": [{"index": 0, "delta": "Hi"}]}', "malformed"),
        (b"data: " + b"x" * 600_000, "malformed"),  # past what aiohttp reads as one line
        (b'data: {"choices": [{"index": 0, "delta": {}, "logprobs": []}]}', "logprobs is an array"),
        (LOGPROB % b'{"token": "x", "logprob": "-1"}', "logprob is not a finite number"),
        (LOGPROB % b'{"token": "x", "logprob": NaN}', "logprob is not a finite number"),
        (LOGPROB % b'{"token": 7, "logprob": -1}', "token is a number"),
        (LOGPROB % b'{"token": "x", "logprob": -1, "bytes": [256]}', "bytes are not an array of bytes"),
        (LOGPROB % b'{"token": "x", "logprob": -1, "top_logprobs": [{"token": "y"}]}', "a top_logprobs entry's"),
    ],
    ids=[
        "error-string",
        "error-object",
        "array",
        "delta-string",
        "endless-line",
        "logprobs-array",
        "logprob-string",
        "logprob-nan",
        "logprobs-token-number",
        "logprobs-bytes-past-255",
        "top-logprob-missing",
    ],
)
async def test_a_bad_chunk_mid_stream_ends_the_answer_at_once(
    bad: bytes, says: str, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # the upstream keeps the connection open after the bad chunk: only the proxy can end the answer
    fake = FakeUpstream([chunk("Hel"), bad, chunk("lo")], hold=True)
    proxy = await fake_proxy(aiohttp_client, fake)
    async with asyncio.timeout(1.0):
        resp = await proxy.post("/stream", json={"query": "hi"})
        frames = delta_frames(await resp.read())
        await fake.let_go.wait()  # and it stopped reading the upstream
    assert resp.status == 200 and [f["delta"] for f in frames] == ["Hel", ""]
    last = frames[-1]
    assert last["finished"] is True and last["finish_reason"] == "error" and last["response"] == "Hel"
    assert last["error"]["type"] == "upstream_error" and says in last["error"]["message"]
    assert one_line(last["error"]["message"])
    warnings = [r for r in caplog.records if r.name == "backends.upstream" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    fake.let_go.clear()
    async with asyncio.timeout(1.0):  # the same without a stream: a 502, never a 500
        resp = await proxy.post("/chat", json={"query": "hi"})
        error = (await resp.json())["error"]
    assert resp.status == 502 and says in error["message"]


async def test_a_stream_that_stops_before_the_answer_ends_is_a_502(aiohttp_client: Any) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream([chunk("Hel"), b": the end, without finish_reason"]))
    resp = await proxy.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    error = (await resp.json())["error"]
    assert resp.status == 502 and "before the answer" in error["message"]


@pytest.mark.parametrize(
    ("status", "answered"),
    [(404, 502), (405, 502), (407, 502), (400, 400), (413, 413), (422, 422)],
    ids=["not-found", "method-not-allowed", "proxy-auth", "bad-request", "too-large", "unprocessable"],
)
async def test_an_upstream_4xx_about_how_it_is_asked_is_a_502(
    status: int, answered: int, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = json.dumps({"error": {"message": "The model `fake` does not exist\n here"}}).encode()
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(status=status, body=refusal))
    openai = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/chat", {"query": "hi"}), ("/stream", {"query": "hi"}), ("/v1/chat/completions", openai)):
        resp = await proxy.post(path, json=body)
        message = (await resp.json())["error"]["message"]
        # never the client's own 404 or 405: its door and method are right, the upstream's configuration is not
        assert resp.status == answered, (path, resp.status, message)
        assert "does not exist here" in message and one_line(message), message  # why, cleaned
        if answered == 502:
            assert message.startswith(f"the upstream as configured rejected the request ({status})"), message
    if answered == 502:  # the operator learns where to look
        assert "check --upstream and --upstream-model" in caplog.text


async def test_a_password_with_a_raw_slash_is_never_shown(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # yarl ends the authority at the first /: it sees host `ada`, port `Zm9v`, and no user
    fake = FakeUpstream([chunk("Hi", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake, "http://ada:Zm9v/YmFy@127.0.0.1:{port}/v1")
    health = await (await proxy.get("/health")).json()
    resp = await proxy.post("/chat", json={"query": "hi"})
    answer = await resp.text()
    for shown in (json.dumps(health), answer, caplog.text):
        assert "Zm9v" not in shown and "YmFy" not in shown, shown
    assert health["upstream"].startswith("http://***@127.0.0.1:") and health["upstream"].endswith("/v1")
    assert health["status"] == "unavailable" and "percent-encode" in health["upstream_status"]
    # a URL it cannot use is never requested: each request says why
    assert resp.status == 502 and "percent-encode" in answer and fake.authorizations == []


@pytest.mark.parametrize(
    "url",
    [
        "http://ada:Zm9v/YmFy@127.0.0.1:8000/v1",  # yarl: no user, a port that is no number
        "http://ada/Zm9vYmFy@127.0.0.1:8000/v1",  # yarl: no user, the @ in the path
        "http://ada:Zm9v@127.0.0.1:8000/Ym@Fy/v1",  # yarl: a user, and an @ left in the path
        "ada:Zm9vYmFy@127.0.0.1:8000/v1",  # no scheme: yarl reads `ada` as one
        "ftp://ada:Zm9vYmFy@127.0.0.1/v1",
        "127.0.0.1:8000/v1",
        "http:///v1",
        "http://127.0.0.1:99999/v1",
        "http://a%3Ada:Zm9vYmFy@127.0.0.1/v1",  # a : in the user name: Basic auth cannot send it
    ],
)
def test_url_problem_names_what_is_wrong_without_quoting_the_url(url: str) -> None:
    problem = url_problem(url)
    assert problem is not None and one_line(problem)
    assert not any(part in problem for part in ("ada", "Zm9v", "YmFy", "127.0.0.1", "8000", "ftp")), problem


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "https://example.com/v1/",
        "http://ada:Zm9v%2FYmFy@127.0.0.1:8000/v1",  # the / percent-encoded
        "http://ada:p%40ss%3Aw@[::1]:8000/v1",
        "http://a@b:pw@127.0.0.1/v1",  # a raw @ in the user: yarl (as curl) ends the user at the last @
        "http://:token@localhost/v1",
    ],
)
def test_url_problem_passes_a_usable_url(url: str) -> None:
    assert url_problem(url) is None


PASSWORD = "Zm9v/Ym?Fy"  # percent-encoded in the URL
BASIC_TOKEN = base64.b64encode(f"ada:{PASSWORD}".encode()).decode()  # it holds a / too
CREDENTIALS = "http://ada:Zm9v%2FYm%3FFy@127.0.0.1:{port}/v1"


@pytest.mark.parametrize(
    ("url", "key", "bad", "secret"),
    [
        (None, "sk-op-SECRET", b'data: {"error": {"message": "token sk-op-SECRET expired"}}', "sk-op-SECRET"),
        (None, "sk-op-SECRET", b'data: {"error": "' + b"x" * 190 + b' sk-op-SECRET"}', "sk-op"),
        (None, "sk-op-SECRET", b'data: {"error": "token sk-op-\\u0007SECRET expired"}', "SECRET"),
        (None, "sk-op-SECRET", b'data: {"choices": "sk-op-SECRET"}', "SECRET"),
        (CREDENTIALS, None, b'data: {"error": "got Basic %s"}', BASIC_TOKEN[:8]),
        (CREDENTIALS, None, b'data: {"error": "got %s"}', BASIC_TOKEN[:8]),
        (CREDENTIALS, None, b'data: {"error": "bad password Zm9v/Ym?Fy"}', "Zm9v"),
        (CREDENTIALS, None, b'data: {"choices": 1, "auth": "Basic %s"}', BASIC_TOKEN[:8]),
        (CREDENTIALS, None, b'data: {"choices": 1, "auth": "Zm9v\\/Ym?Fy"}', "Zm9v"),
    ],
    ids=[
        "key-in-error",
        "key-at-the-cut",
        "key-split-by-a-control-character",
        "key-in-malformed-chunk",
        "basic-value-in-error",
        "basic-token-in-error",
        "password-in-error",
        "basic-value-in-malformed-chunk",
        "escaped-password-in-malformed-chunk",
    ],
)
async def test_an_upstream_that_quotes_our_credentials_mid_answer_never_passes_them_on(
    url: str | None, key: str | None, bad: bytes, secret: str, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # %s: the token as some JSON writers put it, its / escaped (the log quotes a malformed chunk as it came)
    bad = bad.replace(b"%s", BASIC_TOKEN.replace("/", "\\/").encode())
    fake = FakeUpstream([chunk("Hel"), bad])
    proxy = await fake_proxy(aiohttp_client, fake, url, api_key=key)
    body = (await (await proxy.post("/stream", json={"query": "hi"})).read()).decode()
    last = delta_frames(body.encode())[-1]
    assert last["finish_reason"] == "error" and one_line(last["error"]["message"])
    assert secret not in body and secret not in caplog.text
    assert "***" in caplog.text  # what the upstream said still reaches the log, blanked
    assert fake.authorizations[-1] == (f"Bearer {key}" if key else f"Basic {BASIC_TOKEN}")


async def test_a_refusals_reason_phrase_never_passes_our_key_on(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # an error page says nothing: the reason phrase stands in for it
    fake = FakeUpstream(status=500, reason="Bad key sk-op-SECRET", body=b"<html>oops</html>", content_type="text/html")
    proxy = await fake_proxy(aiohttp_client, fake, api_key="sk-op-SECRET")
    resp = await proxy.post("/chat", json={"query": "hi"})
    message = (await resp.json())["error"]["message"]
    assert resp.status == 502 and message == "the upstream failed (500): Bad key ***"
    assert "sk-op-SECRET" not in caplog.text


# ---- constraints, logprobs and logit_bias pass through ---------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize(
    ("sent", "asked"),
    [
        ({}, {}),
        ({"response_format": {"type": "text"}}, {}),
        ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "json_object"}}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}},
            {"response_format": AS_SCHEMA},
        ),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, {"response_format": AS_SCHEMA}),
        ({"structured_outputs": {"json_object": True}}, {"response_format": {"type": "json_object"}}),
        ({"structured_outputs": {"regex": r"\d+"}}, {"structured_outputs": {"regex": r"\d+"}}),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"structured_outputs": {"choice": ["yes", "no"]}}),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, {"structured_outputs": {"grammar": 'start: "a"'}}),
        ({"logprobs": True}, {"logprobs": True, "top_logprobs": 0}),
        ({"logprobs": True, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 5}),
        ({"logprobs": False}, {}),
        ({"logit_bias": {"50256": -100, "7": 2.5}}, {"logit_bias": {"7": 2.5, "50256": -100.0}}),
        ({"user": "u", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}, {}),
    ],
    ids=[
        "nothing",
        "text",
        "json_object",
        "json_schema",
        "so-json",
        "so-json_object",
        "so-regex",
        "so-choice",
        "so-grammar",
        "logprobs",
        "top_logprobs",
        "logprobs-false",
        "logit_bias",
        "without-effect",
    ],
)
async def test_what_the_answer_is_held_to_reaches_the_upstream(
    sent: dict[str, Any], asked: dict[str, Any], aiohttp_client: Any
) -> None:
    fake = FakeUpstream([chunk("Hi", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake)
    resp = await proxy.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **sent})
    assert resp.status == 200, await resp.text()
    (body,) = fake.bodies
    passed = ("response_format", "structured_outputs", "logprobs", "top_logprobs", "logit_bias")
    assert {k: v for k, v in body.items() if k in passed} == asked
    # and nothing else of the client's reaches it: the fields without effect stay here
    assert body.keys() <= {
        *passed,
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
    }


def logprob_chunk(text: str, entries: list[dict[str, Any]], reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "logprobs": {"content": entries}, "finish_reason": reason}
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}).encode()


HI = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}
# "é" in two tokens, as vLLM sends a token that is part of a character; the second's bytes left out (null)
E1 = {"token": "\\xc3", "logprob": -1.25, "bytes": [195], "top_logprobs": []}
E2 = {"token": "é", "logprob": -9999.0, "bytes": None}
UPSTREAM_LOGPROBS = [
    logprob_chunk("Hi", [HI]),
    logprob_chunk("", [E1]),
    logprob_chunk(" é", [E2]),
    chunk(reason="stop"),
    b"data: [DONE]",
]
# as the client gets them: each entry in OpenAI's shape, null bytes filled in with the token's UTF-8
HI_OUT = {**HI, "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}
E2_OUT = {"token": "é", "logprob": -9999.0, "bytes": [195, 169], "top_logprobs": []}


async def test_the_upstreams_logprobs_reach_the_client_in_openais_shape(aiohttp_client: Any) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(UPSTREAM_LOGPROBS))
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    (choice,) = done["choices"]
    assert choice["message"]["content"] == "Hi é"
    assert choice["logprobs"] == {"content": [HI_OUT, E1, E2_OUT], "refusal": None}
    streamed = await (await proxy.post("/v1/chat/completions", json={**body, "stream": True})).read()
    chunks = [json.loads(data)["choices"][0] for _, data in parse_frames(streamed)[:-1]]
    parts = [(c["delta"].get("content"), c["logprobs"]) for c in chunks]
    assert parts == [
        ("", None),  # the role
        ("Hi", {"content": [HI_OUT], "refusal": None}),
        (" é", {"content": [E1, E2_OUT], "refusal": None}),  # a token that made no text comes with the one that did
        (None, None),  # the finish reason
    ]


async def test_logprobs_of_a_last_token_without_text_still_arrive(aiohttp_client: Any) -> None:
    lines = [logprob_chunk("Hi", [HI]), logprob_chunk("", [E1]), chunk(reason="length")]
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(lines))
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    assert done["choices"][0]["logprobs"]["content"] == [HI_OUT, E1]
    assert done["choices"][0]["finish_reason"] == "length"


async def test_logprobs_not_asked_for_are_not_shown(aiohttp_client: Any) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(UPSTREAM_LOGPROBS))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    assert done["choices"][0]["logprobs"] is None and done["choices"][0]["message"]["content"] == "Hi é"
    streamed = await (await proxy.post("/v1/chat/completions", json={**body, "stream": True})).read()
    assert all(json.loads(d)["choices"][0]["logprobs"] is None for _, d in parse_frames(streamed)[:-1])
    frames = delta_frames(await (await proxy.post("/stream", json={"query": "hi"})).read())
    assert [f["delta"] for f in frames] == ["Hi", " é", ""]  # the ChatGLM door has no logprobs


# ---- tools pass through, the upstream's calls come back -------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
CALLED = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALLED]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny. Anything else?"},
    {"role": "user", "content": "And the time?"},
]
# the same conversation as the upstream is asked it
ASKED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALLED]},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "Sunny. Anything else?"},
    {"role": "user", "content": "And the time?"},
]


@pytest.mark.parametrize(
    ("sent", "asked"),
    [
        ({}, {"tool_choice": "auto"}),
        ({"tool_choice": "none"}, {"tool_choice": "none"}),
        ({"tool_choice": "auto"}, {"tool_choice": "auto"}),
        ({"tool_choice": "required"}, {"tool_choice": "required"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        ),
        ({"parallel_tool_calls": False}, {"tool_choice": "auto", "parallel_tool_calls": False}),
        ({"parallel_tool_calls": True}, {"tool_choice": "auto"}),  # the upstream's default: not said
    ],
    ids=["default", "none", "auto", "required", "named", "one-call", "parallel"],
)
async def test_tools_and_the_calls_of_a_conversation_reach_the_upstream(
    sent: dict[str, Any], asked: dict[str, Any], aiohttp_client: Any
) -> None:
    fake = FakeUpstream([chunk("Noon.", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake)
    resp = await proxy.post("/v1/chat/completions", json={"messages": CONVERSATION, "tools": TOOLS, **sent})
    assert resp.status == 200, await resp.text()
    (body,) = fake.bodies
    assert body["tools"] == TOOLS
    # each function object as the client wrote it, its keys in their order
    assert [list(t["function"]) for t in body["tools"]] == [list(WEATHER), list(CLOCK)]
    assert {k: v for k, v in body.items() if k in ("tool_choice", "parallel_tool_calls")} == asked
    assert body["messages"] == ASKED


async def test_legacy_functions_and_function_messages_reach_the_upstream_as_tools(aiohttp_client: Any) -> None:
    fake = FakeUpstream([chunk("Noon.", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "function_call": CALLED["function"]},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    body = {"messages": messages, "functions": [WEATHER], "function_call": {"name": "get_weather"}}
    resp = await proxy.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    (asked,) = fake.bodies
    assert asked["tools"] == [{"type": "function", "function": WEATHER}]
    assert asked["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # the legacy call has no id: the door names it after its message, and its result answers it
    assert asked["messages"] == [
        messages[0],
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{**CALLED, "id": "call_1"}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"},
    ]


async def test_a_request_without_tools_asks_for_none(aiohttp_client: Any) -> None:
    fake = FakeUpstream([chunk("Hi", "stop")])
    proxy = await fake_proxy(aiohttp_client, fake)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert (await proxy.post("/v1/chat/completions", json=body)).status == 200
    assert fake.bodies[0].keys().isdisjoint({"tools", "tool_choice", "parallel_tool_calls", "functions"})


def delta_chunk(delta: dict[str, Any], reason: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}).encode()


def piece(index: int, arguments: str | None = None, **fields: Any) -> dict[str, Any]:
    """One `tool_calls` entry: `id` and `name` when given (the name into its function), the arguments fragment."""
    function = {"name": fields.pop("name")} if "name" in fields else {}
    if arguments is not None:
        function["arguments"] = arguments
    return {"index": index, **({"type": "function"} if "id" in fields else {}), **fields, "function": function}


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9}}'
# as vLLM streams two calls: the first piece of each with its id, name and empty arguments, then fragments
VLLM_CALLS = [
    delta_chunk({"role": "assistant", "content": ""}),
    delta_chunk({"tool_calls": [piece(0, "", id="call_a", name="get_weather")]}),
    delta_chunk({"tool_calls": [piece(0, '{"city": ')]}),
    delta_chunk({"tool_calls": [piece(0, '"Paris"}')]}),
    delta_chunk({"tool_calls": [piece(1, "", id="call_b", name="get_time")]}),
    delta_chunk({"tool_calls": [piece(1, "{}")]}),
    delta_chunk({}, "tool_calls"),
    USAGE,
    b"data: [DONE]",
]
WHOLE_CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]


async def test_the_upstreams_calls_reach_an_openai_client(aiohttp_client: Any) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(VLLM_CALLS))
    body = {"messages": [{"role": "user", "content": "Weather and time?"}], "tools": TOOLS}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    (choice,) = done["choices"]
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": WHOLE_CALLS}
    assert choice["finish_reason"] == "tool_calls"
    assert done["usage"] == {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
    streamed = await (await proxy.post("/v1/chat/completions", json={**body, "stream": True})).read()
    frames = parse_frames(streamed)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data)["choices"][0] for _, data in frames[:-1]]
    assert [(c["delta"], c["finish_reason"]) for c in chunks] == [
        ({"role": "assistant", "content": ""}, None),
        ({"tool_calls": [piece(0, "", id="call_a", name="get_weather")]}, None),
        ({"tool_calls": [piece(0, '{"city": ')]}, None),
        ({"tool_calls": [piece(0, '"Paris"}')]}, None),
        ({"tool_calls": [piece(1, "", id="call_b", name="get_time")]}, None),
        ({"tool_calls": [piece(1, "{}")]}, None),
        ({}, "tool_calls"),
    ]


def made_id(call_id: Any) -> bool:
    return isinstance(call_id, str) and call_id.startswith("call_") and len(call_id) == 29


@pytest.mark.parametrize(
    "lines",
    [
        [  # text before the calls; both calls in one chunk, whole; numbered from 3 by the upstream
            delta_chunk({"content": "Let me look."}),
            delta_chunk(
                {"tool_calls": [piece(3, '{"city": "Paris"}', name="get_weather"), piece(4, "{}", name="get_time")]}
            ),
            delta_chunk({}, "tool_calls"),
        ],
        [  # every call numbered 0, each with its own id (Ollama's way); pieces without a function or arguments
            delta_chunk({"content": "Let me"}),
            delta_chunk({"content": " look.", "tool_calls": [piece(0, None, id="x1", name="get_weather")]}),
            delta_chunk({"tool_calls": [{"index": 0, "function": None}, piece(0, '{"city": "Paris"}', id="x1")]}),
            delta_chunk({"tool_calls": [piece(0, "{}", id="x2", name="get_time")]}),
            delta_chunk({"tool_calls": None}, "tool_calls"),
        ],
    ],
    ids=["whole-calls", "all-numbered-0"],
)
async def test_calls_however_the_upstream_numbers_them_reach_the_client_numbered_in_order(
    lines: list[bytes], aiohttp_client: Any
) -> None:
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(lines))
    body = {"messages": [{"role": "user", "content": "Weather and time?"}], "tools": TOOLS}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    message = done["choices"][0]["message"]
    assert message["content"] == "Let me look." and done["choices"][0]["finish_reason"] == "tool_calls"
    calls = message["tool_calls"]
    assert [c["function"] for c in calls] == [c["function"] for c in WHOLE_CALLS]
    given = [c["id"] for c in calls]
    assert given == ["x1", "x2"] or (all(map(made_id, given)) and given[0] != given[1]), given
    streamed = await (await proxy.post("/v1/chat/completions", json={**body, "stream": True})).read()
    chunks = [json.loads(data)["choices"][0] for _, data in parse_frames(streamed)[:-1]]
    pieces = [p for c in chunks for p in c["delta"].get("tool_calls", [])]
    assert [p["index"] for p in pieces if "id" in p] == [0, 1]
    assert [p["index"] for p in pieces] == sorted(p["index"] for p in pieces)


async def test_an_upstreams_legacy_function_call_is_call_0(aiohttp_client: Any) -> None:
    lines = [
        delta_chunk({"function_call": {"name": "get_weather", "arguments": ""}}),
        delta_chunk({"function_call": {"arguments": '{"city": '}}),
        delta_chunk({"function_call": {"arguments": '"Paris"}'}}),
        delta_chunk({}, "function_call"),
    ]
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(lines))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    (call,) = done["choices"][0]["message"]["tool_calls"]
    assert call["function"] == CALLED["function"] and made_id(call["id"])
    assert done["choices"][0]["finish_reason"] == "tool_calls"
    # a client that asked in the legacy words hears of it in them
    legacy = {"messages": body["messages"], "functions": [WEATHER]}
    done = await (await proxy.post("/v1/chat/completions", json=legacy)).json()
    assert done["choices"][0]["message"]["function_call"] == CALLED["function"]
    assert done["choices"][0]["finish_reason"] == "function_call"


async def test_each_choice_has_its_own_calls(aiohttp_client: Any) -> None:
    lines = [
        delta_chunk({"tool_calls": [piece(0, "{}", id="a", name="get_time")]}, index=1),
        delta_chunk({"tool_calls": [piece(0, '{"city": "Paris"}', id="b", name="get_weather")]}, index=0),
        delta_chunk({}, "tool_calls", index=0),
        delta_chunk({}, "tool_calls", index=1),
    ]
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(lines))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, "n": 2}
    done = await (await proxy.post("/v1/chat/completions", json=body)).json()
    calls = [c["message"]["tool_calls"] for c in done["choices"]]
    assert [[(c["id"], c["function"]["name"]) for c in cs] for cs in calls] == [
        [("b", "get_weather")],
        [("a", "get_time")],
    ]


TOOL_CALLS = b'data: {"choices": [{"index": 0, "delta": {"tool_calls": %s}}]}'
BAD_CALLS = [
    (TOOL_CALLS % b'{"index": 0}', "tool_calls is an object"),
    (TOOL_CALLS % b'["call"]', "a tool_calls entry is a string"),
    (TOOL_CALLS % b'[{"id": "c", "function": {"name": "get_time"}}]', "index is null"),
    (TOOL_CALLS % b'[{"index": "0", "function": {"name": "get_time"}}]', "index is a string"),
    (TOOL_CALLS % b'[{"index": -1, "function": {"name": "get_time"}}]', "index is a number"),
    (TOOL_CALLS % b'[{"index": true, "function": {"name": "get_time"}}]', "index is a boolean"),
    (TOOL_CALLS % b'[{"index": 0, "id": 7, "function": {"name": "get_time"}}]', "id is a number"),
    (TOOL_CALLS % b'[{"index": 0, "type": "code", "function": {"name": "get_time"}}]', "type is not function"),
    (TOOL_CALLS % b'[{"index": 0, "function": "get_time()"}]', "function is a string"),
    (TOOL_CALLS % b'[{"index": 0, "function": {"name": ["get_time"]}}]', "name is an array"),
    (TOOL_CALLS % b'[{"index": 0, "function": {"name": "get_time", "arguments": {}}}]', "arguments are an object"),
    (TOOL_CALLS % b'[{"index": 1, "function": {"arguments": "{}"}}]', "first piece names no function"),
    (
        TOOL_CALLS % b'[{"index": 1, "function": {"name": "get_time"}}, {"index": 1, "function": {"name": "x"}}]',
        "changed its name",
    ),
    (b'data: {"choices": [{"index": 0, "delta": {"function_call": "get_time"}}]}', "function_call is a string"),
]


@pytest.mark.parametrize(("bad", "says"), BAD_CALLS, ids=[says for _, says in BAD_CALLS])
async def test_a_malformed_call_ends_an_openai_answer_with_the_upstreams_error(
    bad: bytes, says: str, aiohttp_client: Any
) -> None:
    # a good call first: the client has seen part of the answer when the bad piece comes
    lines = [delta_chunk({"tool_calls": [piece(0, '{"city": ', id="call_a", name="get_weather")]}), bad, chunk("x")]
    fake = FakeUpstream(lines, hold=True)
    proxy = await fake_proxy(aiohttp_client, fake)
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    async with asyncio.timeout(1.0):
        resp = await proxy.post("/v1/chat/completions", json={**body, "stream": True})
        frames = parse_frames(await resp.read())
        await fake.let_go.wait()
    assert resp.status == 200 and frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"tool_calls": [piece(0, '{"city": ', id="call_a", name="get_weather")]},
    ]
    error = chunks[-1]["error"]
    assert error["type"] == "upstream_error" and "malformed chunk" in error["message"] and says in error["message"]
    assert one_line(error["message"])
    fake.let_go.clear()
    async with asyncio.timeout(1.0):  # the same without a stream: a 502, never a 500
        resp = await proxy.post("/v1/chat/completions", json=body)
        error = (await resp.json())["error"]
    assert resp.status == 502 and error["type"] == "upstream_error" and says in error["message"]
