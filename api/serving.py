"""The listening side: aiohttp's protocol behind a guard that cuts off clients too slow to send a request's head, or
sending one too large, before aiohttp sees it; and `serve`, the process's event loop (aiohttp's `run_app` with the
guard in place).

aiohttp has no timeout for a request head in progress (only for idle connections) and answers an over-long header
with a 400 and an ERROR traceback quoting it. The guard watches the bytes of each head as they arrive: a head must be
complete within `--read-timeout` of its first byte or of the connection opening (408), with no line over `MAX_LINE`
bytes and `MAX_HEAD` in all (431). Bodies have the same deadline, checked where they are read (`api.http.read_body`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import suppress
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from api.errors import error_body
from sse import dumps

log = logging.getLogger(__name__)

MAX_LINE = 8190  # aiohttp's own limit per line: the guard refuses first, in its own words
MAX_HEAD = 65536
MAX_HEADERS = 128  # aiohttp's limit on header lines
KEEPALIVE = 75.0  # seconds an idle connection stays open between requests (aiohttp's run_app default)
# seconds the rest of a body answered early (413, 415, 408) is read and dropped before the connection closes: long
# enough for the client to see the answer rather than a reset, short enough that a trickling body goes soon
LINGER = 2.0
REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP response, written straight to the socket: the connection never reached aiohttp's handler."""
    body = dumps(error_body(status, message)).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Refused(Exception):
    """A request head the guard answers itself."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class HeadGuard(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection and passes every byte through, reading just enough to know where
    each request head starts and ends (its body's length). A head's deadline runs from its first byte (the first
    head's from the connection opening), and only while no answer is being given on the connection: a pipelined head
    waits for the answer before it. The request middleware reports when a request starts and ends (`guard_of`).

    A chunked body is not followed: the next head is watched once its request has ended. An upgrade ends the watch."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        # head: in a head; body: `_body_left` bytes to come; between: before the next head; chunked: a body of
        # unknown length, until its request ends; off: not watching
        self._state = "head"
        self._head = bytearray()
        self._line = 0  # bytes of the head's line in progress
        self._lines = 0
        self._body_left = 0
        self._busy = False  # a request is being answered
        self._timer: asyncio.TimerHandle | None = None

    # -- what the request middleware reports

    def request_started(self) -> None:
        self._busy = True
        self._cancel_timer()  # a pipelined head's deadline waits for this answer

    def request_ended(self) -> None:
        self._busy = False
        if self._state == "chunked":  # its body has been read (or given up on) by now
            self._state = "between"
        elif self._state == "head":
            self._arm()

    # -- the protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._start_head()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        try:
            self._follow(data)
        except Refused as refused:
            self._refuse(refused.status, refused.message)
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- following the requests in the byte stream

    def _follow(self, data: bytes) -> None:
        at = 0
        while at < len(data) and self._state not in ("off", "chunked"):
            if self._state == "between":
                while at < len(data) and data[at] in b"\r\n":  # line ends some clients send after a body
                    at += 1
                if at == len(data):
                    return
                self._start_head()
            if self._state == "head":
                at = self._scan(data, at)
            else:  # body
                take = min(len(data) - at, self._body_left)
                at, self._body_left = at + take, self._body_left - take
                if not self._body_left:
                    self._state = "between"

    def _start_head(self) -> None:
        self._state, self._line, self._lines = "head", 0, 0
        self._head.clear()
        self._cancel_timer()
        if not self._busy:
            self._arm()

    def _arm(self) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def _scan(self, data: bytes, at: int) -> int:
        """Take head bytes from data[at:] up to its empty line; returns where its body starts (or the end)."""
        while at < len(data):
            end = data.find(b"\n", at)
            stop = len(data) if end < 0 else end + 1
            self._head += data[at:stop]
            self._line += stop - at
            if self._line - (end >= 0) > MAX_LINE + 1:  # + its "\r"
                if self._lines == 0:
                    raise Refused(414, f"the request line is longer than {MAX_LINE} bytes")
                raise Refused(431, f"a header line is longer than {MAX_LINE} bytes")
            if len(self._head) > MAX_HEAD or self._lines > MAX_HEADERS:
                raise Refused(431, f"the request's headers are over {MAX_HEADERS} lines or {MAX_HEAD} bytes")
            if end < 0:
                return stop
            empty, self._line = self._line <= 2, 0  # "\r\n" at most
            if empty and not self._lines:  # empty lines before a request line are allowed
                self._head.clear()
            elif empty:
                self._head_done()
                return stop
            else:
                self._lines += 1
            at = stop
        return at

    def _head_done(self) -> None:
        """The head is whole: the handler starts soon, its body has its own deadline (where it is read)."""
        self._cancel_timer()
        length = body_length(bytes(self._head))
        self._head.clear()
        if isinstance(length, str):
            self._state = length
        elif length:
            self._state, self._body_left = "body", length
        else:
            self._state = "between"

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer and close; only close while an answer is (or may still be) going out: a second response written
        into it would garble the first."""
        assert self._transport is not None
        log.warning("refused a request from %s: %s (%d)", self._peer(), message, status)
        self._cancel_timer()
        self._state = "off"
        if not self._busy and not self._transport.get_write_buffer_size():
            self._transport.write(raw_error(status, message))
        self._transport.close()

    def _expired(self) -> None:
        """The head did not arrive in time: a 408 when some of it came, else just close (a connection that never
        sent anything)."""
        self._timer = None
        if self._transport is None or self._transport.is_closing() or self._state != "head" or self._busy:
            return
        if self._head or self._lines:
            self._refuse(408, f"the request's headers did not arrive within {self._timeout:g} s")
        else:
            self._transport.close()

    def _peer(self) -> str:
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"


def body_length(head: bytes) -> int | str:
    """The body length a request head announces: its Content-Length, 0 without one; "chunked" for a body of unknown
    length (also a malformed or repeated length: aiohttp refuses those itself); "off" for an upgrade (what follows
    is no longer HTTP)."""
    length = 0
    seen = False
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if not colon:
            continue
        if name == b"upgrade":
            return "off"
        if name == b"transfer-encoding":
            return "chunked"
        if name == b"content-length":
            if seen or not value.strip().isdigit():
                return "chunked"
            seen, length = True, int(value.strip())
    return length


def guard_of(transport: asyncio.BaseTransport | None) -> HeadGuard | None:
    """The guard of a request's connection (None under a test client, which has none)."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, HeadGuard) else None


class GuardedSite(web.BaseSite):
    """aiohttp's SockSite with a HeadGuard in front of each connection's protocol."""

    __slots__ = ("_sock", "_timeout")

    def __init__(self, runner: web.AppRunner, sock: socket.socket, timeout: float) -> None:
        super().__init__(runner)
        self._sock = sock
        self._timeout = timeout

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeadGuard(server(), self._timeout), sock=self._sock
        )


class ParseErrorsInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse with an ERROR traceback quoting the bytes; one warning line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a malformed request: %s (%d)",
                (type(error).__name__, error.code),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_parse_errors() -> None:
    """Once per process: aiohttp's parse errors become one warning line."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParseErrorsInOneLine) for f in server_log.filters):
        server_log.addFilter(ParseErrorsInOneLine())


def serve(app: web.Application, sock: socket.socket, read_timeout: float) -> None:
    """Serve `app` on the bound socket until SIGINT or SIGTERM, as `web.run_app` does."""
    quiet_parse_errors()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def run() -> None:
        # aiohttp waits for handlers to write their last frame only briefly: `drain` has ended every answer by then;
        # its access log is off: `request_context` writes one line per request with the request id
        runner = web.AppRunner(
            app,
            handle_signals=True,
            shutdown_timeout=1.0,
            access_log=None,
            keepalive_timeout=KEEPALIVE,
            lingering_time=LINGER,
            handler_cancellation=True,  # a closed connection cancels its handler at once
        )
        await runner.setup()
        try:
            await GuardedSite(runner, sock, read_timeout).start()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    task = loop.create_task(run())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        leftover: Any = asyncio.all_tasks(loop)
        for other in leftover:
            other.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
