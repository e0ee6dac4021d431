"""OpenAI legacy completions (`POST /v1/completions`), driven by the official `openai` SDK against a live server, in
process where the engine must be watched (disconnects, faults), and through an `--upstream` server in front of it."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from hypothesis import strategies as st

from api.config import BACKEND
from api.openapi import build_spec
from models.loader import LoadedModel
from tests.api.test_operations import JSON_VALUES, RaisesOnMarker
from tests.api.test_schema import branches
from tests.conftest import LiveServer, MakeClient
from tests.helpers import fuzz, parse_frames, wait_until

PROMPT = "The quick brown fox"
OTHER = "Paris is the capital of"
JSON = {"Content-Type": "application/json"}
SPEC = build_spec(("tiny",))
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the tiny model's special tokens (tests/conftest.py)
PARTIAL = re.compile(r"bytes:(\\x[0-9a-f]{2})+")  # OpenAI's spelling of a token that is not UTF-8 on its own
LOGPROBS_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.fixture(scope="module")
def client(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 24}
    return client.completions.create(**{**args, **kwargs})


def streamed_text(chunks: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts


def test_answer_and_usage(client: openai.OpenAI, tiny_server: LiveServer) -> None:
    done = greedy(client)
    assert done.id.startswith("cmpl-") and done.object == "text_completion" and done.model == "tiny"
    (choice,) = done.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 24
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # the prompt is raw text: its tokens are the prompt's own, no chat template around them
    assert done.usage.prompt_tokens == tiny_server.post("/tokenize", {"prompt": PROMPT})["count"]
    chat = tiny_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
    assert chat["usage"]["prompt_tokens"] > done.usage.prompt_tokens


def test_max_tokens_gives_length_and_the_legacy_default_is_16(client: openai.OpenAI) -> None:
    done = greedy(client, max_tokens=7, extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 7
    assert done.usage.total_tokens == done.usage.prompt_tokens + 7
    default = client.completions.create(model="tiny", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert default.usage is not None and default.usage.completion_tokens == 16
    assert default.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    done = greedy(client, extra_body={"ignore_eos": True})
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert streamed_text(chunks) == {0: done.choices[0].text}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [done.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage


def test_prompts_and_choices_in_openais_order(client: openai.OpenAI) -> None:
    alone = [greedy(client, prompt=p, extra_body={"ignore_eos": True}) for p in (PROMPT, OTHER)]
    assert alone[0].choices[0].text != alone[1].choices[0].text
    done = greedy(client, prompt=[PROMPT, OTHER], n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    expected = [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert [c.text for c in done.choices] == expected
    assert done.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # each prompt once
    assert done.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    chunks = list(greedy(client, prompt=[PROMPT, OTHER], n=2, stream=True, extra_body={"ignore_eos": True}))
    assert streamed_text(chunks) == dict(enumerate(expected))
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2, 3]


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    plain = greedy(client).choices[0].text
    done = greedy(client, prompt=[PROMPT, OTHER], echo=True)
    assert done.choices[0].text == PROMPT + plain
    assert done.choices[1].text.startswith(OTHER)
    chunks = list(greedy(client, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT  # the first chunk of the choice
    assert streamed_text(chunks) == {0: PROMPT + plain}


def test_stop_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    # a stop string taken from the middle of the greedy answer: the answer must end right before its first place
    stop = next(full[i : i + 2] for i in range(6, len(full) - 2) if full[i : i + 2].strip())
    cut = full.index(stop)
    done = greedy(client, max_tokens=40, stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.text == full[:cut] and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    chunks = list(greedy(client, max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert streamed_text(chunks) == {0: full[:cut]}
    last = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [(c.finish_reason, c.model_extra["stop_reason"]) for c in last] == [("stop", stop)]
    length = greedy(client, max_tokens=3, extra_body={"ignore_eos": True}).choices[0]
    assert length.model_extra["stop_reason"] is None


def test_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    done = greedy(client, logprobs=2, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    lp = choice.logprobs
    n = done.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(choice.text)
    shown = [(t, o) for t, o in zip(lp.tokens, lp.text_offset, strict=True) if t not in SPECIAL]  # the text has none
    for token, offset in shown:
        if not PARTIAL.fullmatch(token):  # a token holding part of a character is spelled by its bytes
            assert choice.text[offset : offset + len(token)] == token
    if not any(PARTIAL.fullmatch(t) for t, _ in shown):
        assert "".join(t for t, _ in shown) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[token] == logprob <= 0  # the two likeliest, and the token itself
        assert logprob == max(top.values())  # greedy: the chosen token is the likeliest
    chunks = list(greedy(client, logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets go on across chunks
    assert [c.choices[0].logprobs for c in chunks if c.choices[0].finish_reason] == [None]


STOPS = ["aQ", "eZ", "oX", "tY"]  # stop strings the tiny model's gibberish often begins
SEEDED: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "temperature": 1, "stop": STOPS}


def seeded_choices(client: openai.OpenAI, logprobs: int, seeds: range, stream: bool) -> list[tuple[str, Any]]:
    """Each seed's text and legacy logprobs, streamed (the chunks joined) or not."""
    out = []
    for seed in seeds:
        args: dict[str, Any] = {**SEEDED, "logprobs": logprobs, "seed": seed}
        if not stream:
            choice = client.completions.create(**args).choices[0]
            out.append((choice.text, choice.logprobs))
            continue
        chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
        joined = {key: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, key)] for key in LOGPROBS_KEYS}
        out.append(("".join(c.text for c in chunks), SimpleNamespace(**joined)))
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_offsets_point_at_the_tokens_when_stop_strings_hold_text_back(client: openai.OpenAI, stream: bool) -> None:
    # sampled gibberish with stop strings that often begin to match: the engine holds a token's text back while a
    # stop string may still follow, so its logprob entry goes out before its text does
    checked = 0
    for text, lp in seeded_choices(client, 1, range(10), stream):
        assert lp.text_offset == sorted(lp.text_offset)
        for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
            if token in SPECIAL or PARTIAL.fullmatch(token):  # not in the text as it is written here
                continue
            shown = text[offset : offset + len(token)]
            # the last tokens' text may be cut short by the stop string that followed
            assert shown == token or (offset + len(token) > len(text) and token.startswith(shown)), (
                text,
                list(zip(lp.tokens, lp.text_offset, strict=True)),
            )
            checked += 1
    assert checked > 200


def test_top_logprobs_keep_every_alternative(client: openai.OpenAI) -> None:
    # byte tokens of one character all decode to U+FFFD: spelled as OpenAI spells them, none hides another
    first = greedy(client, logprobs=5, max_tokens=60, extra_body={"ignore_eos": True}).choices[0]
    choices = [(first.text, first.logprobs), *seeded_choices(client, 5, range(4), stream=False)]
    partial = 0
    for _, lp in choices:
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert top[token] == logprob and "\ufffd" not in token + "".join(top)
            # the five likeliest, and the sampled token too where it is not among them (the least likely then)
            assert len(top) == 5 or (len(top) == 6 and logprob == min(top.values())), (token, top)
            partial += sum(1 for alt in top if PARTIAL.fullmatch(alt))
    assert partial > 0  # the probe did meet tokens holding part of a character
    assert len(choices[0][1].top_logprobs[0]) == 5  # greedy: the sampled token is the likeliest


def test_stream_options_without_a_stream_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stream_options") as info:
        greedy(client, stream_options={"include_usage": True})
    assert info.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        greedy(client, stream=False, stream_options={"include_usage": False})


def test_suffix_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="suffix") as info:
        greedy(client, suffix="THE END")
    assert info.value.param == "suffix"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        greedy(client, model="gpt-3.5-turbo-instruct")
    assert info.value.code == "model_not_found" and info.value.param == "model"


BAD = [
    ({}, "prompt", "required"),
    ({"prompt": [1, 2, 3]}, "prompt", "only text prompts"),
    ({"prompt": [[1, 2]]}, "prompt", "only text prompts"),
    ({"prompt": []}, "prompt", "non-empty"),
    ({"prompt": ""}, "prompt", "no tokens"),
    ({"prompt": "word " * 400}, "prompt", "maximum context length"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "fill in the middle"),
    ({"prompt": "x", "best_of": 2}, "best_of", "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo", "logprobs"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    ({"prompt": "x", "n": 9}, "n", "between 1 and 8"),
    ({"prompt": ["a"] * 5, "n": 8}, "n", "32 choices"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "between 1"),
    ({"prompt": "x", "max_tokens": 100_000}, "max_tokens", "at most"),
    ({"prompt": "x", "temperature": 3}, "temperature", "at most 2"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "99999"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, "messages", "refused"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ({"prompt": "x", "model": "nope"}, "model", "does not exist"),
]


@pytest.mark.parametrize(("body", "param", "says"), BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
async def test_bad_bodies_are_refused_naming_the_field(
    make_client: MakeClient, body: dict[str, Any], param: str, says: str
) -> None:
    client = await make_client()
    resp = await client.post("/v1/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == (404 if param == "model" else 400), error
    assert error["param"] == param and says in error["message"]
    assert error["type"] == ("not_found_error" if param == "model" else "invalid_request_error")


FIELDS = ["prompt", "model", "max_tokens", "temperature", "n", "stop", "stream", "echo", "logprobs", "suffix"]
FIELDS += ["best_of", "logit_bias", "stream_options", "seed", "user", "top_k", "min_tokens", "ignore_eos"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | JSON_VALUES


def short(body: Any) -> Any:
    """A body whose max_tokens is cut to 64 keeps the run short; a body that generates is still one that does."""
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
        return {**body, "max_tokens": 64}
    return body


async def test_fuzzed_bodies_never_cause_a_5xx(make_client: MakeClient) -> None:
    def refused(status: int, answer: Any) -> None:
        assert "error" in answer, answer

    await fuzz(await make_client(), "/v1/completions", BODIES.map(short), refused, examples=80)


async def test_raw_sse_framing(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/completions", json=body)
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    raw = await resp.read()
    frames = parse_frames(raw)
    assert all(event is None for event, _ in frames) and raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and len({c["id"] for c in chunks}) == 1
    last = chunks[-2]["choices"][0]
    assert last["finish_reason"] in ("stop", "length") and "stop_reason" in last
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


async def test_stream_disconnect_stops_every_choice(make_client: MakeClient, slow_lm: LoadedModel) -> None:
    client = await make_client(slow_lm)  # 200 tokens take over 4 s: only a cancellation ends them within 2 s
    engine = client.app[BACKEND]
    body = {"prompt": [PROMPT, OTHER], "n": 2, "max_tokens": 200, "stream": True, "ignore_eos": True}
    resp = await client.post("/v1/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    await resp.content.readuntil(b"\n\n")
    assert sum(engine.counts) == 4  # all four choices were opened before the first chunk; some may still wait
    resp.close()
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


async def test_a_refused_prompt_stops_the_choices_of_those_before_it(
    make_client: MakeClient, slow_lm: LoadedModel
) -> None:
    client = await make_client(slow_lm)
    engine = client.app[BACKEND]
    body = {"prompt": [PROMPT, ""], "max_tokens": 200, "ignore_eos": True}  # the second holds no tokens: a 400
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"
    await wait_until(lambda: engine.counts == (0, 0), within=2.0)


async def test_a_failure_mid_stream_is_an_error_chunk_then_done(make_client: MakeClient, tiny_lm: LoadedModel) -> None:
    marker = tiny_lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    faulty = dataclasses.replace(tiny_lm, model=RaisesOnMarker(tiny_lm.model, marker), lean_decode=False)
    client = await make_client(faulty)
    body = {"prompt": "boom <|endoftext|>", "max_tokens": 5, "stream": True}
    frames = parse_frames(await (await client.post("/v1/completions", json=body)).read())
    assert frames[-1] == (None, "[DONE]")
    error = json.loads(frames[-2][1])["error"]
    assert "injected fault" in error["message"]
    plain = await client.post("/v1/completions", json={**body, "stream": False})
    assert plain.status == 500 and "injected fault" in (await plain.json())["error"]["message"]


# ---- through an --upstream server in front of the live one ----------------------------------------------------------


def test_the_same_completion_directly_and_through_an_upstream_server(
    client: openai.OpenAI, tiny_upstream: LiveServer
) -> None:
    with openai.OpenAI(base_url=tiny_upstream.url + "/v1", api_key="unused", max_retries=0) as through:
        direct = greedy(client, extra_body={"ignore_eos": True})
        done = greedy(through, model="up", extra_body={"ignore_eos": True})
        assert done.choices[0].text == direct.choices[0].text and done.usage == direct.usage
        chunks = list(greedy(through, model="up", stream=True, extra_body={"ignore_eos": True}))
        assert streamed_text(chunks) == {0: direct.choices[0].text}
        full = direct.choices[0].text
        stop = next(full[i : i + 2] for i in range(6, len(full) - 2) if full[i : i + 2].strip())
        stopped = greedy(through, model="up", stop=stop, extra_body={"ignore_eos": True}).choices[0]
        assert stopped.text == full[: full.index(stop)] and stopped.model_extra["stop_reason"] == stop


# ---- the published body (tests/api/test_schema.py checks the parser agrees with it on every number) -----------------

LEGACY = SPEC["components"]["schemas"]["LegacyCompletionRequest"]
NUMERIC = [
    f for f, p in LEGACY["properties"].items() if any(b.get("type") in ("integer", "number") for b in branches(p))
]


def test_the_door_is_published() -> None:
    assert {"logprobs", "best_of", "n", "max_tokens", "seed"} <= set(NUMERIC)
    body = SPEC["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/LegacyCompletionRequest"}
    assert LEGACY["required"] == ["prompt"] and LEGACY["properties"]["max_tokens"]["default"] == 16
    assert "LegacyCompletion" in SPEC["components"]["schemas"]
