"""`POST /tokenize` and `POST /detokenize` (vLLM's shape): a prompt's ids are the very ids the generating doors prompt
the model with, checked against their usage; the text of ids; refusals; and the same answers through an `--upstream`
server in front of a live one."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

import api.http
from api.completions_schema import raw_job
from api.config import BACKEND, CONFIG
from backends.base import ChatJob, Sampling
from models.loader import LoadedModel
from sse import dumps
from tests.api.test_operations import JSON_VALUES
from tests.api.test_tools_hermes import TOOLS
from tests.conftest import TINY_CONTEXT, LiveServer, MakeClient, build_tiny_model
from tests.helpers import fuzz
from tests.training import hermes_model

JSON = {"Content-Type": "application/json"}
PROMPT = "The quick brown fox jumps over the lazy dog."
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


def test_a_prompts_count_is_what_completions_report(tiny_server: LiveServer) -> None:
    tokens = tiny_server.post("/tokenize", {"model": "tiny", "prompt": PROMPT})
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == TINY_CONTEXT
    done = tiny_server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
    assert done["usage"]["prompt_tokens"] == tokens["count"]
    assert tiny_server.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": True}) == tokens


def test_a_conversations_count_is_what_chat_completions_report(tiny_server: LiveServer) -> None:
    tokens = tiny_server.post("/tokenize", {"messages": MESSAGES})
    done = tiny_server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert done["usage"]["prompt_tokens"] == tokens["count"]
    assert tiny_server.post("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True}) == tokens
    # the chat template around the text: more tokens than the same words as a raw prompt
    raw = tiny_server.post("/tokenize", {"prompt": "Be brief.Tell me a story."})
    assert tokens["count"] > raw["count"]


def test_a_prompt_longer_than_the_context_is_still_counted(tiny_server: LiveServer) -> None:
    tokens = tiny_server.post("/tokenize", {"prompt": "word " * 400})
    assert tokens["count"] > tokens["max_model_len"]  # a client asks exactly to find this out before generating


def recording(real: Callable[[ChatJob], Awaitable[Any]], jobs: list[ChatJob]) -> Callable[[ChatJob], Awaitable[Any]]:
    """A backend method that notes the jobs it is given."""

    async def recorded(job: ChatJob) -> Any:
        jobs.append(job)
        return await real(job)

    return recorded


async def test_a_prompt_is_counted_from_the_job_completions_generate_from(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    backend = client.app[BACKEND]
    jobs: list[ChatJob] = []
    for name in ("open", "tokenize"):
        monkeypatch.setattr(backend, name, recording(getattr(backend, name), jobs))
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.5, "seed": 3, "n": 2}
    assert (await client.post("/v1/completions", json=body)).status == 200
    assert (await client.post("/tokenize", json={"prompt": PROMPT})).status == 200
    generated, counted = jobs
    # the one builder of a raw prompt's job: the same job, but for what only generating needs
    assert counted == raw_job(PROMPT, client.app[CONFIG].limits)
    assert counted == dataclasses.replace(generated, sampling=Sampling(), n=1)


async def test_a_huge_answer_is_written_off_the_event_loop(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # written on the event loop, a huge prompt's ids would keep every other request waiting meanwhile
    client = await make_client()
    loop_thread, writers = threading.current_thread(), []

    def written(obj: Any) -> str:
        writers.append(threading.current_thread())
        return dumps(obj)

    monkeypatch.setattr(api.http, "dumps", written)  # what api.http.json_off_loop encodes with
    resp = await client.post("/tokenize", json={"prompt": PROMPT * 50})
    assert resp.status == 200 and resp.content_type == "application/json"
    answer = await resp.json()
    assert answer["count"] == len(answer["tokens"]) > 50
    assert writers and loop_thread not in writers


@pytest.fixture(scope="module")
def tools_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with a template that renders tools (Hermes' style): its prompts grow with the tools offered."""
    return hermes_model(build_tiny_model(tmp_path_factory.mktemp("tools"), context=1024))


async def test_tools_count_as_the_chat_door_offers_them(make_client: MakeClient, tools_lm: LoadedModel) -> None:
    client = await make_client(tools_lm)

    async def count(body: dict[str, Any]) -> int:
        tokens = await (await client.post("/tokenize", json=body)).json()
        chat = await (await client.post("/v1/chat/completions", json={**body, "max_tokens": 1})).json()
        assert chat["usage"]["prompt_tokens"] == tokens["count"], (body, tokens)
        return int(tokens["count"])

    alone = await count({"messages": MESSAGES})
    both = await count({"messages": MESSAGES, "tools": TOOLS})
    choice = {"type": "function", "function": {"name": TOOLS[0]["function"]["name"]}}
    named = await count({"messages": MESSAGES, "tools": TOOLS, "tool_choice": choice})
    assert alone < named < both  # a named function is the only one offered
    assert await count({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}) == alone


@pytest.mark.parametrize("text", ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x  # 42"])
def test_detokenize_gives_the_text_back(tiny_server: LiveServer, tiny_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(tiny_dir).all_special_ids)
    ids = [i for i in tiny_server.post("/tokenize", {"prompt": text})["tokens"] if i not in special]
    assert tiny_server.post("/detokenize", {"model": "tiny", "tokens": ids}) == {"prompt": text}
    assert tiny_server.post("/detokenize", {"tokens": []}) == {"prompt": ""}


MESSAGE = [{"role": "user", "content": "hi"}]
BAD = [
    ("/tokenize", {}, "prompt", "'prompt' or 'messages' is required"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGE}, "messages", "cannot be sent with 'prompt'"),
    ("/tokenize", {"prompt": 1}, "prompt", "must be a string"),
    ("/tokenize", {"messages": []}, "messages", "non-empty"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "must be"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": False}, "add_special_tokens", "as it prompts the model"),
    ("/tokenize", {"messages": MESSAGE, "add_generation_prompt": False}, "add_generation_prompt", "as it prompts"),
    ("/tokenize", {"messages": MESSAGE, "add_special_tokens": True}, "add_special_tokens", "only for a raw 'prompt'"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt", "only for 'messages'"),
    ("/tokenize", {"prompt": "a", "tools": TOOLS}, "tools", "only for 'messages'"),
    ("/tokenize", {"messages": MESSAGE, "tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
    ("/tokenize", {"prompt": "a", "return_token_strs": True}, "return_token_strs", "refused rather than ignored"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model", "does not exist"),
    ("/detokenize", {}, "tokens", "required"),
    ("/detokenize", {"tokens": [1, 99_999]}, "tokens", "99999"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "token ids"),
    ("/detokenize", {"tokens": ["a"]}, "tokens", "token ids"),
    ("/detokenize", {"tokens": 5}, "tokens", "token ids"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, "model", "does not exist"),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "says"), BAD, ids=[f"{path[1:]}-{p}-{i}" for i, (path, _, p, _) in enumerate(BAD)]
)
async def test_bad_bodies_are_refused_naming_the_field(
    make_client: MakeClient, path: str, body: dict[str, Any], param: str, says: str
) -> None:
    client = await make_client()
    resp = await client.post(path, json=body)
    error = (await resp.json())["error"]
    assert resp.status == (404 if param == "model" else 400), error
    assert error["param"] == param and says in error["message"], error


FIELDS = ["prompt", "messages", "model", "add_special_tokens", "add_generation_prompt", "tools", "tool_choice"]
FIELDS += ["tokens"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5) | JSON_VALUES
TOKEN_BODIES = st.fixed_dictionaries({"tokens": st.lists(st.integers(-(2**70), 2**70) | JSON_VALUES, max_size=8)})


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_fuzzed_bodies_never_cause_a_5xx(make_client: MakeClient, path: str) -> None:
    def refused(status: int, answer: Any) -> None:
        assert "error" in answer, answer

    await fuzz(await make_client(), path, BODIES | TOKEN_BODIES, refused, examples=100)


# ---- through an --upstream server in front of the live one ----------------------------------------------------------


def test_the_same_tokens_directly_and_through_an_upstream_server(
    tiny_server: LiveServer, tiny_upstream: LiveServer
) -> None:
    for body in ({"prompt": PROMPT}, {"messages": MESSAGES}):
        direct = tiny_server.post("/tokenize", body)
        assert tiny_upstream.post("/tokenize", {**body, "model": "up"}) == direct
        assert tiny_upstream.post("/detokenize", {"tokens": direct["tokens"]}) == tiny_server.post(
            "/detokenize", {"tokens": direct["tokens"]}
        )
    status, refused = tiny_upstream.post_status("/detokenize", {"tokens": [99_999]})
    assert status == 400 and "'tokens'" in refused["error"]["message"], refused
    assert refused["error"]["param"] == "tokens"  # the upstream's 400 blames the field, and so does ours


def test_both_routes_are_published() -> None:
    from api.openapi import build_spec

    spec = build_spec(("tiny",))
    for path, body, answer in [
        ("/tokenize", "TokenizeRequest", "TokenizeResponse"),
        ("/detokenize", "DetokenizeRequest", "DetokenizeResponse"),
    ]:
        post = spec["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + answer)
        assert {body, answer} <= spec["components"]["schemas"].keys()
    assert spec["components"]["schemas"]["DetokenizeRequest"]["required"] == ["tokens"]
