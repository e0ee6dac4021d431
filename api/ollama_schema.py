"""The wire of the Ollama API (`/api/...`): its request bodies (pydantic models that check them and are published as
they are) and the typed requests a checked body becomes (the answers' schemas and the paths are in
api/ollama_answers.py).

The shapes are the official `ollama` Python client's (its `_types.py`): what it sends is accepted, and nothing a client
sends is silently ignored. Options that only tune Ollama's own runtime (threads, GPU layers, its context window) are
accepted and documented as having no effect; every other option this server does not implement (mirostat, tfs_z,
typical_p, min_p, repeat_last_n...) is a 400 naming it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic's own dependency; it needs this TypedDict before Python 3.12

from api.output_fields import MAX_TOP_LOGPROBS, schema_text
from api.tool_fields import FunctionName, arguments_text
from api.wire import INT_MAX, INT_MIN, INTEGRAL, NO_EFFECT, STRICT, Says, Wire, compact, validate
from backends.base import Constraint, InvalidField, Message, Sampling, Tool, ToolCall

MAX_STOPS = 16
_RUNTIME = f"{NO_EFFECT}: it tunes Ollama's own runtime, not the answer"

# ---- the bodies -----------------------------------------------------------------------------------------------------

_Int = Annotated[int, Field(ge=INT_MIN, le=INT_MAX), INTEGRAL, Says("must be an integer")]


class OllamaOptions(Wire):
    """Ollama's `options`: the sampling ones this server implements, and the runtime ones that change no answer."""

    temperature: Annotated[float, Field(ge=0, le=2), Says("must be a number from 0 to 2")] | None = Field(
        None, description="0 is greedy; 0.8 when neither this nor the model family sets one (Ollama's default)"
    )
    top_p: Annotated[float, Field(ge=0, le=1), Says("must be a number from 0 to 1")] | None = Field(
        None, description="0.9 when neither this nor the model family sets one (Ollama's default)"
    )
    top_k: (
        Annotated[int, Field(ge=-1, le=1_000_000), INTEGRAL, Says("must be an integer from -1 to 1000000")] | None
    ) = Field(None, description="0 and -1 mean no cut")
    num_predict: (
        Annotated[int, Field(ge=-2, le=INT_MAX), INTEGRAL, Says("must be -1 or -2 (no limit) or a count from 1")] | None
    ) = Field(None, description="Answer tokens at most; -1 and -2: the server's default answer length")
    stop: (
        Annotated[
            list[str],
            Field(max_length=MAX_STOPS),
            Says(f"must be an array of at most {MAX_STOPS} strings", beneath=True),
        ]
        | None
    ) = Field(None, description="Text that ends the answer, not included in it; empty strings are ignored")
    seed: _Int | None = Field(None, description="-1: a random seed, as Ollama")
    repeat_penalty: Annotated[float, Field(gt=0, le=10), Says("must be a number above 0 and at most 10")] | None = (
        Field(None, description="1 is none; applied over the whole answer (Ollama: over repeat_last_n tokens)")
    )
    presence_penalty: Annotated[float, Field(ge=-2, le=2), Says("must be a number from -2 to 2")] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2), Says("must be a number from -2 to 2")] | None = None
    # Ollama's runtime: how the model is loaded and run, never what it answers
    num_ctx: _Int | None = Field(None, description=f"{_RUNTIME}; the context is the model's")
    num_batch: _Int | None = Field(None, description=_RUNTIME)
    num_thread: _Int | None = Field(None, description=_RUNTIME)
    num_gpu: _Int | None = Field(None, description=_RUNTIME)
    main_gpu: _Int | None = Field(None, description=_RUNTIME)
    num_keep: _Int | None = Field(None, description=_RUNTIME)
    low_vram: bool | None = Field(None, description=_RUNTIME)
    numa: bool | None = Field(None, description=_RUNTIME)
    use_mmap: bool | None = Field(None, description=_RUNTIME)
    use_mlock: bool | None = Field(None, description=_RUNTIME)


_TEXT_ONLY = "is not supported: this server reads text only (send it empty or leave it out)"
_NoImages = Annotated[list[Any], Field(max_length=0), Says(_TEXT_ONLY)]


@with_config(STRICT)
class OllamaCalledFunction(TypedDict):
    name: FunctionName
    arguments: dict[str, Any]
    index: NotRequired[_Int]  # Ollama numbers an answer's calls; a history sent back holds it: nothing to ignore


@with_config(STRICT)
class OllamaToolCall(TypedDict):
    function: OllamaCalledFunction


# Messages are TypedDicts, not models: a long conversation is checked about twice as fast (as api/messages.py).
@with_config(STRICT)
class OllamaMessage(TypedDict):
    role: Literal["system", "user", "assistant", "tool"]
    content: NotRequired[str]  # the client leaves out an empty content
    tool_calls: NotRequired[list[OllamaToolCall] | None]
    tool_name: NotRequired[str | None]
    images: NotRequired[_NoImages | None]


class OllamaFunction(Wire):
    name: FunctionName = Field(description="Letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments")


class OllamaTool(Wire):
    type: Literal["function"] = "function"
    function: OllamaFunction


_Format = Annotated[
    Literal["", "json"] | dict[str, Any],
    Says('must be "json", a JSON schema (an object), or "" for free text'),
]


# Go's durations, as Ollama reads keep_alive: "5m", "1h30m", "-1s", "0.5h"; or a number of seconds as text
DURATION = r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^-?\d+(\.\d+)?$"


def _zero(keep_alive: float | str | None) -> bool:
    """keep_alive 0 (in any unit): Ollama unloads the model rather than loading it."""
    if keep_alive is None:
        return False
    if isinstance(keep_alive, str):
        return all(float(n) == 0 for n in re.findall(r"\d+(?:\.\d+)?", keep_alive))
    return keep_alive == 0


class _OllamaFields(Wire):
    """What /api/chat and /api/generate share."""

    model: Annotated[str, Field(min_length=1)] = Field(description="A served name, with or without its tag")
    format: _Format | None = Field(None, description='"json": any JSON object; a JSON schema: JSON that fits it')
    options: OllamaOptions | None = None
    stream: bool | None = Field(None, description="true when left out: NDJSON chunks, one JSON object a line")
    keep_alive: (
        Annotated[
            float | Annotated[str, Field(pattern=DURATION)],
            Says('must be a number of seconds or a duration such as "5m"'),
        ]
        | None
    ) = Field(None, description=f"{NO_EFFECT}: the model stays loaded (0 with nothing to say: `done_reason` unload)")
    think: Annotated[Literal[False], Says("must be false or null: this server has no thinking mode")] | None = Field(
        None, description="Only false: this server has no thinking mode"
    )
    logprobs: bool | None = Field(None, description="Each answer token's logprob in `logprobs`")
    top_logprobs: (
        Annotated[
            int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL, Says(f"must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        ]
        | None
    ) = Field(None, description="The likeliest alternatives to list with each token; needs logprobs: true")


class OllamaChatBody(_OllamaFields):
    """The body of `POST /api/chat`. A field not listed here is refused (400)."""

    model_config = ConfigDict(title="OllamaChatRequest")

    messages: list[OllamaMessage] | None = Field(None, description="None or empty: Ollama's load answer, no generation")
    tools: Annotated[list[OllamaTool], Field(max_length=128)] | None = Field(
        None, description="Functions the model may call (the model decides)"
    )


class OllamaGenerateBody(_OllamaFields):
    """The body of `POST /api/generate`. A field not listed here is refused (400), among them width, height and
    steps (image generation)."""

    model_config = ConfigDict(title="OllamaGenerateRequest")

    prompt: str | None = Field(None, description="None or empty: Ollama's load answer, no generation")
    system: str | None = Field(None, description="A system message before the prompt; not with raw")
    raw: bool | None = Field(None, description="true: the prompt as raw text, no chat template")
    suffix: Annotated[Literal[""], Says("is not supported: this server does not fill in the middle")] | None = Field(
        None, description="Only empty: this server does not fill in the middle"
    )
    template: (
        Annotated[Literal[""], Says("is not supported: this server prompts with the model's own chat template")] | None
    ) = Field(None, description="Only empty: this server prompts with the model's own chat template")
    context: (
        Annotated[
            list[Any],
            Field(max_length=0),
            Says("is not supported: send the conversation's history to /api/chat as messages"),
        ]
        | None
    ) = Field(None, description="Only empty: send a conversation's history to /api/chat as messages")
    images: _NoImages | None = Field(None, description="Only empty: this server reads text only")


class OllamaShowBody(Wire):
    """The body of `POST /api/show`: `model`, or its older name `name`."""

    model_config = ConfigDict(title="OllamaShowRequest")

    model: Annotated[str, Field(min_length=1)] | None = None
    name: Annotated[str, Field(min_length=1)] | None = Field(None, description="The older spelling of model")
    verbose: bool | None = Field(None, description=f"{NO_EFFECT}: the model's information is short")


BODIES: dict[str, type[BaseModel]] = {  # request bodies under their /openapi.json names
    "OllamaChatRequest": OllamaChatBody,
    "OllamaGenerateRequest": OllamaGenerateBody,
    "OllamaShowRequest": OllamaShowBody,
}

# ---- checked bodies as typed requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaRequest:
    """A checked /api/chat or /api/generate body: the conversation (or raw prompt) as the backends take it. `model`
    is the name as sent (Ollama echoes it); `messages` empty and `prompt` None: the load answer, nothing to
    generate."""

    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    stream: bool
    logprobs: bool
    tools: tuple[Tool, ...] = ()
    prompt: str | None = None  # a raw prompt (generate with raw: true)
    unload: bool = False  # keep_alive 0: nothing to say is answered `unload` (the model stays loaded all the same)


def _constraint(form: str | dict[str, Any] | None) -> Constraint | None:
    """`format` as a constraint, as api/output_fields.py builds response_format's."""
    if form is None or form == "":
        return None
    if form == "json":
        return Constraint("json_object", "", "format")
    return Constraint("json_schema", schema_text(form, "format"), "format")


def _sampling(wire: _OllamaFields) -> Sampling:
    o = wire.options or OllamaOptions.model_validate({})
    if o.num_predict == 0:
        raise InvalidField("options.num_predict", "'options.num_predict' must be -1 or -2 (no limit) or a count from 1")
    if wire.top_logprobs is not None and not wire.logprobs:  # as OpenAI: alternatives of logprobs nobody asked for
        raise InvalidField("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return Sampling(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=None if o.top_k is None else max(o.top_k, 0),
        repetition_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        max_tokens=None if o.num_predict is None or o.num_predict < 0 else o.num_predict,
        seed=None if o.seed == -1 else o.seed,
        stop=tuple(s for s in o.stop or () if s),
        logprobs=(wire.top_logprobs or 0) if wire.logprobs else None,
        constraint=_constraint(wire.format),
    )


def _conversation(messages: list[OllamaMessage]) -> tuple[Message, ...]:
    """The messages as the backends take them. Ollama's calls carry no ids: each gets one, and a tool result answers
    the first call of its tool (`tool_name`; any tool when it names none) not answered yet."""
    out: list[Message] = []
    waiting: list[ToolCall] = []  # calls made and not answered yet, in order
    for i, m in enumerate(messages):
        where, role, tool_name = f"messages[{i}]", m["role"], m.get("tool_name")
        if m.get("tool_calls") and role != "assistant":
            raise InvalidField(f"{where}.tool_calls", f"'{where}.tool_calls' is only for assistant messages")
        if tool_name is not None and role != "tool":
            raise InvalidField(f"{where}.tool_name", f"'{where}.tool_name' is only for tool messages")
        calls = tuple(
            # nine letters or digits, as Mistral's templates demand; the same ones for the same conversation
            ToolCall(f"c{i:05d}{j:03d}", c["function"]["name"], arguments_text(c["function"]["arguments"]))
            for j, c in enumerate(m.get("tool_calls") or ())
        )
        waiting += calls
        content = m.get("content", "")
        if role == "tool":
            call = next((c for c in waiting if tool_name is None or c.name == tool_name), None)
            if call is not None:
                waiting.remove(call)
            name = tool_name if tool_name is not None else call.name if call is not None else None
            out.append(Message("tool", content, tool_call_id=None if call is None else call.id, name=name))
        else:
            out.append(Message(role, content, tool_calls=calls))
    return tuple(out)


def _tools(wire: OllamaChatBody, body: dict[str, Any]) -> tuple[Tool, ...]:
    tools: list[Tool] = []
    for i, (tool, sent) in enumerate(zip(wire.tools or (), body.get("tools") or (), strict=True)):
        fn = tool.function
        if any(t.name == fn.name for t in tools):
            raise InvalidField(f"tools[{i}]", f"'tools[{i}]' repeats the name {fn.name!r}")
        parameters = None if fn.parameters is None else compact(fn.parameters)
        # the function as sent: its key order shows in some families' prompts
        tools.append(Tool(fn.name, json.dumps(sent["function"], ensure_ascii=False), parameters))
    return tuple(tools)


def parse_chat(body: dict[str, Any]) -> OllamaRequest:
    """Validate an /api/chat body."""
    wire = validate(OllamaChatBody, body)
    return OllamaRequest(
        model=wire.model,
        messages=_conversation(wire.messages or []),
        tools=_tools(wire, body),
        sampling=_sampling(wire),
        stream=wire.stream is not False,
        logprobs=bool(wire.logprobs),
        unload=_zero(wire.keep_alive),
    )


def parse_generate(body: dict[str, Any]) -> OllamaRequest:
    """Validate an /api/generate body: a raw prompt, or the system and the prompt as messages."""
    wire = validate(OllamaGenerateBody, body)
    if wire.raw and wire.system:
        raise InvalidField("system", "'system' cannot be sent with 'raw': true; write it into the raw prompt")
    prompt = wire.prompt or ""
    messages: tuple[Message, ...] = ()
    if prompt and not wire.raw:
        messages = (*([Message("system", wire.system)] if wire.system else []), Message("user", prompt))
    return OllamaRequest(
        model=wire.model,
        messages=messages,
        sampling=_sampling(wire),
        stream=wire.stream is not False,
        logprobs=bool(wire.logprobs),
        prompt=prompt if prompt and wire.raw else None,
        unload=_zero(wire.keep_alive),
    )


def parse_show(body: dict[str, Any]) -> str:
    """The model an /api/show body names."""
    wire = validate(OllamaShowBody, body)
    name = wire.model or wire.name
    if name is None:
        raise InvalidField("model", "'model' is required")
    return name
