"""The command line: clear start-up errors, and a real server answering over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, LiveServer

# the environment of a machine with no GPU to see, whatever this machine has
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python server.py ARGS`, run to its end; `env`: variables set for it on top of this process's."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "no such file or directory"),
        (["--model", str(ROOT / "server.py")], "must be a .gguf"),
        (["--model", str(ROOT)], "no config.json"),
        (["--device", "0,1"], "this torch build sees no CUDA device (use --device cpu)"),
        (["--device", "tpu"], "expected cpu"),
        (["--threads", "0"], "--threads 0: expected 1 or more"),
        (["--prefill-seconds", "0"], "--prefill-seconds 0: expected more than 0"),
        (["--upstream", "http://127.0.0.1:9/v1", "--threads", "2"], "--threads belong to a local model"),
        (["--upstream", "http://ada:Zm9v/YmFy@127.0.0.1:9/v1"], "--upstream: the upstream URL has an @"),
        (["--read-timeout", "0"], "--read-timeout 0: expected more than 0"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb -1: expected 0 (off) or more"),
        (["--upstream", "http://127.0.0.1:9/v1", "--prefix-cache-mb", "64"], "--prefix-cache-mb belong to a local"),
        (["--upstream", "http://127.0.0.1:9/v1", "--loop-guard", "off"], "--loop-guard belong to a local"),
        (["--loop-guard", "maybe"], "invalid choice: 'maybe'"),
    ],
    ids=[
        "missing",
        "not-gguf",
        "not-hf-dir",
        "gpus-without-cuda",
        "device",
        "threads",
        "prefill-seconds",
        "upstream",
        "upstream-url",
        "read-timeout",
        "prefix-cache-mb",
        "prefix-cache-upstream",
        "loop-guard-upstream",
        "loop-guard",
    ],
)
def test_start_up_errors_are_clear(args: list[str], message: str, tiny_dir: Path) -> None:
    if args[0] in ("--quantize", "--device"):
        args = ["--model", str(tiny_dir), *args]
    result = run_cli(*args, env=NO_GPU)  # as on a machine without CUDA, which "gpus-without-cuda" is about
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Zm9v" not in result.stderr + result.stdout  # a password in --upstream is never echoed


def test_live_server_serves_both_apis(tiny_server: LiveServer) -> None:
    assert tiny_server.get("/health")["model"] == "tiny"
    body = tiny_server.post("/chat", {"query": "hello", "max_tokens": 4, "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 4
    assert tiny_server.get("/v1/models")["data"][0]["id"] == "tiny"
    messages = [{"role": "user", "content": "hello"}]
    done = tiny_server.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 3})
    assert done["object"] == "chat.completion" and done["usage"]["completion_tokens"] <= 3


def test_api_key_from_the_environment(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    from tests.conftest import start_server, stop_server

    monkeypatch.setenv("CHAT_API_KEY", "from-env")
    server = start_server(["--model", str(tiny_dir), "--device", "cpu"], tmp_path / "server.log")
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            server.get("/v1/models")
        assert info.value.code == 401
        info.value.close()
        request = urllib.request.Request(server.url + "/v1/models", headers={"Authorization": "Bearer from-env"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop_server(server)


@pytest.mark.parametrize("path", ["/chat", "/stream", "/v1/chat/completions"])
def test_a_client_that_leaves_stops_its_generation_on_a_live_server(long_context_server: LiveServer, path: str) -> None:
    import http.client
    import json
    import time
    import urllib.parse

    asked = {"messages": [{"role": "user", "content": "go"}]} if path.startswith("/v1") else {"query": "go"}
    body = {**asked, "max_tokens": 6000, "ignore_eos": True}
    url = urllib.parse.urlsplit(long_context_server.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while long_context_server.get("/health")["running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    conn.close()  # 6000 tokens take far longer than the 2 s the server gets to notice
    left = time.monotonic()
    while long_context_server.get("/health")["running"] != 0:
        assert time.monotonic() - left < 2.0
        time.sleep(0.02)


@pytest.fixture(scope="module")
def long_context_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from tests.conftest import build_tiny_model, start_server, stop_server

    folder = build_tiny_model(tmp_path_factory.mktemp("long"), context=8192)
    server = start_server(["--model", str(folder), "--device", "cpu"], tmp_path_factory.mktemp("logs") / "long.log")
    yield server
    stop_server(server)
