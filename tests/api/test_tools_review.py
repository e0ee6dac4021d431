"""Tool calling, the second review's findings, each pinned by a test that fails without its mend: an SDK answer
message sent back whole, bad tool schemas and histories that were 500s, arguments that are not JSON, Mistral's call
ids, GLM-4's format on a Hugging Face tokenizer, `--tool-call-parser` on a template that ignores tools, ChatGLM3's
system turn, `parallel_tool_calls` without tools, legacy `functions` streaming one call and a call cut by the
length limit."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.schema import parse_completion
from backends.base import InvalidField
from generation.prepare import load_model
from models.chat_format import Message, TemplateFormat
from models.chatglm.chatglm6b_chat import ChatGLM6BFormat
from models.chatglm.glm_chat import RolesFormat, RoundsFormat
from models.loader import LoadedModel, ModelConfig, ModelLoadError, tool_format
from models.tools import chatglm3, glm4
from models.tools.base import CallStream, Tool, ToolCall, ToolFormat
from models.tools.chatglm3 import ChatGLM3Format
from models.tools.glm4 import Glm4Format
from models.tools.hermes import HermesFormat
from models.tools.llama3 import Llama3Format
from models.tools.mistral import MistralFormat
from tests.api.test_tools_hermes import T_CALL, TOOLS, TWO_BODY, W_CALL
from tests.backends.test_upstream import CLOCK, VLLM_CALLS, FakeUpstream, fake_proxy
from tests.backends.test_upstream import WEATHER as UPSTREAM_WEATHER
from tests.conftest import MakeClient, build_tiny_model
from tests.glm2 import write_checkpoint
from tests.helpers import chunk_deltas, completion_chunks
from tests.training import hermes_model, taught

Client = TestClient[web.Request, web.Application]
URL = "/v1/chat/completions"
OPENAI_ID = re.compile(r"call_[A-Za-z0-9]{24}")
TWO_ANSWER = f"{W_CALL}\n{T_CALL}"


def tool(name: str, parameters: dict[str, Any] | None = None, strict: bool = False) -> Tool:
    """A tool as the parser makes it."""
    fn: dict[str, Any] = {"name": name, **({"parameters": parameters} if parameters is not None else {})}
    if strict:
        fn["strict"] = True
    (made,) = parse_completion({"messages": [{"role": "user", "content": "hi"}], "tools": [wire(fn)]}).tools
    return made


def wire(fn: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": fn}


def run(stream: CallStream, text: str) -> tuple[str, list[tuple[str | None, str | None, str]]]:
    """The text a client sees and the call deltas (id, name, arguments) of an answer pushed whole, then ended."""
    pieces = stream.push(text)
    pieces.add(stream.flush())
    return pieces.text, [(c.id, c.name, c.arguments) for c in pieces.calls]


def joined_calls(deltas: Sequence[tuple[str | None, str | None, str]]) -> list[tuple[str, str, Any]]:
    """(id, name, arguments as values) of each call the deltas make."""
    calls: list[tuple[str, str, str]] = []
    for call_id, name, arguments in deltas:
        if call_id is not None:
            assert name is not None
            calls.append((call_id, name, arguments))
        else:
            call_id, name, before = calls[-1]
            calls[-1] = (call_id, name, before + arguments)
    return [(i, n, json.loads(a)) for i, n, a in calls]


# ---- the models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm3_lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny ChatGLM3-6B in its original layout, untrained: requests refused before generation need no more."""
    folder = write_checkpoint(tmp_path_factory.mktemp("chatglm3"), "chatglm3-6b", keep_newlines=True)
    return load_model(ModelConfig(path=folder, device="cpu", dtype="float32", quantize=16))


@pytest.fixture(scope="module")
def hermes_two(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with test_tools_hermes' Hermes template, taught one answer only (fast): the two calls for its
    TWO_BODY prompt, as the server builds that prompt."""
    lm = hermes_model(build_tiny_model(tmp_path_factory.mktemp("hermes-two"), context=1024))
    (eos,) = lm.eos_token_ids
    req = parse_completion({**TWO_BODY, "model": "x"})
    return taught(lm, [(lm.chat.encode(req.messages, req.tools), [*lm.tokenizer.encode(TWO_ANSWER), eos])])


async def post(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post(URL, json=body)
    return resp.status, dict(await resp.json())


async def refused(client: Client, body: dict[str, Any], param: str) -> str:
    """The request is a 400 naming `param`; its message."""
    status, answer = await post(client, {"max_tokens": 4, **body})
    error = answer.get("error", answer)
    assert status == 400 and error["param"] == param and f"'{param}'" in error["message"], (status, answer)
    return str(error["message"])


async def stream_chunks(client: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await client.post(URL, json={**body, "stream": True})
    assert resp.status == 200, await resp.text()
    return completion_chunks(await resp.read())


deltas = chunk_deltas


def finishes(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


# ---- 1. an SDK answer message sent back whole ---------------------------------------------------------------------

SDK_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASK = {"role": "user", "content": "Weather in Paris?"}


def sdk_message() -> dict[str, Any]:
    """What `message.model_dump()` gives for an openai SDK answer with a call: every field, unset ones null."""
    from openai.types.chat import ChatCompletionMessage

    dumped = ChatCompletionMessage.model_validate({"role": "assistant", "tool_calls": [SDK_CALL]}).model_dump()
    assert {k: dumped[k] for k in ("function_call", "refusal", "annotations", "audio", "content")} == dict.fromkeys(
        ("function_call", "refusal", "annotations", "audio", "content")
    )
    return dict(dumped)


def test_an_sdk_message_dumped_whole_is_read_as_its_calls() -> None:
    result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    req = parse_completion({"messages": [ASK, sdk_message(), result], "tools": TOOLS})
    assistant = req.messages[1]
    assert assistant.role == "assistant" and assistant.content == ""
    assert assistant.tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)
    assert req.messages[2].tool_call_id == "call_1"


@pytest.mark.parametrize("role", ["assistant", "user"])
def test_null_tool_calls_and_function_call_are_nothing(role: str) -> None:
    for key in ("tool_calls", "function_call"):
        req = parse_completion({"messages": [ASK, {"role": role, "content": "hi", key: None}, ASK]})
        assert req.messages[1] == Message(role, "hi")


@pytest.mark.parametrize(
    ("key", "value"),
    [("refusal", "I will not."), ("annotations", [{"type": "url_citation"}]), ("audio", {"id": "audio_1"})],
)
def test_a_refusal_or_other_answer_field_with_a_value_is_still_refused(key: str, value: Any) -> None:
    """Only the nulls of a dumped message are taken: a value would be something the server cannot carry."""
    with pytest.raises(InvalidField) as info:
        parse_completion({"messages": [ASK, {"role": "assistant", "content": "hi", key: value}, ASK]})
    assert info.value.param == f"messages[1].{key}"


async def test_a_refusal_with_a_value_is_a_400_over_http(make_client: MakeClient) -> None:
    client = await make_client()
    await refused(
        client, {"messages": [ASK, {"role": "assistant", "content": "x", "refusal": "x"}, ASK]}, "messages[1].refusal"
    )


async def test_the_agent_loop_with_model_dump(make_client: MakeClient, hermes_two: LoadedModel) -> None:
    """The SDK user's loop where the answer's message goes back as `message.model_dump()` (its nulls included):
    taken, and read as the same conversation as the plain form."""
    client = await make_client(hermes_two)
    url = str(client.make_url("/v1"))
    args: dict[str, Any] = {"model": hermes_two.name, "tools": TOOLS, "temperature": 0, "max_tokens": 200}
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as sdk:
        first = (await sdk.chat.completions.create(messages=TWO_BODY["messages"], **args)).choices[0]
        assert first.finish_reason == "tool_calls"
        calls = first.message.tool_calls or []
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
        results = [{"role": "tool", "tool_call_id": c.id, "content": "22"} for c in calls]
        dumped = first.message.model_dump()
        assert dumped["refusal"] is None and dumped["function_call"] is None and dumped["audio"] is None
        history = [*TWO_BODY["messages"], dumped, *results]
        second = await sdk.chat.completions.create(messages=history, **{**args, "max_tokens": 4})
    # the raw body too, nulls and all, as json.dumps writes the dump
    status, raw = await post(client, {"messages": history, "tools": TOOLS, "temperature": 0, "max_tokens": 4})
    assert status == 200, raw
    plain = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
    status, same = await post(
        client, {"messages": [*TWO_BODY["messages"], plain, *results], "tools": TOOLS, "max_tokens": 4}
    )
    assert status == 200, same
    assert second.usage is not None
    assert second.usage.prompt_tokens == raw["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]


# ---- 2. bad tools and histories: a 400 naming the field, never a 500 -------------------------------------------------


def strict_tool(parameters: Any, name: str = "f") -> dict[str, Any]:
    return wire({"name": name, "parameters": parameters, "strict": True})


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": {"a": True}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": 5},
        {"type": "object", "properties": {"class": {"type": "string"}}},
        {"type": "object", "properties": {"my-key": {"type": "string"}}},
        {"type": "string"},
    ],
    ids=["boolean property", "required not a list", "python keyword", "not an identifier", "string root"],
)
async def test_a_strict_schema_chatglm3_cannot_force_is_a_400(
    parameters: dict[str, Any], make_client: MakeClient, glm3_lm: LoadedModel
) -> None:
    client = await make_client(glm3_lm)
    body = {"messages": [ASK], "tools": [strict_tool(parameters)], "tool_choice": "required"}
    message = await refused(client, body, "tools")
    assert "cannot be forced" in message


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "f"}}], ids=["required", "named"]
)
async def test_a_strict_schema_whose_root_is_not_an_object_is_a_400(
    choice: Any, make_client: MakeClient, hermes_two: LoadedModel
) -> None:
    client = await make_client(hermes_two)
    body = {"messages": [ASK], "tools": [strict_tool({"type": "string"})], "tool_choice": choice}
    await refused(client, body, "tools")


async def test_a_strict_schema_the_grammar_library_refuses_is_a_400_naming_tools(
    make_client: MakeClient, hermes_two: LoadedModel
) -> None:
    client = await make_client(hermes_two)
    misspelt = {"type": "object", "properties": {"a": {"type": "strnig"}}}
    body = {"messages": [ASK], "tools": [strict_tool(misspelt)], "tool_choice": "required"}
    assert "strnig" in await refused(client, body, "tools")


def test_a_strict_schema_whose_root_is_not_an_object_has_no_schema() -> None:
    with pytest.raises(ValueError, match="object"):
        tool("f", {"type": "string"}, strict=True).schema()
    assert tool("f", {"type": "string"}).schema() == {"type": "object"}  # not strict: any object


async def test_deeply_nested_arguments_in_a_chatglm3_history_are_a_400(
    make_client: MakeClient, glm3_lm: LoadedModel
) -> None:
    client = await make_client(glm3_lm)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000}}
    history = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    status, answer = await post(client, {"messages": history, "tools": [wire({"name": "f"})], "max_tokens": 4})
    assert status == 400, answer
    assert answer["error"]["param"] == "messages" and "JSON object" in answer["error"]["message"]


async def test_deeply_nested_arguments_in_a_template_history_are_no_500(
    make_client: MakeClient, hermes_two: LoadedModel
) -> None:
    """A chat template takes a call's arguments as values: text too deep to read goes to it as the text it is (here
    too long for the tiny model's context: the 400 says how long the prompt it made is)."""
    client = await make_client(hermes_two)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "[" * 5000}}
    history = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    status, answer = await post(client, {"messages": history, "tools": TOOLS, "max_tokens": 1})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    prompt = int(re.findall(r"resulted in (\d+) tokens", answer["error"]["message"])[0])
    assert prompt > 5000  # the brackets are in it


# ---- 3. arguments are JSON, never NaN or Infinity -----------------------------------------------------------------


@pytest.mark.parametrize("body", ['{"x": NaN}', '{"x": Infinity}', '{"x": -Infinity}', '{"x": [1, NaN]}'])
def test_glm4_arguments_with_nan_or_infinity_are_no_call(body: str) -> None:
    assert glm4.parse_body("f", body) is None
    text, calls = run(Glm4Format(99_001).calls([tool("f")]), f"f\n{body}")
    assert calls == [] and text == f"f\n{body}"


@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_chatglm3_arguments_beyond_json_are_no_call(value: str) -> None:
    body = f"```python\ntool_call(x={value})\n```"
    assert chatglm3.parse_body("f", body) is None
    _, calls = run(ChatGLM3Format(99_001).calls([tool("f")]), f"f\n{body}")
    assert calls == []


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_hermes_arguments_with_infinity_stay_text(value: str) -> None:
    markup = f'<tool_call>\n{{"name": "f", "arguments": {{"x": {value}}}}}\n</tool_call>'
    text, calls = run(HermesFormat().calls([tool("f")]), markup)
    assert calls == [] and text == markup


def test_json_arguments_still_make_calls() -> None:
    """The same shapes with JSON numbers are calls (the checks above refuse only what JSON has not)."""
    assert glm4.parse_body("f", '{"x": 1e300}') == '{"x": 1e+300}'
    assert chatglm3.parse_body("f", "```python\ntool_call(x=1e300)\n```") == '{"x": 1e+300}'
    _, calls = run(HermesFormat().calls([tool("f")]), '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert [(n, a) for _, n, a in joined_calls(calls)] == [("f", {"x": 1})]


# ---- 4. call ids ---------------------------------------------------------------------------------------------------

MISTRAL_TWO = '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "f", "arguments": {"x": 2}}]'
HERMES_TWO = (
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
)
TWO_CALLS = [("f", {"x": 1}), ("f", {"x": 2})]


def test_mistral_call_ids_are_nine_letters_or_digits() -> None:
    seen = set()
    for _ in range(20):
        _, calls = run(MistralFormat().calls([tool("f")]), MISTRAL_TWO)
        made = joined_calls(calls)
        assert [(n, a) for _, n, a in made] == TWO_CALLS
        for call_id, _, _ in made:
            assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id), call_id
            seen.add(call_id)
    assert len(seen) == 40  # each a fresh one


@pytest.mark.parametrize(
    ("fmt", "text", "expected"),
    [
        (HermesFormat(), HERMES_TWO, TWO_CALLS),
        (Llama3Format(), '{"name": "f", "parameters": {"x": 1}}', TWO_CALLS[:1]),
        (Glm4Format(99_001), 'f\n{"x": 1}', TWO_CALLS[:1]),
        (ChatGLM3Format(99_001), "f\n```python\ntool_call(x=1)\n```", TWO_CALLS[:1]),
    ],
    ids=["hermes", "llama3", "glm4", "chatglm3"],
)
def test_the_other_formats_give_openai_call_ids(fmt: ToolFormat, text: str, expected: list[Any]) -> None:
    _, calls = run(fmt.calls([tool("f")]), text)
    made = joined_calls(calls)
    assert [(n, a) for _, n, a in made] == expected
    assert all(OPENAI_ID.fullmatch(i) for i, _, _ in made), made


# ---- 5. GLM-4-hf / GLM-4-0414 through a Hugging Face tokenizer ------------------------------------------------------

# A GLM-4-0414-like template, small: the tools in a `# 可用工具` system turn, each call an assistant turn whose metadata
# line is the tool's name, each result an observation turn
GLM4_HF_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# 可用工具{% for tool in tools %}\n\n## {{ tool.function.name }}\n\n"
    "{{ tool.function | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.metadata %}<|assistant|>{{ m.metadata }}\n{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|>\n{{ m.content }}"
    "{% elif m.role == 'observation' %}<|observation|>\n{{ m.content }}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER_TOOL = wire(
    {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
)
RESULT = '{"temperature": 22}'


def glm4_hf_tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    roles = ["<|assistant|>", "<|observation|>", "<|user|>", "<|system|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": roles})
    tokenizer.chat_template = GLM4_HF_TEMPLATE
    return tokenizer


def test_a_glm4_hf_template_gets_the_glm4_format(tiny_dir: Path) -> None:
    tokenizer = glm4_hf_tokenizer(tiny_dir)
    chat = TemplateFormat(tokenizer)
    assert isinstance(chat.tool_format, Glm4Format)
    assert chat.tool_format.assistant == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert chat.own_tool_formats == (chat.tool_format,)


def test_a_glm4_hf_prompt_writes_calls_as_metadata_turns(tiny_dir: Path) -> None:
    tokenizer = glm4_hf_tokenizer(tiny_dir)
    chat = TemplateFormat(tokenizer)
    calls = [
        SDK_CALL,
        {**SDK_CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]
    messages = [
        ASK,
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "tool", "tool_call_id": "call_2", "content": "{}"},
    ]
    req = parse_completion({"messages": messages, "tools": [WEATHER_TOOL]})
    text = tokenizer.decode(chat.encode(req.messages, req.tools), skip_special_tokens=False)
    assert text.startswith("[gMASK]<sop><|system|>\n# 可用工具") and "## get_weather" in text
    assert text.endswith(
        "<|user|>\nWeather in Paris?<|assistant|>\nLet me look."
        '<|assistant|>get_weather\n{"city": "Paris"}<|assistant|>get_weather\n{"city": "Rome"}'
        f"<|observation|>\n{RESULT}<|observation|>\n{{}}<|assistant|>"
    )


# ---- 6. --tool-call-parser on a template that ignores tools, and which families take which parser -------------------

CALLED = [
    ASK,
    {"role": "assistant", "content": None, "tool_calls": [SDK_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
]
HERMES_W_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parsed_template(tiny_dir: Path) -> tuple[Any, TemplateFormat]:
    """The plain tiny tokenizer (its template ignores tools) with the Hermes format set on it, as models/loader.py
    does for `--tool-call-parser hermes`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    chat = TemplateFormat(tokenizer)
    assert not chat.renders_tools and chat.tool_format is None
    chat.tool_format = tool_format(chat, "hermes")
    assert isinstance(chat.tool_format, HermesFormat)
    return tokenizer, chat


def test_a_named_parser_writes_the_history_s_calls_in_its_markup(tiny_dir: Path) -> None:
    tokenizer, chat = parsed_template(tiny_dir)
    req = parse_completion({"messages": CALLED, "tools": [WEATHER_TOOL]})
    text = tokenizer.decode(chat.encode(req.messages, req.tools), skip_special_tokens=False)
    system = HermesFormat().system_prompt(req.tools)
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{HERMES_W_CALL}<|im_end|>\n<|im_start|>tool\n{RESULT}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_named_parser_writes_the_calls_when_no_tools_are_offered(tiny_dir: Path) -> None:
    tokenizer, chat = parsed_template(tiny_dir)
    req = parse_completion({"messages": CALLED})
    text = tokenizer.decode(chat.encode(req.messages, ()), skip_special_tokens=False)
    assert f"<|im_start|>assistant\n{HERMES_W_CALL}<|im_end|>" in text
    assert "<|im_start|>system" not in text and "<tools>" not in text


class FakeGlmTokenizer:
    """Just what the GLM chat formats' constructors read."""

    def __init__(self) -> None:
        self.special = {"<|assistant|>": 7}

    def encode(self, text: str) -> list[int]:
        raise AssertionError("not used")


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_chatglm6b_and_chatglm2_take_no_parser(name: str) -> None:
    for chat in (RoundsFormat(FakeGlmTokenizer()), ChatGLM6BFormat(FakeGlmTokenizer())):  # type: ignore[arg-type]
        with pytest.raises(ModelLoadError, match="no tool calls"):
            tool_format(chat, name)


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_chatglm3_takes_no_template_parser(name: str) -> None:
    with pytest.raises(ModelLoadError, match="not a format of this model"):
        tool_format(RolesFormat(FakeGlmTokenizer(), "sop"), name)


def test_chatglm3_with_the_glm4_parser_writes_glm4_s_system_turn() -> None:
    chat = RolesFormat(FakeGlmTokenizer(), "sop")
    fmt = tool_format(chat, "glm4")
    assert isinstance(fmt, Glm4Format) and fmt.assistant == 7
    chat.tool_format = fmt
    req = parse_completion({"messages": CALLED, "tools": [WEATHER_TOOL]})
    turns = chat.turns(req.messages, req.tools)
    assert turns[0] == ("system", "", glm4.system_turn(req.tools))
    assert ("assistant", "get_weather", '{"city": "Paris"}') in turns  # GLM-4's call body: the JSON as sent


# ---- 7. ChatGLM3: the caller's system message joins the tools' system turn ------------------------------------------


def test_chatglm3_has_one_system_turn_with_the_tools_then_the_caller_s_text(glm3_lm: LoadedModel) -> None:
    chat = glm3_lm.chat
    assert isinstance(chat, RolesFormat) and isinstance(chat.tool_format, ChatGLM3Format)
    messages = [{"role": "system", "content": "Be brief."}, ASK]
    req = parse_completion({"messages": messages, "tools": [WEATHER_TOOL]})
    turns = chat.turns(req.messages, req.tools)
    assert turns == [
        ("system", "", f"{chatglm3.system_turn(req.tools)}\nBe brief."),
        ("user", "", "Weather in Paris?"),
    ]
    ids = chat.encode(req.messages, req.tools)
    assert ids.count(glm3_lm.tokenizer.special["<|system|>"]) == 1
    # without tools the caller's system message is its own turn, as before
    assert chat.turns(req.messages, ())[0] == ("system", "", "Be brief.")


# ---- 8. parallel_tool_calls needs tools ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [False, True])
async def test_parallel_tool_calls_without_tools_is_a_400(value: bool, make_client: MakeClient) -> None:
    with pytest.raises(InvalidField) as info:
        parse_completion({"messages": [ASK], "parallel_tool_calls": value})
    assert info.value.param == "parallel_tool_calls"
    client = await make_client()
    await refused(client, {"messages": [ASK], "parallel_tool_calls": value}, "parallel_tool_calls")
    # with tools it is taken
    assert (
        parse_completion({"messages": [ASK], "tools": TOOLS, "parallel_tool_calls": value}).tool_choice.parallel
        is value
    )


# ---- 9. legacy functions stream one call ---------------------------------------------------------------------------


async def test_legacy_functions_never_stream_a_second_call(aiohttp_client: Any) -> None:
    """An upstream that answers with two calls (it was asked for one, but need not listen): a client that spoke of
    `functions` hears only the first, streamed or not."""
    proxy = await fake_proxy(aiohttp_client, FakeUpstream(VLLM_CALLS))
    body = {"messages": [ASK], "functions": [UPSTREAM_WEATHER, CLOCK]}
    chunks = await stream_chunks(proxy, body)
    pieces = [d["function_call"] for d in deltas(chunks) if "function_call" in d]
    assert [p["name"] for p in pieces if "name" in p] == ["get_weather"]
    assert "".join(p["arguments"] for p in pieces) == '{"city": "Paris"}'
    assert all("tool_calls" not in d for d in deltas(chunks)) and finishes(chunks) == ["function_call"]
    status, done = await post(proxy, body)
    assert status == 200 and done["choices"][0]["message"]["function_call"] == SDK_CALL["function"]


# ---- 10. a call, then the length limit ------------------------------------------------------------------------------


def cut_inside_the_second_call(lm: LoadedModel) -> int:
    """A max_tokens that ends the taught answer inside its second call, after the first is whole."""
    tokens = lm.tokenizer.encode(TWO_ANSWER)
    first = next(k for k in range(len(tokens)) if W_CALL in lm.tokenizer.decode(tokens[:k]))
    cut = (first + len(tokens)) // 2
    head = lm.tokenizer.decode(tokens[:cut])
    assert head.count("<tool_call>") == 2 and head.count("</tool_call>") == 1, head
    return cut


async def test_a_call_then_the_length_limit_finishes_tool_calls(
    make_client: MakeClient, hermes_two: LoadedModel
) -> None:
    client = await make_client(hermes_two)
    cut = cut_inside_the_second_call(hermes_two)
    body = {**TWO_BODY, "temperature": 0, "max_tokens": cut}
    status, answer = await post(client, body)
    assert status == 200, answer
    (choice,) = answer["choices"]
    assert answer["usage"]["completion_tokens"] == cut
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # the second call's cut markup is no text of the answer
    assert not (choice["message"]["content"] or "").strip(), choice["message"]["content"]
    chunks = await stream_chunks(client, body)
    assert finishes(chunks) == ["tool_calls"]
    assert not "".join(d.get("content") or "" for d in deltas(chunks)).strip()
    named = [p["function"]["name"] for d in deltas(chunks) for p in d.get("tool_calls") or [] if "id" in p]
    assert named == ["get_weather"]
    # the full answer, not cut, still ends with its two calls
    status, whole = await post(client, {**TWO_BODY, "temperature": 0, "max_tokens": 200})
    assert (
        whole["choices"][0]["finish_reason"] == "tool_calls" and len(whole["choices"][0]["message"]["tool_calls"]) == 2
    )
