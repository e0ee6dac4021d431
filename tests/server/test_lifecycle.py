"""Start-up and shutdown: 503 while the model loads, and a SIGTERM that lets finished answers finish."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from api.config import BACKEND
from models.loader import LoadedModel, ModelLoadError
from tests.conftest import MakeClient, build_tiny_model, running_server, stop_process
from tests.helpers import wait_until


async def test_health_is_503_while_the_model_loads(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    gate = threading.Event()

    def slow_load() -> LoadedModel:
        gate.wait(30)
        return tiny_lm

    client = await make_client(slow_load)
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["status"] == "loading"
    for method, path, body in [("POST", "/chat", {"query": "hi"}), ("GET", "/v1/models", None)]:
        resp = await client.request(method, path, json=body)
        assert resp.status == 503, path
    gate.set()
    await wait_until(lambda: client.app[BACKEND].running)
    health = await client.get("/health")
    assert health.status == 200 and (await health.json())["status"] == "ok"


async def test_health_says_failed_after_a_failed_load(make_client: MakeClient) -> None:
    def broken_load() -> LoadedModel:
        raise ModelLoadError("config.json: no such file")

    client = await make_client(broken_load)
    await wait_until(lambda: client.app[BACKEND].engine.load_error is not None)  # type: ignore[attr-defined]
    health = await client.get("/health")
    body = await health.json()
    assert health.status == 503 and body["status"] == "failed"
    assert "config.json: no such file" in body["message"]
    assert (await client.post("/chat", json={"query": "hi"})).status == 503


def test_requests_ending_as_the_engine_stops_end_exactly_once(tiny_lm: LoadedModel) -> None:
    """A stop that gives up waiting ends every open request from the event loop's side while the worker is ending
    some of the same requests itself: each still gets exactly one final event, and the worker does not fail."""
    import logging

    from engine import Engine
    from generation.events import Failed, Finished
    from generation.sampling import SamplingParams

    async def round_(max_tokens: int) -> list[list[object]]:
        engine = Engine(tiny_lm)
        engine.start()
        handles = [
            engine.submit([1, 2, 3, 4][: 1 + i % 4], SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
            for i in range(8)
        ]
        await asyncio.sleep(0.002 * max_tokens)  # about when the first ones finish
        engine.stop(timeout=0)  # gives up at once: ends what is open from here, racing the worker
        seen: list[list[object]] = []
        for handle in handles:
            finals: list[object] = []
            async for event in handle.events(keepalive=60):
                if isinstance(event, (Finished, Failed)):
                    finals.append(event)
            await asyncio.sleep(0.05)  # anything delivered after the end would be queued by now
            while not handle._queue.empty():
                finals.append(handle._queue.get_nowait())
            seen.append([e for e in finals if isinstance(e, (Finished, Failed))])
        return seen

    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    catch = Catch()
    logging.getLogger("engine").addHandler(catch)
    try:
        for max_tokens in (1, 2, 3, 5, 8, 13):
            for finals in asyncio.run(round_(max_tokens)):
                assert len(finals) == 1, finals
    finally:
        logging.getLogger("engine").removeHandler(catch)
    assert not errors, [r.getMessage() for r in errors]


def read_stream(port: int, body: dict[str, Any], first: threading.Event, out: list[dict[str, Any]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/stream", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = b""
    for line in response:
        data += line
        if line.startswith(b"data: "):
            first.set()
    out.extend(json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: "))
    conn.close()


def test_sigterm_finishes_short_answers_and_ends_long_ones(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model", context=8192)
    args = ["--model", str(model), "--device", "cpu", "--shutdown-timeout", "5", "--max-batch-size", "8"]
    with running_server(args, tmp_path / "server.log") as server:
        port = int(server.url.rsplit(":", 1)[1])
        short = {"query": "short", "max_tokens": 40, "ignore_eos": True}
        long = {"query": "long", "max_tokens": 7000, "ignore_eos": True}
        streams: list[tuple[dict[str, Any], threading.Event, list[dict[str, Any]], threading.Thread]] = []
        for body in [short, long] * 4:
            started, frames = threading.Event(), list[dict[str, Any]]()
            thread = threading.Thread(target=read_stream, args=(port, body, started, frames), daemon=True)
            thread.start()
            streams.append((body, started, frames, thread))
        for _, started, _, _ in streams:
            assert started.wait(30)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        assert time.monotonic() - sent < 5 + 3  # within --shutdown-timeout, plus the answers' last frames
    for body, _, frames, thread in streams:
        thread.join(10)
        last = frames[-1]
        assert last["finished"] is True, "the stream lost its final frame"
        assert "".join(f["delta"] for f in frames) == last["response"]
        if body is short:
            assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 40
        else:
            assert last["finish_reason"] == "error" and "shutting down" in last["error"]["message"]
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_idle_server_exits_cleanly(tmp_path: Path, tiny_dir: Path, sig: signal.Signals) -> None:
    with running_server(["--model", str(tiny_dir), "--device", "cpu"], tmp_path / "server.log") as server:
        server.process.send_signal(sig)
        assert server.process.wait(20) == 0


def test_sigterm_while_the_model_loads_exits_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from tests.conftest import ROOT, free_port

    # the bundled GGUF on an empty cache: about 40 s of conversion that cannot be interrupted
    port, log = free_port(), tmp_path / "server.log"
    args = ["--port", str(port), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), *args], cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and process.poll() is None
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            except urllib.error.HTTPError as loading:  # 503 while loading
                loading.close()
                break
            except OSError:
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        stop_process(process)  # a test that failed before its SIGTERM leaves no server behind
    text = log.read_text()
    assert "stopped before the model finished loading" in text and "Traceback" not in text
