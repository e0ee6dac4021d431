"""Slow and oversized clients against the listening side the server runs (`GuardedSite`, here on a 1 s
`--read-timeout`): heads and bodies that do not arrive in time get 408, over-long headers 431 without a traceback,
and nobody else notices. Raw sockets, since a client library would not misbehave on purpose."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from api.config import ServerConfig
from api.serving import KEEPALIVE, LINGER, GuardedSite, quiet_parse_errors
from engine import Engine
from models.loader import LoadedModel
from server import bind, create_app

TIMEOUT = 1.0


class Server:
    """The tiny model served as `python server.py --read-timeout 1` serves it, on a free port; the test's raw
    connections are closed after it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def server(tiny_lm: LoadedModel) -> AsyncIterator[Server]:
    async for served in serving(tiny_lm):
        yield served


@pytest.fixture
async def slow_server(slow_lm: LoadedModel) -> AsyncIterator[Server]:
    """The same with a model 20 ms slower per step: a 100-token answer outlasts the deadline."""
    async for served in serving(slow_lm):
        yield served


async def serving(lm: LoadedModel) -> AsyncIterator[Server]:
    quiet_parse_errors()
    app = create_app(ServerConfig(read_timeout=TIMEOUT), Engine(lm))
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=KEEPALIVE, lingering_time=LINGER, handler_cancellation=True
    )
    await runner.setup()
    sock = bind("127.0.0.1", 0)
    await GuardedSite(runner, sock, TIMEOUT).start()
    served = Server(sock.getsockname()[1])
    yield served
    for writer in served.writers:
        writer.close()
    await runner.cleanup()


def post(path: str, body: dict[str, object], extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{extra}\r\n"
    )
    return head.encode() + data


async def answer(reader: asyncio.StreamReader, status_line: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body by Content-Length."""
    status_line = status_line or await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def test_a_head_sent_a_byte_at_a_time_gets_408_and_others_stream_on(server: Server) -> None:
    # someone else's stream, running all along
    reader, writer = await server.connect()
    writer.write(post("/stream", {"query": "hi", "max_tokens": 60, "ignore_eos": True}, "Connection: close\r\n"))
    slow_reader, slow = await server.connect()
    started = time.monotonic()
    head = b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"  # 3.5 s of it
    answered = b""
    for byte in head:  # until the server answers: writing on after it closed would reset the connection
        slow.write(bytes([byte]))
        try:
            answered = await asyncio.wait_for(slow_reader.readline(), 0.05)
            break
        except TimeoutError:
            continue
    status, headers, body = await answer(slow_reader, answered)
    assert status == 408 and "did not arrive within 1 s" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close" and await slow_reader.read() == b""
    assert time.monotonic() - started < 2.5
    status, _, _ = await answer(reader)  # the stream is whole: the headers of a chunked answer, then its frames
    rest = await asyncio.wait_for(reader.read(), 30)
    assert status == 200 and b'"finished":true' in rest and b'"finish_reason":"length"' in rest


async def test_a_body_that_stalls_gets_408_and_the_connection_closes(server: Server) -> None:
    reader, writer = await server.connect()
    whole = post("/chat", {"query": "hi", "max_tokens": 1})
    writer.write(whole[:-5])  # all but the body's last bytes
    started = time.monotonic()
    status, headers, body = await asyncio.wait_for(answer(reader), 3)
    assert status == 408 and "body did not arrive" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close" and time.monotonic() - started < 2.5
    assert await asyncio.wait_for(reader.read(), LINGER + 2) == b""  # what may still come is dropped meanwhile


async def test_a_connection_that_never_speaks_is_closed(server: Server) -> None:
    reader, _ = await server.connect()
    assert await asyncio.wait_for(reader.read(), 3) == b""


async def test_idle_keep_alive_and_pipelined_requests_are_not_cut(server: Server) -> None:
    """The deadline is for a head in progress: a connection idle between requests stays open, and two requests
    in one write (the second starting inside the first's packet) are both answered."""
    reader, writer = await server.connect()
    writer.write(post("/chat", {"query": "hi", "max_tokens": 1}))
    assert (await answer(reader))[0] == 200
    await asyncio.sleep(TIMEOUT * 2)
    writer.write(post("/chat", {"query": "hi", "max_tokens": 1}) * 2)
    first, second = await answer(reader), await answer(reader)
    assert first[0] == second[0] == 200 and json.loads(second[2])["success"] is True
    # a body is not a head: a 20 kB line in one is no over-long header
    writer.write(post("/chat", {"query": "hi", "max_tokens": 1, "stop": ["x" * 20000]}))
    assert (await answer(reader))[0] == 200


async def test_a_pipelined_head_waits_for_the_answer_before_it(slow_server: Server) -> None:
    """A client that sends the start of its next request while a long answer streams: the answer is not cut, and
    the next head's deadline starts when the answer has gone."""
    reader, writer = await slow_server.connect()
    # in one packet with the request before it, and no more
    writer.write(post("/stream", {"query": "hi", "max_tokens": 100, "ignore_eos": True}) + b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    status, headers, _ = await answer(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    stream = b""
    while b"0\r\n\r\n" not in stream and (part := await asyncio.wait_for(reader.read(65536), 10)):
        stream += part  # up to the chunked answer's end
    assert time.monotonic() - started > TIMEOUT * 1.5  # it outlasted the deadline
    assert b'"finished":true' in stream and b"408" not in stream
    ended = time.monotonic()
    status, _, _ = await asyncio.wait_for(answer(reader), 3)
    assert status == 408 and time.monotonic() - ended > TIMEOUT * 0.8


async def test_line_ends_after_a_body_do_not_start_a_deadline(server: Server) -> None:
    reader, writer = await server.connect()
    writer.write(post("/chat", {"query": "hi", "max_tokens": 1}) + b"\r\n")  # as some clients do
    assert (await answer(reader))[0] == 200
    await asyncio.sleep(TIMEOUT * 2)
    writer.write(post("/chat", {"query": "hi", "max_tokens": 1}))
    assert (await asyncio.wait_for(answer(reader), 3))[0] == 200


async def test_after_a_chunked_body_the_next_head_has_its_deadline(server: Server) -> None:
    reader, writer = await server.connect()
    body = json.dumps({"query": "hi", "max_tokens": 1}).encode()
    head = (
        b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert (await answer(reader))[0] == 200
    writer.write(b"GET /health HTTP/1.1\r\n")  # and no more
    started = time.monotonic()
    status, _, _ = await asyncio.wait_for(answer(reader), 3)
    assert status == 408 and time.monotonic() - started < 2.5


async def test_200_idle_connections_do_not_stop_service(server: Server) -> None:
    idle = [await server.connect() for _ in range(200)]
    reader, writer = await server.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await asyncio.wait_for(answer(reader), 2))[0] == 200
    for r, _ in idle:  # and they are let go after the deadline
        assert await asyncio.wait_for(r.read(), 5) == b""


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000, 431),  # refused before its end
        (b"GET /health?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431),
    ],
    ids=["header", "unfinished header", "request line", "many headers"],
)
async def test_oversized_heads_are_refused_without_a_traceback(
    server: Server, head: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await server.connect()
    writer.write(head)
    got, _, body = await asyncio.wait_for(answer(reader), 3)
    assert got == status and json.loads(body)["success"] is False
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not any("aaaa" in r.getMessage() for r in caplog.records)  # the header is not quoted back
    assert [r for r in caplog.records if "refused a request" in r.getMessage()]


async def test_malformed_requests_aiohttp_refuses_are_one_warning_line(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """What passes the guard and fails in aiohttp's own parser (a control byte in a header name) is a 400 and one
    warning line, not an ERROR traceback quoting the bytes."""
    caplog.set_level(logging.INFO)
    reader, writer = await server.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\x01secret: 1\r\n\r\n")
    assert (await asyncio.wait_for(answer(reader), 3))[0] == 400
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not any("secret" in r.getMessage() for r in caplog.records)
    assert [r for r in caplog.records if "refused a malformed request" in r.getMessage()]
