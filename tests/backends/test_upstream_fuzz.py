"""An upstream that sends anything at all: hypothesis writes the event streams (garbage lines, JSON of every type,
errors of every shape, chunks with fields of the wrong type, good chunks before a bad one), a real aiohttp server
replays them, and the proxy in front of it must answer every door without hanging: a stream that ends, with an error
frame when the upstream broke, or a 502, never a hang and never a 500. Where the answer ends at a line (`[DONE]`, a
bad one), the upstream keeps the stream open after its lines for as long as the proxy listens: only a proxy that
stops there answers at all. (A few seconds tell a hang; one second was missed once by a busy CI machine.)"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.config import ServerConfig
from backends.upstream import UpstreamBackend, UpstreamConfig
from server import create_app
from tests.backends.test_upstream import FakeUpstream, chunk, one_line
from tests.helpers import delta_frames, parse_frames

HANG_S = 5.0  # an answer this late is a proxy waiting for an upstream that holds its stream open for ever
Item = tuple[str, Any]  # (kind, value): what one line of the upstream's stream is, for the expectation

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
TEXT = st.one_of(st.text(max_size=8), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2))
COUNT = st.integers(0, 10**6)
REASON = st.sampled_from(["stop", "length", "tool_calls"])
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def not_json(raw: bytes) -> bool:
    """A payload no JSON parser takes (as the proxy sees it: stripped), other than the stream's end marker."""
    if b"\n" in raw or raw.strip() == b"[DONE]":
        return False
    try:
        json.loads(raw.strip())
    except (ValueError, RecursionError):
        return True
    return False


def other_than(*types: type) -> st.SearchStrategy[Any]:
    """JSON values of any type but these (a bool is no int here, as in JSON)."""

    def fits(value: Any) -> bool:
        return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)

    return JSON.filter(lambda v: not fits(v))


def choice(**fields: Any) -> bytes:
    return dump({"choices": [{"index": 0, "delta": {}, **fields}]})


NOT_A_COUNT = JSON.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53))
NO_CHOICES = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("choices", "error", "object")), JSON)

# payloads of a `data:` line that no OpenAI-compatible server sends: each must end the answer with an error
BAD = st.one_of(
    st.binary(max_size=40).filter(not_json),
    st.text(max_size=40).map(str.encode).filter(not_json),
    other_than(dict).map(dump),  # JSON scalars and arrays
    JSON.map(lambda v: dump({"error": v})),  # the upstream's error, of every type
    JSON.map(lambda v: dump({"object": "error", "message": v})),  # older vLLM's error
    NO_CHOICES.map(dump),
    other_than(list).map(lambda v: dump({"choices": v})),
    other_than(dict).map(lambda v: dump({"choices": [v]})),
    other_than(int).map(lambda v: choice(index=v)),
    st.integers().filter(lambda i: i != 0).map(lambda i: choice(index=i, delta={"content": "x"})),  # n is 1
    other_than(dict, type(None)).map(lambda v: choice(delta=v)),
    other_than(str, type(None)).map(lambda v: choice(delta={"content": v})),
    other_than(str, type(None)).map(lambda v: choice(finish_reason=v)),
    other_than(dict, type(None)).map(lambda v: dump({"choices": [], "usage": v})),
    NOT_A_COUNT.map(lambda v: dump({"choices": [], "usage": {"prompt_tokens": v, "completion_tokens": 1}})),
)
# lines the proxy should pass over: comments, other SSE fields, blank lines, bytes that are no `data:` line
NOISE = st.one_of(
    st.sampled_from([b": ping", b"event: message", b"id: 7", b"retry: 100", b"", b"data", b"DATA: {}"]),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and not b.strip().startswith(b"data:")),
)
ITEMS: st.SearchStrategy[Item] = st.one_of(
    TEXT.map(lambda t: ("text", t)),
    REASON.map(lambda r: ("finish", r)),
    st.tuples(COUNT, COUNT).map(lambda u: ("usage", u)),
    BAD.map(lambda b: ("bad", b)),
    NOISE.map(lambda n: ("noise", n)),
    st.just(("done", None)),
    JSON.map(lambda v: ("any", v)),  # could be anything: no expectation past it
)


@st.composite
def well_formed_then_bad(draw: st.DrawFn) -> list[Item]:
    """Text chunks, maybe a finish reason and usage, maybe a bad payload anywhere among them, maybe `[DONE]` (and
    anything at all after it), noise lines anywhere."""
    items: list[Item] = [("text", t) for t in draw(st.lists(TEXT, max_size=4))]
    if (reason := draw(st.none() | REASON)) is not None:
        items.append(("finish", reason))
    if (counts := draw(st.none() | st.tuples(COUNT, COUNT))) is not None:
        items.append(("usage", counts))
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), ("bad", draw(BAD)))
    if draw(st.booleans()):
        items += [("done", None), *draw(st.lists(ITEMS, max_size=3))]
    for noise in draw(st.lists(NOISE, max_size=3)):
        items.insert(draw(st.integers(0, len(items))), ("noise", noise))
    return items


def line(kind: str, value: Any) -> bytes:
    """The SSE line an item is on the wire."""
    if kind == "text":
        return chunk(value)
    if kind == "finish":
        return chunk(reason=value)
    if kind == "usage":
        return b"data: " + dump({"choices": [], "usage": {"prompt_tokens": value[0], "completion_tokens": value[1]}})
    if kind == "done":
        return b"data: [DONE]"
    if kind == "noise":
        return bytes(value)
    return b"data: " + (value if kind == "bad" else dump(value))


@dataclass(frozen=True)
class Expected:
    """What the client must see: the text shown before the end, and how it ends (None: an error)."""

    text: str
    reason: str | None
    usage: tuple[int, int] | None


def expected(items: list[Item]) -> Expected | None:
    """The answer an OpenAI client would read from these lines; None past a line that could be anything."""
    text, reason, counts = "", None, None
    for kind, value in items:
        if kind == "done":
            break
        if kind == "any":
            return None
        if kind == "bad":
            return Expected(text, None, None)
        if kind == "text":
            # what the JSON says, a lone surrogate (which UTF-8 cannot carry) as U+FFFD
            text += LONE_SURROGATE.sub("\ufffd", json.loads(json.dumps(value)))
        elif kind == "finish":
            reason = value
        elif kind == "usage":
            counts = value
    return Expected(text, reason, counts if reason else None)


async def without_hanging(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with asyncio.timeout(HANG_S):  # a hang fails the example
        resp = await client.post(path, json=body)
        return resp.status, await resp.read()


def check_chatglm_stream(status: int, body: bytes, want: Expected | None) -> None:
    assert status == 200
    frames = delta_frames(body)
    last = frames[-1]
    assert last["finished"] is True and not any(f["finished"] for f in frames[:-1])
    if last["finish_reason"] == "error":
        assert last["error"]["type"] == "upstream_error" and one_line(last["error"]["message"]), last
    if want is not None:
        assert (last["response"], last["finish_reason"]) == (want.text, want.reason or "error")


def check_openai_stream(status: int, body: bytes, want: Expected | None) -> None:
    assert status == 200
    frames = parse_frames(body)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    assert len(errors) <= 1 and ("error" in chunks[-1]) == bool(errors)
    assert all(e["type"] == "upstream_error" and one_line(e["message"]) for e in errors), errors
    if want is not None:
        choices = [c["choices"][0] for c in chunks if c.get("choices")]
        assert "".join(c["delta"].get("content", "") for c in choices) == want.text
        assert bool(errors) == (want.reason is None)
        if want.reason is not None:
            assert choices[-1]["finish_reason"] == want.reason


def check_chat(status: int, body: bytes, want: Expected | None) -> None:
    answer = json.loads(body)
    assert status in (200, 502), (status, answer)  # never a 500
    if status == 502:
        assert answer["success"] is False and one_line(answer["error"]["message"]), answer
    if want is not None:
        assert status == (502 if want.reason is None else 200), answer
        if want.reason is not None:
            assert (answer["response"], answer["finish_reason"]) == (want.text, want.reason)
            if want.usage is None:  # the upstream counted nothing: the proxy invents no counts
                assert "usage" not in answer
            else:
                prompt, completion = want.usage
                assert answer["usage"] == {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }


def ends_at_a_line(items: list[Item]) -> bool:
    """Whether the answer ends before the upstream's stream does: at `[DONE]`, or at a bad line (an error or a
    malformed chunk) wherever it is (a line that could be anything before it, if bad itself, ends it sooner)."""
    return any(kind in ("done", "bad") for kind, _ in items)


async def through_the_proxy(items: list[Item]) -> None:
    # held open after its lines where the answer ends at one: a proxy that waits for the upstream's end hangs there
    fake = FakeUpstream([line(kind, value) for kind, value in items], hold=ends_at_a_line(items))
    want = expected(items)
    async with TestServer(fake.app()) as upstream:
        try:
            backend = UpstreamBackend(UpstreamConfig(f"http://127.0.0.1:{upstream.port}/v1"))
            async with TestClient(TestServer(create_app(ServerConfig(), backend))) as client:
                check_chatglm_stream(*await without_hanging(client, "/stream", {"query": "hi"}), want)
                openai = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
                check_openai_stream(*await without_hanging(client, "/v1/chat/completions", openai), want)
                check_chat(*await without_hanging(client, "/chat", {"query": "hi"}), want)
        finally:  # a handler the proxy never let go of ends here, not 60 s into the upstream's shutdown
            fake.released.set()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run, so a failure in CI is one a developer can repeat
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(st.one_of(well_formed_then_bad(), st.lists(ITEMS, max_size=8)))
def test_whatever_the_upstream_sends_every_door_answers_without_hanging(items: list[Item]) -> None:
    asyncio.run(through_the_proxy(items))
