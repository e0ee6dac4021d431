"""Constrained decoding and logprobs on the engine: even a random tiny model answers valid JSON for a schema, one of
the choices, a match of the regex; constrained rows decode beside free ones in one batch without changing them; an
answer cut by max_tokens says "length"; logprobs are the sampled distribution's, their bytes join to the answer."""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import replace
from typing import Any

import jsonschema
import pytest

from engine import Engine
from generation.constraints import ConstraintError, grammars_for
from generation.events import Delta, Failed, Finished, TokenLogprob
from generation.sampling import SamplingParams
from generation.structured import Constraint
from models.loader import LoadedModel

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["红", "绿", "🙂"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tag": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{2,4}$"}]},
        },
        "required": ["ok", "score", "tag"],
        "additionalProperties": False,
    },
]


def run(lm: LoadedModel, jobs: list[SamplingParams], prompt: list[int] | None = None) -> list[dict[str, Any]]:
    """Each job's text, finish reason and logprob entries, all submitted at once to one engine (one batch)."""

    async def go() -> list[dict[str, Any]]:
        engine = Engine(lm)
        engine.start()
        try:
            handles = [engine.submit(prompt or [5, 6, 7], job) for job in jobs]
            results = []
            for handle in handles:
                text, entries, end = "", list[TokenLogprob](), None
                async for event in handle.events(keepalive=60):
                    if isinstance(event, Delta):
                        text += event.text
                        entries += event.logprobs
                    elif isinstance(event, (Finished, Failed)):
                        end = event
                results.append({"text": text, "end": end, "logprobs": entries})
            return results
        finally:
            engine.stop(5)

    return asyncio.run(go())


def compiled(lm: LoadedModel, kind: str, source: str) -> Any:
    grammars = grammars_for(lm.tokenizer, tuple(sorted(lm.eos_token_ids)))
    return grammars.compile(Constraint(kind, source, "response_format"))  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_random_model_answers_valid_json_for_each_schema(tiny_lm: LoadedModel, temperature: float) -> None:
    jobs = [
        SamplingParams(200, temperature, seed=i, constraint=compiled(tiny_lm, "json_schema", json.dumps(schema)))
        for i, schema in enumerate(SCHEMAS)
    ]
    for schema, result in zip(SCHEMAS, run(tiny_lm, jobs), strict=True):
        assert isinstance(result["end"], Finished) and result["end"].reason == "stop", result
        jsonschema.validate(json.loads(result["text"]), schema)


def test_choice_and_regex(tiny_lm: LoadedModel) -> None:
    """(Any JSON object, `json_object`, is left to the bundled model's tests: a random model's strings need not end.)"""
    choices = ["yes", "no", "也许 🙂"]
    jobs = [
        SamplingParams(100, 0.9, seed=2, constraint=compiled(tiny_lm, "choice", json.dumps(choices))),
        SamplingParams(100, 0.9, seed=3, constraint=compiled(tiny_lm, "regex", r"[0-9]{3}-[a-z]{2}")),
    ]
    choice, regex = run(tiny_lm, jobs)
    assert choice["text"] in choices and choice["end"].reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex["text"]) and regex["end"].reason == "stop"


@pytest.mark.parametrize(
    ("kind", "source", "named"),
    [
        ("json_schema", json.dumps({"type": "array", "uniqueItems": True}), "uniqueItems"),
        ("json_schema", json.dumps({"not": {"type": "string"}}), "not"),
        ("regex", "[0-9]{3", "regex"),
        ("grammar", "start: undefined_rule", "undefined_rule"),
    ],
)
def test_what_the_library_cannot_enforce_is_refused_by_name(
    tiny_lm: LoadedModel, kind: str, source: str, named: str
) -> None:
    with pytest.raises(ConstraintError) as refused:
        compiled(tiny_lm, kind, source)
    assert named in refused.value.message and refused.value.param == "response_format"


def test_max_tokens_cutting_an_answer_says_length(tiny_lm: LoadedModel) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 30}}, "required": ["a"]}
    (result,) = run(tiny_lm, [SamplingParams(5, 0.0, constraint=compiled(tiny_lm, "json_schema", json.dumps(schema)))])
    assert result["end"].reason == "length"
    with pytest.raises(ValueError):
        json.loads(result["text"])  # the client learns it is incomplete from "length"


def test_constrained_and_free_rows_in_one_batch(tiny_lm: LoadedModel) -> None:
    free = SamplingParams(24, 0.0, ignore_eos=True)
    (alone,) = run(tiny_lm, [free])
    schema = json.dumps(SCHEMAS[0])
    together = run(
        tiny_lm, [replace(free), SamplingParams(60, 0.0, constraint=compiled(tiny_lm, "json_schema", schema))]
    )
    assert together[0]["text"] == alone["text"]  # the free row's greedy answer is untouched by its neighbour
    jsonschema.validate(json.loads(together[1]["text"]), SCHEMAS[0])


def test_logprobs_are_the_sampled_distributions(tiny_lm: LoadedModel) -> None:
    greedy = SamplingParams(12, 0.0, ignore_eos=True, logprobs=5)
    (result,) = run(tiny_lm, [greedy])
    entries: list[TokenLogprob] = result["logprobs"]
    assert entries
    for entry in entries:
        assert len(entry.top) == 5
        assert entry.top[0].token == entry.token and math.isclose(entry.top[0].logprob, entry.logprob)
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.logprob <= 0
    # a random model's bytes need not be UTF-8: the text shows what does not decode as U+FFFD
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == result["text"]


def test_logprob_bytes_join_to_chinese_and_emoji(tiny_lm: LoadedModel) -> None:
    """Byte-level tokens split these characters: each entry carries its raw bytes, and they join to the text."""
    answer = "你好🙂，世界"
    job = SamplingParams(40, 0.8, seed=4, logprobs=0, constraint=compiled(tiny_lm, "choice", json.dumps([answer])))
    (result,) = run(tiny_lm, [job])
    assert result["text"] == answer
    assert b"".join(bytes(e.bytes) for e in result["logprobs"]) == answer.encode()
    assert any(len(e.bytes) < len(e.token.encode()) or "\ufffd" in e.token for e in result["logprobs"])


# ---- through the OpenAI door ------------------------------------------------------------------------------------


async def test_a_schema_keyword_not_enforced_is_a_400_naming_it(make_client: Any) -> None:
    client = await make_client()
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    body = {
        "messages": [{"role": "user", "content": "numbers"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }
    resp = await client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in error["message"]
    bad_regex = {"messages": body["messages"], "structured_outputs": {"regex": "[0-9"}}
    resp = await client.post("/v1/chat/completions", json=bad_regex)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "structured_outputs.regex"


async def test_a_client_leaving_a_constrained_stream_frees_its_row(make_client: Any, slow_lm: LoadedModel) -> None:
    from api.config import BACKEND
    from tests.helpers import wait_until

    client = await make_client(slow_lm)
    body = {
        "messages": [{"role": "user", "content": "letters"}],
        "structured_outputs": {"regex": "[a-z]+"},
        "ignore_eos": True,
        "max_tokens": 200,
        "stream": True,
    }
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.content.readline()  # the stream runs
    await wait_until(lambda: client.app[BACKEND].counts[0] == 1)
    resp.close()  # the client goes away mid-answer
    await wait_until(lambda: client.app[BACKEND].counts == (0, 0), within=5)
    # and the next constrained request is served in its place
    done = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5})
    answer = (await done.json())["choices"][0]["message"]["content"]
    assert re.fullmatch("[a-z]+", answer)


async def test_a_constrained_prompt_prefilled_in_chunks(make_client: Any) -> None:
    """The first token of a prompt prefilled in several chunks is sampled under the constraint too."""
    client = await make_client(prefill_chunk=8, prefill_seconds=10.0)
    body = {
        "messages": [{"role": "user", "content": "a long prompt " * 6}],
        "structured_outputs": {"regex": "[0-9]{4}"},
        "max_tokens": 10,
    }
    resp = await client.post("/v1/chat/completions", json=body)
    done = await resp.json()
    assert resp.status == 200, done
    assert done["usage"]["prompt_tokens"] > 3 * 8  # it took several chunks
    assert re.fullmatch("[0-9]{4}", done["choices"][0]["message"]["content"])
    assert done["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kind", ["chatglm3-6b", "glm-4-9b-chat"])
def test_chatglm_models_answer_valid_json_through_their_own_tokenizers(kind: str, tmp_path: Any) -> None:
    """ChatGLM3's SentencePiece and GLM-4's tiktoken vocabularies are read by the grammar library through their
    tokens' bytes: a random model of each answers JSON that fits the schema, Chinese and emoji included."""
    from generation.prepare import load_model
    from models.loader import ModelConfig
    from tests.glm2 import write_checkpoint

    lm = load_model(ModelConfig(path=write_checkpoint(tmp_path / kind, kind), device="cpu", dtype="float32"))
    schemas = SCHEMAS[:2]
    jobs = [
        SamplingParams(200, 0.7, seed=i, constraint=compiled(lm, "json_schema", json.dumps(schema)))
        for i, schema in enumerate(schemas)
    ]
    for schema, result in zip(schemas, run(lm, jobs), strict=True):
        assert isinstance(result["end"], Finished) and result["end"].reason == "stop", result
        jsonschema.validate(json.loads(result["text"]), schema)


async def test_chatglm6b_answers_valid_json_through_its_own_tokenizer(make_client: Any, glm_lm: LoadedModel) -> None:
    """ChatGLM-6B's tokenizer lists its tokens' bytes (its whitespace pieces as the whitespace they stand for), so the
    grammar library holds its answers too: the random golden model answers each schema, Chinese and emoji included,
    through the OpenAI door (its answer post-processing left the JSON whole)."""
    client = await make_client(glm_lm)
    for seed, schema in enumerate(SCHEMAS[:2] * 2):
        form = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        body = {"messages": [{"role": "user", "content": "你好"}], "response_format": form, "max_tokens": 200}
        resp = await client.post("/v1/chat/completions", json={**body, "temperature": 0.7, "seed": seed})
        done = await resp.json()
        assert resp.status == 200, done
        (choice,) = done["choices"]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
