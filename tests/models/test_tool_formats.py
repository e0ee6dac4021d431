"""The tool-call formats' answer streams, fed an answer split at every point: the text a client sees and the calls
it gets are the same however the answer's text arrives, no markup ever reaches the text, and text is held back only
while it could still become markup. Also the spec's vectors (glm-tools.md 6.2 and 6.4), the template detection and
the forced-call grammars compiled for a real tokenizer."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from generation.constraints import grammars_for
from generation.structured import Constraint
from models.loader import LoadedModel
from models.tools import formats
from models.tools.base import CallDelta, CallStream, Tool
from models.tools.chatglm3 import ChatGLM3Format
from models.tools.glm4 import Glm4Format
from models.tools.hermes import HermesFormat
from models.tools.llama3 import Llama3Format
from models.tools.mistral import MistralFormat
from tests.conftest import CHAT_TEMPLATE

BOUNDARY = 99_001  # a made-up `<|assistant|>` id: the segment streams are told of it by `segment()`
# OpenAI's id shape; Mistral's templates take only nine letters or digits, which the next turn hands back
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}|[A-Za-z0-9]{9}")
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name, e.g. 北京"}},
    "required": ["city"],
}
TIME_PARAMETERS = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}


def tool(name: str, parameters: dict[str, Any] | None = None, strict: bool = False) -> Tool:
    spec: dict[str, Any] = {"name": name, "description": f"The {name} tool"}
    if parameters is not None:
        spec["parameters"] = parameters
    return Tool(name, json.dumps(spec), None if parameters is None else json.dumps(parameters), strict)


WEATHER = tool("get_weather", WEATHER_PARAMETERS)
TIME = tool("get_time", TIME_PARAMETERS)
TOOLS = (WEATHER, TIME)


@dataclass
class Run:
    """What a stream gave back for one way of cutting an answer."""

    texts: list[str] = field(default_factory=list)  # every text piece, in order (empty ones dropped)
    calls: list[CallDelta] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def feed(stream: CallStream, segments: Sequence[str], cuts: frozenset[int]) -> Run:
    """Push the answer (segments set apart by the boundary token) cut at the given positions of its whole text."""
    run = Run()

    def take(pieces: Any) -> None:
        if pieces.text:
            run.texts.append(pieces.text)
        run.calls += pieces.calls

    at = 0
    for i, segment in enumerate(segments):
        if i:
            take(stream.segment())
        points = [0, *sorted(c - at for c in cuts if at < c < at + len(segment)), len(segment)]
        for a, b in itertools.pairwise(points):
            take(stream.push(segment[a:b]))
        at += len(segment)
    take(stream.flush())
    return run


def every_split(segments: Sequence[str]) -> Iterator[frozenset[int]]:
    """Whole, cut once at every point, and char by char."""
    total = sum(map(len, segments))
    yield frozenset()
    for i in range(1, total):
        yield frozenset({i})
    yield frozenset(range(1, total))


def whole_calls(deltas: Sequence[CallDelta]) -> list[tuple[str, Any]]:
    """The calls the deltas make, checked for OpenAI's streamed shape: each call's first delta has its index (0,
    1, ... in order), a fresh id and its name; the ones after carry only arguments, which join to a JSON object."""
    calls: list[tuple[str, str]] = []
    ids: set[str] = set()
    for d in deltas:
        if d.id is not None:
            assert d.index == len(calls) and d.name is not None and CALL_ID.fullmatch(d.id), d
            assert d.id not in ids
            ids.add(d.id)
            calls.append((d.name, d.arguments))
        else:
            assert d.name is None and d.index == len(calls) - 1, d
            name, arguments = calls[d.index]
            calls[d.index] = (name, arguments + d.arguments)
    out = []
    for name, arguments in calls:
        value = json.loads(arguments)
        assert isinstance(value, dict), arguments
        out.append((name, value))
    return out


def check(
    make: Any,
    segments: Sequence[str],
    text: str,
    calls: Sequence[tuple[str, dict[str, Any]]],
    markup: Sequence[str],
) -> None:
    """However the answer is cut, the stream gives `text` and `calls`; when `text` holds no markup, no piece does."""
    for cuts in every_split(segments):
        run = feed(make(), segments, cuts)
        where = f"cut at {sorted(cuts)[:3]}{'...' if len(cuts) > 3 else ''}"
        assert run.text == text, where
        assert whole_calls(run.calls) == list(calls), where
        for mark in markup:
            if mark not in text:
                assert not any(mark in piece for piece in run.texts), (where, mark, run.texts)


# ---- Hermes: `<tool_call>` ... `</tool_call>` in the text -------------------------------------------------------

HERMES_MARKUP = ("<tool_call>", "</tool_call>")
W_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
T_UTC = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
PARIS = ("get_weather", {"city": "Paris"})
UTC = ("get_time", {"zone": "UTC"})

HERMES_VECTORS = {
    "call": (W_PARIS, "", [PARIS]),
    "call, compact": ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>', "", [PARIS]),
    "text then call": (f"Let me check.\n{W_PARIS}", "Let me check.\n", [PARIS]),
    "two calls": (f"{W_PARIS}\n{T_UTC}", "", [PARIS, UTC]),
    "two calls, trailing newline": (f"{W_PARIS}\n{T_UTC}\n", "", [PARIS, UTC]),
    "parameters key": ('<tool_call>{"name": "get_time", "parameters": {"zone": "UTC"}}</tool_call>', "", [UTC]),
    "cut off before the closing tag": (W_PARIS.removesuffix("\n</tool_call>"), "", [PARIS]),
    "text": ("Hello world", "Hello world", []),
    "text with angle brackets": ("a < b, <b>bold</b> and <tool_cal", "a < b, <b>bold</b> and <tool_cal", []),
    "malformed JSON": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
        [],
    ),
    "unknown tool": (
        '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',
        [],
    ),
    "arguments not an object": (
        '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>',
        [],
    ),
    "a good call, then an unknown one": (
        f'{W_PARIS}<tool_call>{{"name": "nope", "arguments": {{}}}}</tool_call>',
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        [PARIS],
    ),
    "cut off inside the JSON": (
        '<tool_call>\n{"name": "get_weather", "arg',
        '<tool_call>\n{"name": "get_weather", "arg',
        [],
    ),
}


@pytest.mark.parametrize("case", HERMES_VECTORS)
def test_hermes_at_every_split(case: str) -> None:
    answer, text, calls = HERMES_VECTORS[case]
    check(lambda: HermesFormat().calls(TOOLS), [answer], text, calls, HERMES_MARKUP)


def test_hermes_text_after_a_call_is_the_same_however_it_is_cut() -> None:
    check(lambda: HermesFormat().calls(TOOLS), [f"{W_PARIS} Done."], " Done.", [PARIS], HERMES_MARKUP)


def test_hermes_streams_plain_text_at_once() -> None:
    stream = HermesFormat().calls(TOOLS)
    assert [stream.push(c).text for c in "Hello world"] == list("Hello world")
    assert stream.flush().text == ""


def test_hermes_holds_back_only_what_could_become_the_opening_tag() -> None:
    stream = HermesFormat().calls(TOOLS)
    assert stream.push("a <").text == "a "
    assert stream.push("b").text == "<b"  # `<b` cannot start `<tool_call>`
    assert stream.push(" <tool_ca").text == " "
    assert stream.push("ll").text == ""  # `<tool_call` may still become the tag
    assert stream.push(">").text == "" and stream.push("{").text == ""  # inside a call now


def test_hermes_releases_a_broken_opening_tag_as_soon_as_it_breaks() -> None:
    stream = HermesFormat().calls(TOOLS)
    assert stream.push("x <tool_ca").text == "x "
    assert stream.push("lx").text == "<tool_calx"  # no longer a prefix of `<tool_call>`
    stream = HermesFormat().calls(TOOLS)
    assert stream.push("x <tool_ca").text == "x "
    assert stream.flush().text == "<tool_ca"  # the answer ended: what was held is text


def test_hermes_text_before_a_call_goes_out_before_the_call_is_whole() -> None:
    stream = HermesFormat().calls(TOOLS)
    assert stream.push("Let me check.\n<tool_call>\n{").text == "Let me check.\n"
    pieces = stream.push('"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert pieces.text == "" and whole_calls(pieces.calls) == [PARIS] and stream.called


# ---- Mistral: `[TOOL_CALLS]` and a JSON list to the end ------------------------------------------------------------

MISTRAL_MARKUP = ("[TOOL_CALLS]",)
M_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
M_UTC = '{"name": "get_time", "arguments": {"zone": "UTC"}}'

MISTRAL_VECTORS = {
    "call": (f"[TOOL_CALLS][{M_PARIS}]", "", [PARIS]),
    "two calls": (f"[TOOL_CALLS][{M_PARIS}, {M_UTC}]", "", [PARIS, UTC]),
    "one object, no list": (f"[TOOL_CALLS]{M_PARIS}", "", [PARIS]),
    "text then call": (f"Sure. [TOOL_CALLS][{M_PARIS}]", "Sure. ", [PARIS]),
    "text": ("Hello [TOOLS] and [TOOL_CALL world", "Hello [TOOLS] and [TOOL_CALL world", []),
    "malformed": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ', None, []),
    "unknown tool": ('[TOOL_CALLS][{"name": "launch_rocket", "arguments": {}}]', None, []),
    "a known and an unknown tool": (f'[TOOL_CALLS][{M_PARIS}, {{"name": "x", "arguments": {{}}}}]', None, []),
    "empty list": ("[TOOL_CALLS][]", None, []),
}


@pytest.mark.parametrize("case", MISTRAL_VECTORS)
def test_mistral_at_every_split(case: str) -> None:
    answer, text, calls = MISTRAL_VECTORS[case]
    check(lambda: MistralFormat().calls(TOOLS), [answer], answer if text is None else text, calls, MISTRAL_MARKUP)


def test_mistral_holds_back_only_a_possible_marker() -> None:
    stream = MistralFormat().calls(TOOLS)
    assert stream.push("Hi [TOOL").text == "Hi "
    assert stream.push("S]").text == "[TOOLS]"
    assert stream.push(" plain").text == " plain"


# ---- Llama 3: the whole answer is one JSON object ------------------------------------------------------------------

L_PARIS = '{"name": "get_weather", "parameters": {"city": "Paris"}}'

LLAMA3_VECTORS = {
    "call": (L_PARIS, "", [PARIS]),
    "python tag": (f"<|python_tag|>{L_PARIS}", "", [PARIS]),
    "leading whitespace, arguments key": (' \n{"name": "get_time", "arguments": {"zone": "UTC"}}', "", [UTC]),
    "text": ("Hello world", "Hello world", []),
    "text with a tag-like start": ("<b>bold</b>", "<b>bold</b>", []),
    "text after whitespace": ("  Paris is sunny.", "  Paris is sunny.", []),
    "malformed": ('{"name": "get_weather", "parameters": {"city": ', None, []),
    "unknown tool": ('{"name": "launch_rocket", "parameters": {}}', None, []),
    "not a call object": ('{"city": "Paris"}', None, []),
}


@pytest.mark.parametrize("case", LLAMA3_VECTORS)
def test_llama3_at_every_split(case: str) -> None:
    answer, text, calls = LLAMA3_VECTORS[case]
    check(lambda: Llama3Format().calls(TOOLS), [answer], answer if text is None else text, calls, ["<|python_tag|>"])


def test_llama3_streams_text_once_it_cannot_be_a_call() -> None:
    stream = Llama3Format().calls(TOOLS)
    assert stream.push(" ").text == ""  # could still be a call's leading whitespace
    assert stream.push("H").text == " H"
    assert stream.push("ello").text == "ello"
    stream = Llama3Format().calls(TOOLS)
    assert stream.push("<|py").text == ""  # could still be the python tag
    assert stream.push("x").text == "<|pyx"


# ---- GLM-4 and ChatGLM3: segments after `<|assistant|>`, the first line a tool's name -----------------------------

GLM4_VECTORS: dict[str, tuple[list[str], str, list[tuple[str, dict[str, Any]]]]] = {
    # spec 6.2 (tools = [get_weather]); the leading newline of G-P3 goes later (the chat format strips its answers)
    "G-P1": (['get_weather\n{"city": "北京"}'], "", [("get_weather", {"city": "北京"})]),
    "G-P2": (['get_weather\n{\n    "city":"北京"\n}'], "", [("get_weather", {"city": "北京"})]),
    "G-P3": (["\n北京今天晴，气温 22 度。"], "\n北京今天晴，气温 22 度。", []),
    "G-P4": (['get_weather\n{"city": "北京"'], 'get_weather\n{"city": "北京"', []),
    "G-P5": (['lookup\n{"q": 1}'], 'lookup\n{"q": 1}', []),
    "G-P6": (
        ['simple_browser\nsearch("北京天气", recency_days=1)'],
        'simple_browser\nsearch("北京天气", recency_days=1)',
        [],
    ),
    "text, then a call in its own segment": (
        ["\nLet me check.", 'get_weather\n{"city": "Paris"}'],
        "\nLet me check.",
        [PARIS],
    ),
    "two calls": (
        ['get_weather\n{"city": "Paris"}', 'get_weather\n{"city": "Rome"}'],
        "",
        [PARIS, ("get_weather", {"city": "Rome"})],
    ),
    "arguments not an object": (['get_weather\n["Paris"]'], 'get_weather\n["Paris"]', []),
}


@pytest.mark.parametrize("case", GLM4_VECTORS)
def test_glm4_at_every_split(case: str) -> None:
    segments, text, calls = GLM4_VECTORS[case]
    check(lambda: Glm4Format(BOUNDARY).calls([WEATHER]), segments, text, calls, [])


def test_glm4_stream_names_its_boundary() -> None:
    assert Glm4Format(BOUNDARY).calls([WEATHER]).boundary == BOUNDARY
    assert ChatGLM3Format(BOUNDARY).calls([WEATHER]).boundary == BOUNDARY
    assert HermesFormat().calls(TOOLS).boundary is None


C_CALL = "get_weather\n ```python\ntool_call(city='Beijing')\n```"
BEIJING = ("get_weather", {"city": "Beijing"})

CHATGLM3_VECTORS: dict[str, tuple[list[str], str | None, list[tuple[str, dict[str, Any]]]]] = {
    # spec 6.4 (tools = [get_weather]); None: the answer is text as it stands
    "C-P1": ([C_CALL], "", [BEIJING]),
    "C-P2": (
        ["\n According to the query results, it is 22°C and sunny in Beijing today."],
        "\n According to the query results, it is 22°C and sunny in Beijing today.",
        [],
    ),
    "C-P3": (["\n Let me check the weather first.", C_CALL], "\n Let me check the weather first.", [BEIJING]),
    "C-P4": (["interpreter\n ```python\nprint(1 + 1)\n```"], None, []),
    "C-P5": (["get_weather\n ```python\ntool_call('Beijing')\n```"], None, []),
    "double quotes, no leading space": (
        ['get_weather\n```python\ntool_call(city="beijing", unit="celsius")\n```'],
        "",
        [("get_weather", {"city": "beijing", "unit": "celsius"})],
    ),
    "Python literals and JSON words": (
        [
            "get_weather\n```python\ntool_call(city='Paris', days=3, metric=True, extra=None, tags=['a', \"b\"], "
            "strict=true, missing=null, off=false, pair=(1, 2.5), nested={'k': [None, False]}, word='true')\n```"
        ],
        "",
        [
            (
                "get_weather",
                {
                    "city": "Paris",
                    "days": 3,
                    "metric": True,
                    "extra": None,
                    "tags": ["a", "b"],
                    "strict": True,
                    "missing": None,
                    "off": False,
                    "pair": [1, 2.5],
                    "nested": {"k": [None, False]},
                    "word": "true",
                },
            )
        ],
    ),
    "a bare name is no literal": (["get_weather\n```python\ntool_call(city=Paris)\n```"], None, []),
    "a set JSON cannot hold": (["get_weather\n```python\ntool_call(city={'a'})\n```"], None, []),
    "double-star arguments": (["get_weather\n```python\ntool_call(**{'city': 'x'})\n```"], None, []),
    "another function": (["get_weather\n```python\nprint(city='x')\n```"], None, []),
    "no fence": (["get_weather\ntool_call(city='x')"], None, []),
    "cut off in the fence": (["get_weather\n ```python\ntool_call(city='Bei"], None, []),
}


@pytest.mark.parametrize("case", CHATGLM3_VECTORS)
def test_chatglm3_at_every_split(case: str) -> None:
    segments, text, calls = CHATGLM3_VECTORS[case]
    expected = "".join(segments) if text is None else text
    check(lambda: ChatGLM3Format(BOUNDARY).calls([WEATHER]), segments, expected, calls, ["```"])


def test_chatglm3_never_evaluates_a_hostile_argument(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    hostile = f"__import__('pathlib').Path({str(target)!r}).touch()"
    answer = f"get_weather\n ```python\ntool_call(city={hostile})\n```"
    check(lambda: ChatGLM3Format(BOUNDARY).calls([WEATHER]), [answer], answer, [], [])
    nested = f"get_weather\n ```python\ntool_call(city=[{hostile}])\n```"
    check(lambda: ChatGLM3Format(BOUNDARY).calls([WEATHER]), [nested], nested, [], [])
    assert not target.exists()


def test_segment_text_streams_once_its_first_line_cannot_be_a_tool_name() -> None:
    stream = Glm4Format(BOUNDARY).calls([WEATHER, tool("get")])
    assert stream.push("\n").text == "\n"  # an empty first line: text
    assert stream.push("Hi").text == "Hi"
    stream = Glm4Format(BOUNDARY).calls([WEATHER, tool("get")])
    assert stream.push("H").text == "H"  # no tool's name starts with H
    stream = Glm4Format(BOUNDARY).calls([WEATHER, tool("get")])
    assert stream.push("get").text == ""
    assert stream.push("_").text == ""
    assert stream.push("x").text == "get_x"
    stream = ChatGLM3Format(BOUNDARY).calls([WEATHER])
    assert stream.push(" 你").text == " 你"  # SentencePiece's leading space does not hold text back


def test_a_call_segment_is_read_when_the_boundary_ends_it() -> None:
    stream = Glm4Format(BOUNDARY).calls([WEATHER])
    assert stream.push('get_weather\n{"city": "Paris"}').calls == []  # not whole yet: more body could follow
    pieces = stream.segment()
    assert whole_calls(pieces.calls) == [PARIS] and stream.called


# ---- the format a template shows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>\n{{ call }}\n</tool_call>", HermesFormat),
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", MistralFormat),
        ("{{- '<|python_tag|>' + call | tojson }}", Llama3Format),
        ("{% if m.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>{% endif %}", Llama3Format),
    ],
)
def test_from_template_finds_the_format(template: str, kind: type) -> None:
    assert isinstance(formats.from_template(template), kind)


def test_from_template_finds_none_in_a_plain_template() -> None:
    assert formats.from_template(CHAT_TEMPLATE) is None
    assert formats.from_template("{{ tools | tojson }}") is None  # tools rendered, but no call format shown


def test_formats_by_name() -> None:
    own = {"glm4": Glm4Format(BOUNDARY)}
    assert formats.by_name("glm4", own) is own["glm4"]
    assert isinstance(formats.by_name("hermes", own), HermesFormat)
    assert isinstance(formats.by_name("llama3_json", {}), Llama3Format)
    assert isinstance(formats.by_name("mistral", {}), MistralFormat)
    assert formats.by_name("chatglm3", {}) is None  # a family's own format only with the family
    assert formats.by_name("nope", own) is None


# ---- forced calls: the grammars compile for a real tokenizer and hold a call to its tool -------------------------

STRICT_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
STRICT = tool("get_weather", STRICT_PARAMETERS, strict=True)
LOOSE = tool("get_time", TIME_PARAMETERS)  # not strict: any object


def hermes_text(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def llama3_text(name: str, arguments: Any) -> str:
    return json.dumps({"name": name, "parameters": arguments})


def mistral_text(name: str, arguments: Any) -> str:
    return f"[TOOL_CALLS][{json.dumps({'name': name, 'arguments': arguments})}]"


def glm4_text(name: str, arguments: Any) -> str:
    return f"{name}\n{json.dumps(arguments)}"


# a format and how it writes a call; a forced call is spaced as `json.dumps` spaces JSON (models/tools/grammar.py)
FORCED: dict[str, tuple[Any, Any]] = {
    "hermes": (HermesFormat(), hermes_text),
    "llama3": (Llama3Format(), llama3_text),
    "mistral": (MistralFormat(), mistral_text),
    "glm4": (Glm4Format(BOUNDARY), glm4_text),
}


@pytest.mark.parametrize("name", FORCED)
def test_forced_grammar_holds_a_call_to_its_tools(name: str, tiny_lm: LoadedModel) -> None:
    fmt, write = FORCED[name]
    accepted = acceptor(tiny_lm)
    good = write("get_weather", {"city": "Paris", "days": 2})
    both = fmt.forced([STRICT, LOOSE])
    assert accepted(both, good) and accepted(both, write("get_weather", {"city": "Paris"}))
    assert accepted(both, write("get_time", {"anything": [1]}))  # not strict: any object
    assert not accepted(both, write("get_weather", {"town": "Paris"}))  # strict: the schema's properties only
    assert not accepted(both, write("get_weather", {"days": 2}))  # and its required ones
    assert not accepted(both, write("get_weather", {"city": "P" * 13}))  # maxLength
    assert not accepted(both, write("get_wether", {"city": "Paris"}))  # only the tools' names
    assert not accepted(both, "Hello")  # a call, not text
    only = fmt.forced([STRICT])
    assert accepted(only, good) and not accepted(only, write("get_time", {"zone": "UTC"}))
    # nothing may follow the call but the end of the answer
    ids = tiny_lm.tokenizer.encode(good + " more", add_special_tokens=False)
    assert grammar_matcher(tiny_lm, only).ll.validate_tokens(ids) < len(ids)
    # what the answer stream then reads out of the forced text is that call
    stream = fmt.calls([STRICT, LOOSE])
    pieces = stream.push(good)
    pieces.add(stream.segment() if stream.boundary is not None else stream.flush())
    assert pieces.text == "" and whole_calls(pieces.calls) == [("get_weather", {"city": "Paris", "days": 2})]


def grammar_matcher(lm: LoadedModel, grammar: str) -> Any:
    eos = tuple(sorted(lm.eos_token_ids))
    return grammars_for(lm.tokenizer, eos).compile(Constraint("grammar", grammar, "tool_choice")).matcher()


def acceptor(lm: LoadedModel) -> Any:
    """Whether a grammar takes a text's tokens and then the end of the answer."""
    (eos,) = lm.eos_token_ids

    def accepted(grammar: str, text: str) -> bool:
        ids = [*lm.tokenizer.encode(text, add_special_tokens=False), eos]
        return bool(grammar_matcher(lm, grammar).ll.validate_tokens(ids) == len(ids))

    return accepted


# a strict schema as Pydantic writes one for a nested model (and `openai.pydantic_function_tool` sends, strict)
NESTED_PARAMETERS = {
    "type": "object",
    "properties": {"place": {"$ref": "#/$defs/Place"}},
    "required": ["place"],
    "additionalProperties": False,
    "$defs": {
        "Place": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        }
    },
}


@pytest.mark.parametrize("name", ["hermes", "llama3", "mistral", "glm4"])
def test_forced_grammar_takes_a_schema_with_definitions(name: str, tiny_lm: LoadedModel) -> None:
    fmt, write = FORCED[name]
    accepted = acceptor(tiny_lm)
    grammar = fmt.forced([tool("get_weather", NESTED_PARAMETERS, strict=True)])
    assert accepted(grammar, write("get_weather", {"place": {"city": "Paris"}}))
    assert not accepted(grammar, write("get_weather", {"place": {"town": "Paris"}}))


def test_chatglm3_forced_grammar_compiles_and_holds_keywords(tiny_lm: LoadedModel) -> None:
    accepted = acceptor(tiny_lm)
    grammar = ChatGLM3Format(BOUNDARY).forced([STRICT])
    good = 'get_weather\n```python\ntool_call(city="Paris", days=2)\n```'
    assert accepted(grammar, good) and accepted(grammar, good.replace(", days=2", ""))
    assert not accepted(grammar, good.replace("city=", "town="))
    assert not accepted(grammar, good.replace('"Paris"', '"' + "P" * 13 + '"'))
    loose = ChatGLM3Format(BOUNDARY).forced([LOOSE])  # not strict: any keywords with JSON values
    assert accepted(loose, 'get_time\n```python\ntool_call(zone="UTC", extra=[1, true])\n```')
    stream = ChatGLM3Format(BOUNDARY).calls([STRICT])
    pieces = stream.push(good)
    pieces.add(stream.flush())
    assert whole_calls(pieces.calls) == [("get_weather", {"city": "Paris", "days": 2})]


def test_chatglm3_forced_grammar_takes_a_schema_with_definitions(tiny_lm: LoadedModel) -> None:
    grammar = ChatGLM3Format(BOUNDARY).forced([tool("get_weather", NESTED_PARAMETERS, strict=True)])
    call = 'get_weather\n```python\ntool_call(place={"city": "Paris"})\n```'
    assert acceptor(tiny_lm)(grammar, call)


# ---- the markers as the model's tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "answer"),
    [
        (HermesFormat(), W_PARIS),
        (MistralFormat(), f"[TOOL_CALLS][{M_PARIS}]"),
    ],
    ids=["hermes", "mistral"],
)
def test_a_marker_that_is_a_special_token_still_makes_a_call(fmt: Any, answer: str, tiny_lm: LoadedModel) -> None:
    import copy

    from backends.local import special_markers
    from generation.output import Output
    from models.chat_format import PassThrough

    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>", "[TOOL_CALLS]"]})
    ids = tokenizer.encode(answer, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids[0]) in ("<tool_call>", "[TOOL_CALLS]")  # one token, a special one
    markers = dict(special_markers(tokenizer, fmt.markers))  # as the server finds them
    output = Output(tokenizer, [], PassThrough(), [], fmt.calls(TOOLS), markers=markers)
    text, calls = "", list[CallDelta]()
    for i, token in enumerate(ids):
        emitted = output.push(token, last=i == len(ids) - 1)
        text, calls = text + emitted.text, calls + emitted.calls
    assert (text, whole_calls(calls)) == ("", [PARIS])


def test_a_call_the_length_limit_cuts_is_neither_a_call_nor_text() -> None:
    """Markup never reaches the text: a call cut short by max_tokens is dropped; the same call ended by the model
    (its stop token) is read as text, as any malformed call."""
    cut_short = {
        "glm4": (lambda: Glm4Format(BOUNDARY).calls(TOOLS), 'get_weather\n{"city": "Par'),
        "hermes": (lambda: HermesFormat().calls(TOOLS), 'Sure.\n<tool_call>\n{"name": "get_weather", "argu'),
    }
    for make, answer in cut_short.values():
        for cut in (True, False):
            stream = make()
            pieces = stream.push(answer)
            pieces.add(stream.flush(cut))
            assert not pieces.calls
            markup = "get_weather" in pieces.text
            assert markup is not cut, (answer, cut, pieces.text)


def test_half_an_opening_marker_the_length_limit_cuts_is_not_shown() -> None:
    """`<to` at the end of an answer max_tokens cut (a forced call's first tokens) is half a marker: not text. Ended
    by the model, the same end is its text."""
    for cut, shown in ((True, "Sure.\n"), (False, "Sure.\n<to")):
        stream = HermesFormat().calls(TOOLS)
        pieces = stream.push("Sure.\n<to")
        pieces.add(stream.flush(cut))
        assert (pieces.text, pieces.calls) == (shown, [])
    for cut, shown in ((True, ""), (False, "get_wea")):  # GLM: a first line that could still be a tool's name
        glm = Glm4Format(BOUNDARY).calls(TOOLS)
        pieces = glm.push("get_wea")
        pieces.add(glm.flush(cut))
        assert (pieces.text, pieces.calls) == (shown, [])


def test_a_call_nested_deeper_than_json_goes_is_text() -> None:
    """A model's call nested past the JSON parser's depth is no call and no failure: its text, as any malformed one."""
    deep = '{"name": "get_weather", "arguments": {"city": ' + "[" * 5000 + "]" * 5000 + "}}"
    for stream in (HermesFormat().calls(TOOLS), Glm4Format(BOUNDARY).calls(TOOLS)):
        answer = f"<tool_call>\n{deep}\n</tool_call>" if stream.boundary is None else f"get_weather\n{deep[36:-1]}"
        pieces = stream.push(answer)
        pieces.add(stream.flush())
        assert not pieces.calls and not stream.called and pieces.text.strip()
