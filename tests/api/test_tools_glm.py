"""OpenAI tool calling with ChatGLM3-6B and GLM-4-9B-chat, end to end: tiny checkpoints in the original layout,
trained here to answer a few tool conversations in their family's own format (spec glm-tools.md, sections 2 and 3),
served by the real server and read with raw HTTP and the official `openai` SDK; and the prompts checked against the
spec's test vectors (section 6)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch

from api.schema import parse_completion
from backends.base import ChatJob, SamplingDefaults
from backends.local import plan
from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig
from models.tools import chatglm3, glm4
from tests.conftest import ROOT, MakeClient
from tests.glm2 import write_checkpoint
from tests.helpers import parse_frames
from tests.training import learned, teach

GLM4, CHATGLM3 = "glm-4-9b-chat", "chatglm3-6b"
KINDS = [CHATGLM3, GLM4]
STEPS = 100  # optimizer steps: each family learns its seven or eight answers well within them
MAX_TOKENS = 120  # room for the longest trained answer (two ChatGLM3 calls, about 80 tokens)


def function(name: str, key: str, description: str, **value: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": {key: {"type": "string", **value}}, "required": [key]}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


WEATHER = function("get_weather", "city", "Weather of a city")
TIME = function("get_time", "zone", "Time in a zone")
TOOLS = [WEATHER, TIME]


def strict(tool: dict[str, Any]) -> dict[str, Any]:
    """The tool with `strict: true`: a forced call's arguments are held to its schema (no other properties)."""
    fn = tool["function"]
    parameters = {**fn["parameters"], "additionalProperties": False}
    return {"type": "function", "function": {**fn, "parameters": parameters, "strict": True}}


# The tools of the forced calls: strict, each value one of a few, so that a call forced where the model would chat
# ends, however little the tiny model knows what to write in it (its arguments are the schema's to choose)
PICKY = [
    strict(function("get_weather", "city", "Weather of a city", enum=["Paris", "Beijing"])),
    strict(function("get_time", "zone", "Time in a zone", enum=["UTC", "Europe/Paris"])),
]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def called(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str, result: str) -> list[Any]:
    """The conversation after the assistant's call and the tool's result, as an OpenAI client sends it back."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]


ASK = user("What's the weather in Paris?")
RESULT = json.dumps({"temperature": 22})
ANSWERED = called(ASK, "call_1", "get_weather", json.dumps({"city": "Paris"}), RESULT)
BOTH = user("Weather and time in Paris?")
CHECK = user("Check it first")
BROKEN = user("Broken please")
HOSTILE = user("Hostile")
CHAT = user("Just chat")
PARIS = ("get_weather", {"city": "Paris"})
ZONE = ("get_time", {"zone": "Europe/Paris"})
# the calls each family writes (ChatGLM3's with JSON's double quotes, as its PROMPT.md has them)
OWN_GLM4 = 'get_weather\n{"city": "Paris"}'
OWN_CHATGLM3 = '```python\ntool_call(city="Paris")\n```'
# a call's body that is not a call: GLM-4's JSON cut short; ChatGLM3's positional argument (spec 6.2 G-P4, 6.4 C-P5)
MALFORMED = {GLM4: '{"city": ', CHATGLM3: "```python\ntool_call('Paris')\n```"}
# ChatGLM3's official parser eval()s the call: this one would run a command
EVIL = "```python\ntool_call(city=__import__('os').system('touch HOSTILE_FILE'))\n```"
# what a client gets of it: the model's text, stripped (ChatGLM3's body keeps SentencePiece's leading space)
MALFORMED_TEXT = {GLM4: 'get_weather\n{"city":', CHATGLM3: "get_weather\n ```python\ntool_call('Paris')\n```"}
MARKUP = ("get_weather\n", "get_time\n", "```", "tool_call(", '{"city"', '{"zone"')


def body(messages: Sequence[Any], tools: Sequence[Any] = TOOLS, **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), "tools": list(tools), "temperature": 0, "max_tokens": MAX_TOKENS, **extra}


# ---- the trained models ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    kind: str
    lm: LoadedModel

    @property
    def glm4(self) -> bool:
        return self.kind == GLM4

    def token(self, name: str) -> int:
        return int(self.lm.tokenizer.special[name])

    def prompt(self, messages: Sequence[Any], tools: Sequence[Any] = TOOLS) -> list[int]:
        """The prompt the server builds for this body: the request parsed as the server parses it."""
        req = parse_completion(body(messages, tools))
        return list(self.lm.chat.encode(req.messages, req.tools))

    def segment(self, metadata: str, content: str) -> list[int]:
        """A segment of an answer as the model writes it: the metadata line, then the content (ChatGLM3: two
        SentencePiece encodings, as its official prompt builder has them)."""
        tok = self.lm.tokenizer
        if self.glm4:
            return list(tok.encode(f"{metadata}\n{content}"))
        return [*tok.encode(f"{metadata}\n"), *tok.encode(content)]

    def call(self, name: str, arguments: dict[str, str]) -> list[int]:
        """A call in the family's format: GLM-4 `name\\n{json}`, ChatGLM3 `name\\n` and a fenced tool_call(...)."""
        if self.glm4:
            return self.segment(name, json.dumps(arguments))
        keywords = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        return self.segment(name, f"```python\ntool_call({keywords})\n```")

    def examples(self) -> list[tuple[list[int], list[int]]]:
        assistant, observation, end = (self.token(f"<|{r}|>") for r in ("assistant", "observation", "user"))
        out = [
            (self.prompt(ASK), [*self.call(*PARIS), observation]),
            (self.prompt(ANSWERED), [*self.segment("", "It is 22 degrees."), end]),
            (self.prompt(BOTH), [*self.call(*PARIS), assistant, *self.call(*ZONE), observation]),
            (self.prompt(CHECK), [*self.segment("", "Let me check."), assistant, *self.call(*PARIS), observation]),
            (self.prompt(BROKEN), [*self.segment("get_weather", MALFORMED[self.kind]), observation]),
            (self.prompt(CHAT, PICKY), [*self.segment("", "Hello there."), end]),
            (self.prompt(CHAT, PICKY[1:]), [*self.segment("", "Hello there."), end]),
        ]
        if not self.glm4:
            out.append((self.prompt(HOSTILE), [*self.segment("get_weather", EVIL), observation]))
        return out


def checkpoint(folder: Path, kind: str) -> LoadedModel:
    """A tiny checkpoint whose tokenizer keeps newlines and knows the tool prompts' words (so the prompts stay
    short), with room for them in its context."""
    texts = [
        glm4.system_turn(parse_completion(body(ASK)).tools),
        chatglm3.system_turn(parse_completion(body(ASK)).tools),
    ]
    texts += [EVIL, "tool_call(city='Paris', zone='Europe/Paris')", "It is 22 degrees. Hello there. Let me check."]
    texts += [m["content"] for m in (*ASK, *BOTH, *CHECK, *BROKEN, *HOSTILE, *CHAT)]
    folder = write_checkpoint(folder, kind, keep_newlines=True, extra_corpus=texts * 3, vocab_size=600, merges=344)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "seq_length": 2048}))
    return load_model(ModelConfig(path=folder, device="cpu", dtype="float32", quantize=16))


def train(folder: Path, kind: str) -> Family:
    family = Family(kind, checkpoint(folder, kind))
    examples = family.examples()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, the more so on a busy machine
    try:
        teach(family.lm.model, examples, STEPS)
        ok = learned(family.lm.model, examples, set(family.lm.eos_token_ids))
    finally:
        torch.set_num_threads(threads)
    assert ok, f"the tiny {kind} did not learn its tool conversations in {STEPS} steps"
    return family


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Family]:
    """A family's trained model, made on first use (a failure is remembered, not retried by every test)."""
    made: dict[str, Family | str] = {}

    def get(kind: str) -> Family:
        if kind not in made:
            try:
                made[kind] = train(tmp_path_factory.mktemp(kind), kind)
            except AssertionError as exc:
                made[kind] = str(exc)
        got = made[kind]
        if isinstance(got, str):
            pytest.fail(got)
        return got

    return get


@pytest.fixture(params=KINDS)
def family(request: pytest.FixtureRequest, trained: Callable[[str], Family]) -> Family:
    return trained(request.param)


@asynccontextmanager
async def serving(make_client: MakeClient, family: Family) -> AsyncIterator[tuple[Any, openai.AsyncOpenAI]]:
    """The server over the family's model: its raw test client and the official SDK pointed at it."""
    client = await make_client(family.lm, threads=1)
    url = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as sdk:
        yield client, sdk


async def create(sdk: openai.AsyncOpenAI, family: Family, messages: Sequence[Any], **extra: Any) -> Any:
    """A greedy completion through the SDK (the tools and settings of `body`, overridable)."""
    return await sdk.chat.completions.create(**{**body(messages), "model": family.lm.name, **extra})


async def streamed(sdk: openai.AsyncOpenAI, family: Family, messages: Sequence[Any], **extra: Any) -> list[Any]:
    stream = await create(sdk, family, messages, stream=True, **extra)
    return [chunk async for chunk in stream]


def streamed_calls(chunks: list[Any]) -> tuple[dict[int, dict[str, Any]], list[Any]]:
    """The calls a stream carried, by index (the first delta's id, type and name; arguments concatenated), and
    every tool-call delta in order."""
    calls: dict[int, dict[str, Any]] = {}
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    for tc in deltas:
        if tc.index not in calls:
            assert tc.id is not None and tc.type == "function" and tc.function.name, "a call's first delta names it"
            calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
        else:
            assert tc.id is None and tc.function.name is None, "only a call's first delta carries its id and name"
        calls[tc.index]["arguments"] += tc.function.arguments or ""
    return calls, deltas


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def content(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_calls(tool_calls: Any, expected: Sequence[tuple[str, dict[str, str]]]) -> None:
    """The SDK's `message.tool_calls` are the expected calls, in order, each with an OpenAI call id."""
    assert tool_calls is not None and len(tool_calls) == len(expected)
    for call, (name, arguments) in zip(tool_calls, expected, strict=True):
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == name
        assert json.loads(call.function.arguments) == arguments
    assert len({call.id for call in tool_calls}) == len(tool_calls), "every call has an id of its own"


# ---- calls come back as tool_calls -------------------------------------------------------------------------------

# the answers with calls: (conversation, its calls, the text before them)
CONVERSATIONS = {
    "one call": (ASK, [PARIS], None),
    "two calls": (BOTH, [PARIS, ZONE], None),
    "text then a call": (CHECK, [PARIS], "Let me check."),
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
async def test_calls_come_back_as_tool_calls_over_http(
    family: Family, make_client: MakeClient, conversation: str
) -> None:
    messages, expected, text = CONVERSATIONS[conversation]
    async with serving(make_client, family) as (client, _):
        response = await client.post("/v1/chat/completions", json=body(messages))
        assert response.status == 200
        answer = await response.json()
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == text
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == [name for name, _ in expected]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [arguments for _, arguments in expected]
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
        assert isinstance(call["function"]["arguments"], str)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
async def test_the_sdk_reads_the_calls_whole_and_streamed(
    family: Family, make_client: MakeClient, conversation: str
) -> None:
    messages, expected, text = CONVERSATIONS[conversation]
    async with serving(make_client, family) as (_, sdk):
        done = await create(sdk, family, messages)
        chunks = await streamed(sdk, family, messages)
    (choice,) = done.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == text
    assert_calls(choice.message.tool_calls, expected)

    calls, deltas = streamed_calls(chunks)
    assert sorted(calls) == list(range(len(expected)))
    for i, (name, arguments) in enumerate(expected):
        assert calls[i]["name"] == name and calls[i]["id"].startswith("call_")
        # the fragments join to the JSON text the whole answer carries
        assert calls[i]["arguments"] == choice.message.tool_calls[i].function.arguments
        assert json.loads(calls[i]["arguments"]) == arguments
    assert [d.index for d in deltas] == sorted(d.index for d in deltas), "one call after the other"
    assert content(chunks) == (text or "")
    assert finish_reasons(chunks) == ["tool_calls"]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
async def test_no_call_markup_reaches_the_streamed_content(
    family: Family, make_client: MakeClient, conversation: str
) -> None:
    messages, expected, text = CONVERSATIONS[conversation]
    async with serving(make_client, family) as (client, _):
        response = await client.post("/v1/chat/completions", json=body(messages, stream=True))
        assert response.status == 200
        frames = parse_frames(await response.read())
    assert frames[-1] == (None, "[DONE]")
    deltas = [json.loads(data)["choices"][0]["delta"] for _, data in frames[:-1]]
    texts = [d["content"] for d in deltas if d.get("content") is not None]
    leaked = [t for t in texts if any(mark in t for mark in MARKUP)]
    assert leaked == [], f"call markup in the content: {leaked}"
    assert "".join(texts) == (text or "")
    assert {c["index"] for d in deltas for c in d.get("tool_calls", [])} == set(range(len(expected)))


# ---- the agent loop ------------------------------------------------------------------------------------------------


async def test_a_tool_result_gets_a_text_answer(family: Family, make_client: MakeClient) -> None:
    async with serving(make_client, family) as (_, sdk):
        first = await create(sdk, family, ASK)
        (call,) = first.choices[0].message.tool_calls
        # sent back the way an OpenAI client does: the assistant's calls (content null), then the tool's result
        messages = called(ASK, call.id, call.function.name, call.function.arguments, RESULT)
        done = await create(sdk, family, messages)
        chunks = await streamed(sdk, family, messages)
    (choice,) = done.choices
    assert choice.finish_reason == "stop"
    assert choice.message.content == "It is 22 degrees." and not choice.message.tool_calls
    assert content(chunks) == "It is 22 degrees."
    assert streamed_calls(chunks)[1] == [] and finish_reasons(chunks) == ["stop"]


# ---- choices ------------------------------------------------------------------------------------------------------


async def test_parallel_tool_calls_false_keeps_the_first_call(family: Family, make_client: MakeClient) -> None:
    async with serving(make_client, family) as (_, sdk):
        done = await create(sdk, family, BOTH, parallel_tool_calls=False)
        chunks = await streamed(sdk, family, BOTH, parallel_tool_calls=False)
    (choice,) = done.choices
    assert choice.finish_reason == "tool_calls"
    assert_calls(choice.message.tool_calls, [PARIS])
    calls, deltas = streamed_calls(chunks)
    assert list(calls) == [0] and {d.index for d in deltas} == {0}
    assert json.loads(calls[0]["arguments"]) == PARIS[1]
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_tool_choice_none_keeps_the_tools_out_of_the_prompt(family: Family, make_client: MakeClient) -> None:
    async with serving(make_client, family) as (_, sdk):
        auto = await create(sdk, family, ASK, max_tokens=30)
        done = await create(sdk, family, ASK, tool_choice="none", max_tokens=30)
        chunks = await streamed(sdk, family, ASK, tool_choice="none", max_tokens=30)
    assert auto.usage.prompt_tokens == len(family.prompt(ASK))
    assert done.usage.prompt_tokens == len(family.prompt(ASK, tools=())) < auto.usage.prompt_tokens
    (choice,) = done.choices
    assert not choice.message.tool_calls and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert streamed_calls(chunks)[1] == [] and finish_reasons(chunks)[0] in ("stop", "length")
    assert content(chunks) == choice.message.content


async def answered_in_text(family: Family, make_client: MakeClient, ask: Any) -> str:
    """The answer to `ask`, which must be text (finish "stop", no call), the same streamed and not."""
    async with serving(make_client, family) as (client, sdk):
        response = await client.post("/v1/chat/completions", json=body(ask))
        assert response.status == 200
        raw = await response.json()
        chunks = await streamed(sdk, family, ask)
    (choice,) = raw["choices"]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    text = str(choice["message"]["content"])
    assert content(chunks) == text and streamed_calls(chunks)[1] == [] and finish_reasons(chunks) == ["stop"]
    return text


async def test_a_malformed_call_is_text(family: Family, make_client: MakeClient) -> None:
    assert await answered_in_text(family, make_client, BROKEN) == MALFORMED_TEXT[family.kind]


def exists(*paths: Path) -> bool:
    return any(path.exists() for path in paths)


async def test_a_hostile_chatglm3_call_is_text_and_never_runs(
    trained: Callable[[str], Family], make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = trained(CHATGLM3)
    monkeypatch.chdir(tmp_path)  # where `touch HOSTILE_FILE` would leave its file
    text = await answered_in_text(family, make_client, HOSTILE)
    assert "__import__('os').system('touch HOSTILE_FILE')" in text
    assert not exists(tmp_path / "HOSTILE_FILE", ROOT / "HOSTILE_FILE")


async def test_tool_choice_required_makes_a_call_where_the_model_would_chat(
    family: Family, make_client: MakeClient
) -> None:
    async with serving(make_client, family) as (_, sdk):
        free = await create(sdk, family, CHAT, tools=PICKY)
        done = await create(sdk, family, CHAT, tools=PICKY, tool_choice="required")
    assert free.choices[0].message.content == "Hello there." and not free.choices[0].message.tool_calls
    (answer,) = done.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    (call,) = answer.message.tool_calls
    assert call.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in PICKY}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


async def test_a_named_tool_choice_makes_a_call_of_that_function(family: Family, make_client: MakeClient) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    async with serving(make_client, family) as (_, sdk):
        free = await create(sdk, family, CHAT, tools=PICKY[1:])
        done = await create(sdk, family, CHAT, tools=PICKY, tool_choice=named)
    assert free.choices[0].message.content == "Hello there." and not free.choices[0].message.tool_calls
    # only the named tool is in the prompt: the very prompt that, left free, chats
    assert done.usage.prompt_tokens == free.usage.prompt_tokens == len(family.prompt(CHAT, PICKY[1:]))
    (answer,) = done.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PICKY[1]["function"]["parameters"])


# The grammar a forced call is held to must let the model write a call the way it was trained to: ChatGLM3's
# keywords without `strict` must not swallow the closing parenthesis; GLM-4's arguments are spaced as json.dumps
# spaces them (`{"city": "Paris"}`), as GLM-4 writes them and as its history renders calls.
@pytest.mark.parametrize(
    ("kind", "tools", "own_call"),
    [
        pytest.param(CHATGLM3, TOOLS, ("get_weather\n", OWN_CHATGLM3), id="chatglm3-loose"),
        pytest.param(CHATGLM3, PICKY, ("get_weather\n", OWN_CHATGLM3), id="chatglm3-strict"),
        pytest.param(GLM4, TOOLS, OWN_GLM4, id="glm4-loose"),
        pytest.param(GLM4, PICKY, OWN_GLM4, id="glm4-strict"),
    ],
)
def test_a_forced_call_may_be_written_in_the_family_s_own_format(
    kind: str, tools: list[Any], own_call: str | tuple[str, str], untrained: dict[str, LoadedModel]
) -> None:
    """tool_choice "required" on a prompt the model answers with a call anyway: the grammar the server holds the
    answer to takes the call token by token, as the model writes it, and is complete after it."""
    lm = untrained[kind]
    req = parse_completion(body(ASK, tools, tool_choice="required"))
    job = ChatJob(req.messages, req.sampling, SamplingDefaults(1.0, 1.0), tools=req.tools, tool_choice=req.tool_choice)
    _, params = plan(lm, job)  # as the server plans the request: the prompt, and the grammar of the call
    assert params.constraint is not None
    matcher = params.constraint.matcher()
    tok = lm.tokenizer
    ids = tok.encode(own_call) if isinstance(own_call, str) else [*tok.encode(own_call[0]), *tok.encode(own_call[1])]
    for i, token in enumerate(ids):
        matcher.consume(token)
        assert matcher.error is None, f"refused after {tok.decode(ids[:i])!r}: {tok.decode([token])!r}"
    assert matcher.done, "the call is whole: the answer ends there"


# ---- prompts, byte for byte against the spec's vectors (glm-tools.md, section 6) ----------------------------------


def spec_string(escaped: str) -> str:
    """A vector as the spec prints it, JSON-escaped."""
    return str(json.loads(f'"{escaped}"'))


G_T1 = spec_string(
    r"[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    r"你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n{\n    \"name\": \"get"
    r"_weather\",\n    \"description\": \"Get the current weather for a city\",\n    \"parameters\": {\n        \""
    r"type\": \"object\",\n        \"properties\": {\n            \"city\": {\n                \"type\": \"string\""
    r",\n                \"description\": \"City name, e.g. 北京\"\n            }\n        },\n        \"required\""
    r": [\n            \"city\"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n"
    r"北京今天天气怎么样？<|assistant|>"
)
G_T2 = spec_string(
    r"[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    r"你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n{\n    \"name\": \"get"
    r"_weather\",\n    \"description\": \"Get the current weather for a city\",\n    \"parameters\": {\n        \""
    r"type\": \"object\",\n        \"properties\": {\n            \"city\": {\n                \"type\": \"string\""
    r",\n                \"description\": \"City name, e.g. 北京\"\n            }\n        },\n        \"required\""
    r": [\n            \"city\"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n"
    r"北京今天天气怎么样？<|assistant|>get_weather\n{\"city\": \"北京\"}<|observation|>\n{\"city\": \"北京\", \"te"
    r"mperature\": 22, \"condition\": \"晴\"}<|assistant|>"
)
C_T1_SYSTEM = (
    "Answer the following questions as best as you can. You have access to the following tools:\n"
    "[\n"
    "    {\n"
    '        "name": "get_weather",\n'
    '        "description": "Get the current weather for a city",\n'
    '        "parameters": {\n'
    '            "type": "object",\n'
    '            "properties": {\n'
    '                "city": {\n'
    '                    "type": "string",\n'
    '                    "description": "City name"\n'
    "                }\n"
    "            },\n"
    '            "required": [\n'
    '                "city"\n'
    "            ]\n"
    "        }\n"
    "    }\n"
    "]"
)
C_T2 = spec_string(
    r"[gMASK]sop<|system|>\n Answer the following questions as best as you can. You have access to the following t"
    r"ools:\n[\n    {\n        \"name\": \"get_weather\",\n        \"description\": \"Get the current weather for "
    r"a city\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n    "
    r"            \"city\": {\n                    \"type\": \"string\",\n                    \"description\": \"C"
    r"ity name\"\n                }\n            },\n            \"required\": [\n                \"city\"\n      "
    r"      ]\n        }\n    }\n]<|user|>\n What's the weather in Beijing today?<|assistant|>get_weather\n ```pyt"
    r"hon\ntool_call(city='Beijing')\n```<|observation|>\n {\"temperature\": 22, \"condition\": \"sunny\"}<|assist"
    r"ant|>"
)


def spec_tool(city: str) -> dict[str, Any]:
    """The spec's common tool, in the OpenAI request form (its city described as `city`)."""
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "description": city}},
        "required": ["city"],
    }
    fn = {"name": "get_weather", "description": "Get the current weather for a city", "parameters": parameters}
    return {"type": "function", "function": fn}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """The families' tiny checkpoints as written (only their tokenizers and chat formats matter here)."""
    return {kind: checkpoint(tmp_path_factory.mktemp(f"{kind}-plain"), kind) for kind in KINDS}


def rendered(lm: LoadedModel, ids: Sequence[int]) -> str:
    """Prompt ids as text: special tokens by name, each run of other ids decoded together."""
    names = {i: name for name, i in lm.tokenizer.special.items()}
    out: list[str] = []
    run: list[int] = []
    for i in [*ids, None]:
        if i is None or i in names:
            out.append(lm.tokenizer.decode(run))
            run = []
            if i is not None:
                out.append(names[i])
        else:
            run.append(i)
    return "".join(out)


def spec_prompt(lm: LoadedModel, messages: list[Any], city: str) -> list[int]:
    req = parse_completion({"messages": messages, "tools": [spec_tool(city)]})
    return list(lm.chat.encode(req.messages, req.tools))


def test_glm4_prompts_are_the_spec_vectors_byte_for_byte(untrained: dict[str, LoadedModel]) -> None:
    lm = untrained[GLM4]
    ask = user("北京今天天气怎么样？")
    arguments = json.dumps({"city": "北京"}, ensure_ascii=False)
    result = json.dumps({"city": "北京", "temperature": 22, "condition": "晴"}, ensure_ascii=False)
    assert rendered(lm, spec_prompt(lm, ask, "City name, e.g. 北京")) == G_T1
    assert (
        rendered(lm, spec_prompt(lm, called(ask, "call_x", "get_weather", arguments, result), "City name, e.g. 北京"))
        == G_T2
    )


def test_chatglm3_prompts_have_the_spec_vectors_token_structure(untrained: dict[str, LoadedModel]) -> None:
    lm = untrained[CHATGLM3]
    tok = lm.tokenizer
    s = tok.special
    assert tok.decode(tok.encode("a\nb")) == "a\nb", "the tiny tokenizer must keep newlines"
    query = "What's the weather in Beijing today?"
    newline = tok.encode("\n")
    c_t1 = [
        s["[gMASK]"],
        s["sop"],
        s["<|system|>"],
        *newline,
        *tok.encode(C_T1_SYSTEM),
        s["<|user|>"],
        *newline,
        *tok.encode(query),
        s["<|assistant|>"],
    ]
    assert spec_prompt(lm, user(query), "City name") == c_t1
    result = json.dumps({"temperature": 22, "condition": "sunny"})
    messages = called(user(query), "call_x", "get_weather", json.dumps({"city": "Beijing"}), result)
    c_t2 = [
        *c_t1,
        *tok.encode("get_weather\n"),
        *tok.encode("```python\ntool_call(city='Beijing')\n```"),
        s["<|observation|>"],
        *newline,
        *tok.encode(result),
        s["<|assistant|>"],
    ]
    ids = spec_prompt(lm, messages, "City name")
    assert ids == c_t2
    # and the spec's text view of it (SentencePiece's leading space after each metadata line included)
    assert rendered(lm, ids) == C_T2
