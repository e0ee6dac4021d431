"""Every door at once over one engine, as an operator would check them before real load: a greedy answer does not
depend on which doors its batch neighbours came through; clients that leave mid-stream on any door free the engine;
a refused request (a bad body, an unknown model, a prompt too long, max_tokens over the limit) is answered alone, in
its own door's shape, while the streams beside it finish unchanged; and the browser rules (Origin, preflight,
JSON-only bodies) hold on every new route."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.config import BACKEND
from models.loader import LoadedModel
from tests.conftest import MakeClient, Wrapped
from tests.helpers import chunk_deltas, completion_chunks, delta_frames, parse_frames, wait_until

Client = TestClient[web.Request, web.Application]
MODEL = "tiny"
# prompts whose greedy answers through the chat template run on past every length used here (on the tiny model);
# the tests that rely on it see it in the answers alone
RUNS_ON = ["Tell me a story", "Numbers: 1 2 3", "Tell me a joke", "story"]
# and some whose templated answers end within a few tokens: requests that leave a batch while others go on
PROMPTS = ["Tell me a story", "hi", "Numbers: 1 2 3", "The quick brown fox", "Tell me a joke", "Paris is"]
LONG_PROMPT = "hello there " * 200  # far past the tiny model's 256 tokens of context, through any door
TOO_MANY = 1_000_000  # answer tokens: past the server's default ceiling (8192)
EVIL = "https://evil.example"
LOOPBACK_PAGE = "http://localhost:5173"


# ---- the doors: how each asks for a greedy answer, and where its text is in the answer --------------------------


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _ollama_options(max_tokens: int) -> dict[str, int]:
    return {"temperature": 0, "num_predict": max_tokens}


def openai_chat_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": _user(prompt), "temperature": 0, "max_tokens": max_tokens, "stream": stream}


def legacy_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "stream": stream}


def anthropic_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": _user(prompt), "temperature": 0, "stream": stream}


def ollama_chat_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": _user(prompt), "options": _ollama_options(max_tokens), "stream": stream}


def generate_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "options": _ollama_options(max_tokens), "stream": stream}


def raw_generate_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {**generate_body(prompt, max_tokens, stream), "raw": True}


def chatglm_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"query": prompt, "temperature": 0, "max_tokens": max_tokens}  # /stream or /chat says which


def openai_chat_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "")


def openai_chat_streamed(body: bytes) -> str:
    return "".join(delta.get("content") or "" for delta in chunk_deltas(completion_chunks(body)))


def legacy_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["text"])


def legacy_streamed(body: bytes) -> str:
    return "".join(chunk["choices"][0]["text"] for chunk in completion_chunks(body) if chunk["choices"])


def anthropic_text(answer: dict[str, Any]) -> str:
    return "".join(block["text"] for block in answer["content"] if block["type"] == "text")


def anthropic_streamed(body: bytes) -> str:
    frames = parse_frames(body)
    assert frames[-1][0] == "message_stop" and all(event != "error" for event, _ in frames), frames[-3:]
    events = [json.loads(data) for _, data in frames]
    assert [e["type"] for e in events] == [event for event, _ in frames]  # each frame names its own type
    texts = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    return "".join(delta["text"] for delta in texts if delta["type"] == "text_delta")


def ndjson_lines(body: bytes) -> list[dict[str, Any]]:
    """The objects of an Ollama stream: whole lines, none an error, only the last one done."""
    text = body.decode()
    assert text.endswith("\n"), "an NDJSON stream ends with a whole line"
    lines = [json.loads(line) for line in text.splitlines()]
    assert all("error" not in line for line in lines), lines[-1]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    return lines


def ollama_chat_text(answer: dict[str, Any]) -> str:
    return str(answer["message"]["content"])


def ollama_chat_streamed(body: bytes) -> str:
    return "".join(line["message"]["content"] for line in ndjson_lines(body))


def generate_text(answer: dict[str, Any]) -> str:
    return str(answer["response"])


def generate_streamed(body: bytes) -> str:
    return "".join(line["response"] for line in ndjson_lines(body))


def chatglm_text(answer: dict[str, Any]) -> str:
    return str(answer["response"])


def chatglm_streamed(body: bytes) -> str:
    frames = delta_frames(body)
    last = frames[-1]
    assert last["finished"] is True and last["finish_reason"] != "error", last
    assert "".join(frame["delta"] for frame in frames) == last["response"]
    return str(last["response"])


# ---- each door's error shape: the message, once the shape is checked ------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    415: "invalid_request_error",
}


def openai_refusal(status: int, body: dict[str, Any]) -> str:
    """OpenAI's error (with ChatGLM's `success: false`)."""
    error = body["error"]
    assert body["success"] is False and set(error) == {"message", "type", "param", "code"}, body
    assert error["type"] == ERROR_TYPES[status], body
    return str(error["message"])


def anthropic_refusal(status: int, body: dict[str, Any]) -> str:
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == ERROR_TYPES[status], body
    return str(body["error"]["message"])


def ollama_refusal(status: int, body: dict[str, Any]) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


@dataclass(frozen=True)
class Door:
    """One API door: its bodies, where it answers whole and where streamed, and how its answers read."""

    name: str
    path: str  # where a whole answer is asked for
    stream_path: str  # where a streamed one is (ChatGLM's /stream; the others take `stream: true`)
    body: Callable[[str, int, bool], dict[str, Any]]
    whole: Callable[[dict[str, Any]], str]
    streamed: Callable[[bytes], str]
    refusal: Callable[[int, dict[str, Any]], str]
    templated: bool = True  # the prompt goes through the chat template (else it is raw text)
    ndjson: bool = False

    def route(self, stream: bool) -> str:
        return self.stream_path if stream else self.path


OPENAI_CHAT = Door(
    "openai-chat",
    "/v1/chat/completions",
    "/v1/chat/completions",
    openai_chat_body,
    openai_chat_text,
    openai_chat_streamed,
    openai_refusal,
)
LEGACY = Door(
    "legacy", "/v1/completions", "/v1/completions", legacy_body, legacy_text, legacy_streamed, openai_refusal, False
)
ANTHROPIC = Door(
    "anthropic", "/v1/messages", "/v1/messages", anthropic_body, anthropic_text, anthropic_streamed, anthropic_refusal
)
OLLAMA_CHAT = Door(
    "ollama-chat",
    "/api/chat",
    "/api/chat",
    ollama_chat_body,
    ollama_chat_text,
    ollama_chat_streamed,
    ollama_refusal,
    ndjson=True,
)
GENERATE = Door(
    "generate",
    "/api/generate",
    "/api/generate",
    generate_body,
    generate_text,
    generate_streamed,
    ollama_refusal,
    ndjson=True,
)
RAW_GENERATE = dataclasses.replace(GENERATE, name="generate-raw", body=raw_generate_body, templated=False)
CHATGLM = Door("chatglm", "/chat", "/stream", chatglm_body, chatglm_text, chatglm_streamed, openai_refusal)
DOORS = [OPENAI_CHAT, LEGACY, ANTHROPIC, OLLAMA_CHAT, GENERATE, RAW_GENERATE, CHATGLM]
# every door both ways, alternating: any run of an even count of these is half streams
VARIANTS = [(door, stream) for door in DOORS for stream in (False, True)]


async def ask(client: Client, door: Door, prompt: str, max_tokens: int, stream: bool) -> str:
    """A greedy answer's text through a door, whole or streamed."""
    resp = await client.post(door.route(stream), json=door.body(prompt, max_tokens, stream))
    assert resp.status == 200, (door.name, stream, await resp.text())
    if not stream:
        return door.whole(await resp.json())
    assert resp.content_type == ("application/x-ndjson" if door.ndjson else "text/event-stream"), door.name
    return door.streamed(await resp.read())


async def first_part(resp: aiohttp.ClientResponse, door: Door) -> bytes:
    """A stream's first frame (SSE) or line (NDJSON), as it came."""
    assert resp.status == 200, (door.name, await resp.text())
    if door.ndjson:
        line = await resp.content.readline()
        assert json.loads(line)["done"] is False, line
        return line
    frame = await resp.content.readuntil(b"\n\n")
    assert b"\ndata: " in b"\n" + frame, frame
    return frame


async def open_stream(client: Client, door: Door, prompt: str, max_tokens: int) -> tuple[aiohttp.ClientResponse, bytes]:
    """A streamed greedy answer that has begun: the response and its first frame or line."""
    resp = await client.post(door.stream_path, json=door.body(prompt, max_tokens, True))
    return resp, await first_part(resp, door)


async def served(make_client: MakeClient, lm: LoadedModel | None = None, **kwargs: Any) -> Client:
    """A client whose server serves the tiny model as MODEL."""
    return await make_client(lm, served_model_names=(MODEL,), **kwargs)


# ---- models seen through a test's wrapper ---------------------------------------------------------------------------


class Widest(Wrapped):
    """The tiny model 20 ms slower per forward pass (requests sent together surely meet in a batch), noting the most
    sequences one pass ran."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.widest = 0

    def forward(self, **kwargs: Any) -> Any:
        time.sleep(0.02)
        self.widest = max(self.widest, int(kwargs["input_ids"].shape[0]))
        return self.model(**kwargs)


class Held(Wrapped):
    """The tiny model 20 ms slower per forward pass, whose passes stop once `hold` is set until `release` is: the
    worker then stands still with its batch mid-answer, for as long as a test needs."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.hold, self.holding, self.release = threading.Event(), threading.Event(), threading.Event()

    def forward(self, **kwargs: Any) -> Any:
        time.sleep(0.02)
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(60)
        return self.model(**kwargs)


class Counted(Wrapped):
    """The tiny model, counting its forward passes: none means nothing was generated."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.passes = 0

    def forward(self, **kwargs: Any) -> Any:
        self.passes += 1
        return self.model(**kwargs)


def wrapped(lm: LoadedModel, wrapper: Wrapped) -> LoadedModel:
    return dataclasses.replace(lm, model=wrapper, lean_decode=False)


# ---- 1. a batch of every door answers as each request alone -----------------------------------------------------


async def test_mixed_doors_in_one_batch_answer_as_each_alone(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    asks = [(*VARIANTS[i % len(VARIANTS)], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
    assert sum(stream for _, stream, _ in asks) == 12
    alone_client = await served(make_client, max_batch_size=1)
    alone = [await ask(alone_client, door, prompt, 32, stream) for door, stream, prompt in asks]
    # answers that differ: one request's answer given to another would show
    assert all(alone) and len(set(alone)) >= 6, alone
    # and the doors prompt the model alike: one prompt, one greedy answer, through any door of its kind
    by_prompt: dict[tuple[str, bool], set[str]] = {}
    for (door, _, prompt), text in zip(asks, alone, strict=True):
        by_prompt.setdefault((prompt, door.templated), set()).add(text)
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt

    model = Widest(tiny_lm.model)
    client = await served(make_client, wrapped(tiny_lm, model), max_batch_size=24)
    together = await asyncio.gather(*(ask(client, door, prompt, 32, stream) for door, stream, prompt in asks))
    assert model.widest >= 12, f"the requests never shared a batch (at most {model.widest} at once)"
    for (door, stream, prompt), a, t in zip(asks, alone, together, strict=True):
        assert t == a, (door.name, stream, prompt)
    await wait_until(lambda: client.app[BACKEND].counts == (0, 0))


# ---- 2. clients leaving on every door at once -----------------------------------------------------------------------


async def test_disconnect_storm_across_doors(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    alone_client = await served(make_client)
    expected = [await ask(alone_client, door, RUNS_ON[0], 12, stream) for door, stream in VARIANTS]

    client = await served(make_client, slow_lm, max_batch_size=24, max_queue=64)
    engine = client.app[BACKEND]
    doors = [DOORS[i % len(DOORS)] for i in range(20)]
    # 200 tokens at 20 ms or more a step: seconds of generation left when the clients go
    opened = await asyncio.gather(
        *(open_stream(client, door, RUNS_ON[i % len(RUNS_ON)], 200) for i, door in enumerate(doors))
    )
    assert engine.counts == (20, 0)  # every one is generating
    for resp, _ in opened:
        resp.close()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)
    after = await asyncio.gather(*(ask(client, door, RUNS_ON[0], 12, stream) for door, stream in VARIANTS))
    assert after == expected


async def test_clients_that_leave_while_waiting_free_the_queue_on_every_door(
    make_client: MakeClient, slow_lm: LoadedModel
) -> None:
    """A client that leaves before its answer starts (waiting for a batch slot: no header sent yet on any door) takes
    its place in the queue with it, and the running streams go on to their full greedy answers."""
    runners = [ANTHROPIC, OLLAMA_CHAT]
    alone_client = await served(make_client)
    expected = [await ask(alone_client, door, RUNS_ON[0], 100, True) for door in runners]

    client = await served(make_client, slow_lm, max_batch_size=len(runners), max_queue=64)
    engine = client.app[BACKEND]
    running = await asyncio.gather(*(open_stream(client, door, RUNS_ON[0], 100) for door in runners))
    leaving = [
        asyncio.create_task(client.post(door.route(stream), json=door.body(RUNS_ON[1], 200, stream)))
        for door, stream in VARIANTS * 2
    ]
    await wait_until(lambda: engine.counts == (len(runners), len(leaving)))
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    await wait_until(lambda: engine.counts == (len(runners), 0), within=2.0)
    for door, (resp, first), text in zip(runners, running, expected, strict=True):
        assert door.streamed(first + await resp.read()) == text, door.name
    await wait_until(lambda: engine.counts == (0, 0))


# ---- 3. refused requests beside running streams -----------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A request its door must refuse: the status, what the message must name (its own fault, not a neighbour's)
    and, in OpenAI's shape, the field blamed."""

    door: Door
    body: dict[str, Any] | str  # a str is sent as it is, as JSON
    status: int
    says: str
    param: str | None = None
    path: str | None = None  # the door's own path unless given

    async def send(self, client: Client) -> aiohttp.ClientResponse:
        path = self.path or self.door.path
        if isinstance(self.body, str):
            return await client.post(path, data=self.body, headers={"Content-Type": "application/json"})
        return await client.post(path, json=self.body)


def bad_requests() -> list[Bad]:
    """Each door's bad body, broken JSON, an unknown model (the doors that check it), a prompt past the context and
    max_tokens past the server's ceiling; half of those that can ask for a stream do."""
    user = _user("hi")
    ollama_long = {**_ollama_options(8), "num_predict": TOO_MANY}
    return [
        # bodies that are not the door's
        Bad(OPENAI_CHAT, {"model": MODEL, "messages": "hi", "stream": True}, 400, "messages", "messages"),
        Bad(LEGACY, {"model": MODEL, "prompt": 5}, 400, "prompt", "prompt"),
        Bad(ANTHROPIC, {"model": MODEL, "messages": user, "stream": True}, 400, "max_tokens"),
        Bad(OLLAMA_CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
        Bad(GENERATE, {"model": MODEL, "prompt": 5, "stream": True}, 400, "prompt"),
        Bad(CHATGLM, {"query": 5}, 400, "query", "query", path="/stream"),
        *(Bad(door, '{"model": "tiny", ', 400, "JSON") for door in (OPENAI_CHAT, LEGACY, ANTHROPIC, OLLAMA_CHAT)),
        Bad(GENERATE, "[]", 400, "object"),
        # a model this server does not serve
        Bad(OPENAI_CHAT, {**openai_chat_body("hi", 8, False), "model": "nope-model"}, 404, "nope-model", "model"),
        Bad(LEGACY, {**legacy_body("hi", 8, True), "model": "nope-model"}, 404, "nope-model", "model"),
        Bad(OLLAMA_CHAT, {**ollama_chat_body("hi", 8, True), "model": "nope-model"}, 404, "nope-model"),
        Bad(GENERATE, {**generate_body("hi", 8, False), "model": "nope-model"}, 404, "nope-model"),
        # a prompt past the context
        Bad(OPENAI_CHAT, openai_chat_body(LONG_PROMPT, 8, True), 400, "context length", "messages"),
        Bad(LEGACY, legacy_body(LONG_PROMPT, 8, False), 400, "context length", "prompt"),
        Bad(ANTHROPIC, anthropic_body(LONG_PROMPT, 8, False), 400, "context length"),
        Bad(OLLAMA_CHAT, ollama_chat_body(LONG_PROMPT, 8, True), 400, "context length"),
        Bad(GENERATE, generate_body(LONG_PROMPT, 8, False), 400, "context length"),
        Bad(RAW_GENERATE, raw_generate_body(LONG_PROMPT, 8, True), 400, "context length"),
        Bad(CHATGLM, chatglm_body(LONG_PROMPT, 8, True), 400, "tokens", "query", path="/stream"),
        # an answer longer than the server allows
        Bad(OPENAI_CHAT, openai_chat_body("hi", TOO_MANY, False), 400, str(TOO_MANY), "max_tokens"),
        Bad(LEGACY, legacy_body("hi", TOO_MANY, True), 400, str(TOO_MANY), "max_tokens"),
        Bad(ANTHROPIC, anthropic_body("hi", TOO_MANY, True), 400, str(TOO_MANY)),
        Bad(OLLAMA_CHAT, {**ollama_chat_body("hi", 8, False), "options": ollama_long}, 400, str(TOO_MANY)),
        Bad(GENERATE, {**generate_body("hi", 8, True), "options": ollama_long}, 400, str(TOO_MANY)),
        Bad(CHATGLM, chatglm_body("hi", TOO_MANY, True), 400, str(TOO_MANY), "max_tokens", path="/stream"),
    ]


async def test_refused_requests_never_touch_the_streams_beside_them(
    make_client: MakeClient, tiny_lm: LoadedModel
) -> None:
    streaming = DOORS  # every door, ChatGLM's at /stream
    prompts = [RUNS_ON[i % len(RUNS_ON)] for i in range(len(streaming))]
    alone_client = await served(make_client)
    expected = [await ask(alone_client, door, p, 48, True) for door, p in zip(streaming, prompts, strict=True)]

    model = Held(tiny_lm.model)
    client = await served(make_client, wrapped(tiny_lm, model), max_batch_size=8)
    engine = client.app[BACKEND]
    opened = await asyncio.gather(*(open_stream(client, d, p, 48) for d, p in zip(streaming, prompts, strict=True)))
    model.hold.set()
    try:
        await wait_until(model.holding.is_set)
        assert engine.counts == (len(streaming), 0)  # the worker stands still with every stream mid-answer
        bad = bad_requests()
        answers = await asyncio.wait_for(asyncio.gather(*(b.send(client) for b in bad)), 15)
        for b, resp in zip(bad, answers, strict=True):
            case = (b.door.name, b.body if isinstance(b.body, str) else {k: str(v)[:30] for k, v in b.body.items()})
            assert resp.status == b.status, (case, await resp.text())
            assert resp.content_type == "application/json", case
            body = await resp.json()
            assert b.says in b.door.refusal(resp.status, body), (case, body)
            if b.param is not None:
                assert body["error"]["param"] == b.param, (case, body)
        assert engine.counts == (len(streaming), 0)  # none of them reached the engine, none of the streams left
    finally:
        model.release.set()
    rest = await asyncio.gather(*(resp.read() for resp, _ in opened))
    for door, (_, first), tail, text in zip(streaming, opened, rest, expected, strict=True):
        assert door.streamed(first + tail) == text, door.name
    await wait_until(lambda: engine.counts == (0, 0))


# ---- 4. browsers on the new routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """A new route, a body it would answer (generating, where it generates) and its door's error shape."""

    method: str
    path: str
    body: dict[str, Any] | None
    refusal: Callable[[int, dict[str, Any]], str]
    generates: bool = False


NEW_ROUTES = [
    Route("POST", "/v1/completions", legacy_body("hi", 2, False), openai_refusal, True),
    Route("POST", "/v1/messages", anthropic_body("hi", 2, False), anthropic_refusal, True),
    Route("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": _user("hi")}, anthropic_refusal),
    Route("POST", "/api/chat", ollama_chat_body("hi", 2, False), ollama_refusal, True),
    Route("POST", "/api/generate", generate_body("hi", 2, False), ollama_refusal, True),
    Route("POST", "/api/show", {"model": MODEL}, ollama_refusal),
    Route("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}, openai_refusal),
    Route("POST", "/detokenize", {"model": MODEL, "tokens": [40, 41]}, openai_refusal),
    Route("GET", "/api/tags", None, ollama_refusal),
    Route("GET", "/api/version", None, ollama_refusal),
    Route("GET", "/api/ps", None, ollama_refusal),
]
POST_ROUTES = [r for r in NEW_ROUTES if r.method == "POST"]


@pytest.mark.parametrize("route", NEW_ROUTES, ids=[f"{r.method} {r.path}" for r in NEW_ROUTES])
async def test_other_sites_pages_are_refused_on_every_new_route(
    make_client: MakeClient, tiny_lm: LoadedModel, route: Route
) -> None:
    model = Counted(tiny_lm.model)
    client = await served(make_client, wrapped(tiny_lm, model))
    before = model.passes
    refused = await client.request(route.method, route.path, json=route.body, headers={"Origin": EVIL})
    assert refused.status == 403, await refused.text()
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "--cors-origins" in route.refusal(403, await refused.json())
    assert model.passes == before  # nothing ran
    # the same request from a page on this machine is served, and its page may read the answer
    allowed = await client.request(route.method, route.path, json=route.body, headers={"Origin": LOOPBACK_PAGE})
    assert allowed.status == 200, await allowed.text()
    assert allowed.headers["Access-Control-Allow-Origin"] == LOOPBACK_PAGE
    await allowed.read()
    assert (model.passes > before) == route.generates


@pytest.mark.parametrize("route", NEW_ROUTES, ids=[f"{r.method} {r.path}" for r in NEW_ROUTES])
async def test_preflights_are_refused_for_other_sites_and_allowed_for_loopback_pages(
    make_client: MakeClient, route: Route
) -> None:
    client = await served(make_client)
    asking = {"Access-Control-Request-Method": route.method, "Access-Control-Request-Headers": "content-type,x-api-key"}
    refused = await client.options(route.path, headers={"Origin": EVIL, **asking})
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "--cors-origins" in route.refusal(403, await refused.json())
    allowed = await client.options(route.path, headers={"Origin": LOOPBACK_PAGE, **asking})
    assert allowed.status == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == LOOPBACK_PAGE
    assert allowed.headers["Access-Control-Allow-Methods"] == route.method
    assert allowed.headers["Access-Control-Allow-Headers"] == "content-type,x-api-key"


@pytest.mark.parametrize("route", POST_ROUTES, ids=[r.path for r in POST_ROUTES])
async def test_bodies_a_page_sends_without_a_preflight_are_415(
    make_client: MakeClient, tiny_lm: LoadedModel, route: Route
) -> None:
    """Forms and text/plain are what another site's page may POST with no preflight: refused before anything runs."""
    model = Counted(tiny_lm.model)
    client = await served(make_client, wrapped(tiny_lm, model))
    before = model.passes
    raw = json.dumps(route.body)
    sent: list[dict[str, Any]] = [
        {"data": raw, "headers": {"Content-Type": "text/plain"}},
        {"data": raw},  # aiohttp says text/plain for a str
        {"data": {"model": MODEL, "prompt": "hi"}},  # application/x-www-form-urlencoded
        {"data": aiohttp.FormData({"model": MODEL, "prompt": "hi"})},
    ]
    for kwargs in sent:
        resp = await client.post(route.path, **kwargs)
        assert resp.status == 415, (kwargs, await resp.text())
        assert "application/json" in route.refusal(415, await resp.json()), kwargs
    assert model.passes == before
    # the same body as JSON is served: the 415 was for its type alone
    ok = await client.post(route.path, data=raw, headers={"Content-Type": "application/json"})
    assert ok.status == 200, await ok.text()
    await ok.read()
