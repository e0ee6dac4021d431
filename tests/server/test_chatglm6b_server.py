"""ChatGLM-6B served through the real command line from the official sharded `.bin` layout, and the one-line
errors a bad checkpoint gets."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import LiveServer, start_server, stop_server
from tests.glm import golden, golden_weights, write_bin_checkpoint, write_config
from tests.helpers import delta_frames
from tests.server.test_cli import run_cli

JSON = {"Content-Type": "application/json"}

CHATS = golden("cases.json")["chat"]  # the original `chat()` with do_sample=False, max_new_tokens=16


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bin_checkpoint(tmp_path_factory.mktemp("chatglm-6b-tiny"))


@pytest.fixture(scope="module")
def glm_server(glm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    args = ["--model", str(glm_dir), "--dtype", "float32", "--device", "cpu"]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "glm.log")
    yield server
    stop_server(server)


def greedy(case: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"query": case["query"], "history": case["history"], "temperature": 0, "max_tokens": 16, **extra}


def stream(server: LiveServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        server.url + "/stream", data=json.dumps(body).encode(), method="POST", headers=JSON
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return delta_frames(resp.read())


@pytest.mark.parametrize("case", CHATS, ids=lambda c: f"{len(c['history'])}-rounds")
def test_chat_gives_the_originals_answers(case: dict[str, Any], glm_server: LiveServer) -> None:
    body = glm_server.post("/chat", greedy(case))
    assert body["response"] == case["response"]
    assert body["history"] == case["new_history"]
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("case", CHATS, ids=lambda c: f"{len(c['history'])}-rounds")
def test_streamed_deltas_concatenate_to_the_originals_answers(case: dict[str, Any], glm_server: LiveServer) -> None:
    frames = stream(glm_server, greedy(case))
    assert "".join(f["delta"] for f in frames) == case["response"] == frames[-1]["response"]
    assert frames[-1]["finished"] and frames[-1]["history"] == case["new_history"]


def test_the_answers_are_the_same_in_a_batch_with_other_requests(glm_server: LiveServer) -> None:
    others = [{"query": f"另一个问题 {i}", "temperature": 0.9, "max_tokens": 40, "seed": i} for i in range(3)]
    jobs = [functools.partial(glm_server.post, "/chat", greedy(c)) for c in CHATS]
    jobs += [functools.partial(glm_server.post, "/chat", body) for body in others]
    jobs += [functools.partial(stream, glm_server, greedy(c)) for c in CHATS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    assert [r["response"] for r in results[: len(CHATS)]] == [c["response"] for c in CHATS]
    streamed = results[len(CHATS) + len(others) :]
    assert ["".join(f["delta"] for f in frames) for frames in streamed] == [c["response"] for c in CHATS]


def test_the_openai_route_speaks_the_same_chat_format(glm_server: LiveServer) -> None:
    case = CHATS[2]
    messages = [{"role": r, "content": t} for q, a in case["history"] for r, t in (("user", q), ("assistant", a))]
    body = {"messages": [*messages, {"role": "user", "content": case["query"]}], "temperature": 0, "max_tokens": 16}
    answer = glm_server.post("/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == case["response"]


def test_health_reports_what_the_weights_take(glm_server: LiveServer) -> None:
    health = glm_server.get("/health")
    weights = golden_weights()
    tied_once = sum(t.numel() * 4 for k, t in weights.items() if "inv_freq" not in k and k != "lm_head.weight")
    assert health["dtype"] == "float32" and health["weight_bytes"] == tied_once


# ---- bad checkpoints: one line naming the file and the problem, exit status 2 -----------------------------


class Exploit:
    """Unpickling this runs a shell command: what a weights-only load must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def missing_shard(folder: Path) -> str:
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    return "pytorch_model-00002-of-00003.bin: missing shard"


def keys_out_of_place(folder: Path) -> str:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v.endswith("00001-of-00003.bin"))
    index["weight_map"][key] = "pytorch_model-00003-of-00003.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return "pytorch_model-00001-of-00003.bin: keys do not match the index"


def code_in_the_pickle(folder: Path) -> str:
    shard = folder / "pytorch_model-00001-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "x": Exploit(folder / "pwned")}, shard)
    return "pytorch_model-00001-of-00003.bin: refused: unpickling it would execute code"


def not_chatglm_6b(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    del config["num_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json: not a ChatGLM-6B config: 'num_layers' is missing"


def wrong_shape(folder: Path) -> str:
    write_config(folder, inner_hidden_size=128)  # the weights have 256
    return "mlp.dense_h_to_4h.* has shape ?256*, config.json implies ?128*"  # fnmatch: ? for the bracket


def remote_code(folder: Path) -> str:
    write_config(folder, model_type="baichuan")
    return "config.json asks for remote code (model_type 'baichuan'), which this server never runs; served natively"


@pytest.mark.parametrize(
    "damage", [missing_shard, keys_out_of_place, code_in_the_pickle, not_chatglm_6b, wrong_shape, remote_code]
)
def test_a_bad_checkpoint_is_one_line_and_exit_status_2(damage: Callable[[Path], str], tmp_path: Path) -> None:
    folder = write_bin_checkpoint(tmp_path / "model")
    message = damage(folder)
    result = run_cli("--model", str(folder), "--device", "cpu", "--port", "0")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fnmatch.fnmatch(last, f"*{message}*"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (folder / "pwned").exists()
