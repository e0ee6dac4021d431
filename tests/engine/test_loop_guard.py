"""The loop guard on a model taught to loop: held to a schema with an open array, it writes `7,` for ever. With the
guard off its answer is cut by max_tokens; by default the guard lets the loop run until half the budget, then the
model closes the array and its JSON validates; `--loop-guard on` closes it within a few tokens. A list that ends
before half the budget is the model's own with the default guard, and a free row beside a guarded one answers as
alone. A regex answer is not guarded: repetition may be what it asks for."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from engine import Engine, EngineConfig
from generation.constraints import grammars_for
from generation.events import Delta, Failed, Finished
from generation.loop_guard import FROM_THE_START
from generation.prepare import load_model
from generation.sampling import SamplingParams
from generation.structured import Constraint
from models.loader import LoadedModel, ModelConfig
from tests.training import learned, teach

# an open array of sevens: after each 7 the model chooses between "," (once more) and "]" (done); the guard lowers
# the "," (a digit it never lowers), and `const` keeps the over-taught model from writing 77, 97, … instead
SCHEMA = {"type": "object", "properties": {"xs": {"type": "array", "items": {"const": 7}}}, "required": ["xs"]}
LOOP = '{"xs":[' + "7," * 40


@pytest.fixture(scope="module")
def looping(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, list[int]]:
    """A tiny model of its own (the shared one stays untrained) that answers "numbers" with LOOP, and that prompt."""
    folder = tmp_path_factory.mktemp("looping")
    shutil.copytree(tiny_dir, folder, dirs_exist_ok=True)
    lm = load_model(ModelConfig(path=folder, device="cpu", dtype="float32", quantize=16))
    prompt = lm.tokenizer.encode("numbers:", add_special_tokens=False)
    end = min(lm.eos_token_ids)  # taught to end there, so `learned` can compare; the grammar never lets it
    examples = [(prompt, [*lm.tokenizer.encode(LOOP, add_special_tokens=False), end])]
    for _ in range(8):
        teach(lm.model, examples, 40)
        if learned(lm.model, examples, set(lm.eos_token_ids)):
            return lm, prompt
    pytest.fail("the tiny model did not learn to loop")


def answers(
    lm: LoadedModel, prompt: list[int], jobs: list[SamplingParams], config: EngineConfig
) -> list[tuple[str, str]]:
    """The text and finish reason of each job, all submitted at once to one engine (one batch)."""

    async def go() -> list[tuple[str, str]]:
        engine = Engine(lm, config)
        engine.start()
        try:
            handles = [engine.submit(prompt, job) for job in jobs]
            results = []
            for handle in handles:
                text, reason = "", ""
                async for event in handle.events(keepalive=60):
                    if isinstance(event, Delta):
                        text += event.text
                    elif isinstance(event, Finished):
                        reason = event.reason
                    elif isinstance(event, Failed):
                        pytest.fail(event.message)
                results.append((text, reason))
            return results
        finally:
            engine.stop(5)

    return asyncio.run(go())


def answer(lm: LoadedModel, prompt: list[int], params: SamplingParams, config: EngineConfig) -> tuple[str, str]:
    (result,) = answers(lm, prompt, [params], config)
    return result


OFF = EngineConfig(loop_guard=None)
FROM_START = EngineConfig(loop_guard=FROM_THE_START)


def constrained(lm: LoadedModel, kind: str, source: str, max_tokens: int) -> SamplingParams:
    """Greedy, held to a constraint."""
    grammars = grammars_for(lm.tokenizer, tuple(sorted(lm.eos_token_ids)))
    constraint = grammars.compile(Constraint(kind, source, "response_format"))  # type: ignore[arg-type]
    return SamplingParams(max_tokens, 0.0, constraint=constraint)


def test_without_the_guard_the_taught_loop_runs_until_max_tokens(looping: tuple[LoadedModel, list[int]]) -> None:
    lm, prompt = looping
    text, reason = answer(lm, prompt, constrained(lm, "json_schema", json.dumps(SCHEMA), 60), OFF)
    assert reason == "length" and text.startswith('{"xs":[7,7,7,7,7,')
    with pytest.raises(ValueError):
        json.loads(text)


def sevens(lm: LoadedModel, text: str) -> int:
    """How many of the answer's tokens were written before the array closed."""
    return len(lm.tokenizer.encode(text[: text.index("]")], add_special_tokens=False))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_by_default_the_loop_runs_to_half_the_budget_then_the_json_closes(
    looping: tuple[LoadedModel, list[int]], temperature: float
) -> None:
    lm, prompt = looping
    free = SamplingParams(20, 0.0, ignore_eos=True)
    (alone,) = answers(lm, prompt, [free], OFF)
    job = replace(constrained(lm, "json_schema", json.dumps(SCHEMA), 60), temperature=temperature, seed=3)
    guarded, beside = answers(lm, prompt, [job, free], EngineConfig())  # the default guard
    assert beside == alone  # the penalties land on the guarded row only
    text, reason = guarded
    assert reason == "stop", text
    document: dict[str, Any] = json.loads(text)
    jsonschema.validate(document, SCHEMA)
    assert text.startswith(LOOP[: text.index("]")])  # the model's own answer until then
    assert sevens(lm, text) >= 30  # untouched for the first half of its 60 tokens


def test_from_the_start_the_guard_closes_the_loop_within_a_few_tokens(
    looping: tuple[LoadedModel, list[int]],
) -> None:
    lm, prompt = looping
    text, reason = answer(lm, prompt, constrained(lm, "json_schema", json.dumps(SCHEMA), 60), FROM_START)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert json.loads(text)["xs"][:3] == [7, 7, 7] and sevens(lm, text) < 20


def test_a_list_that_ends_before_half_the_budget_is_the_models_own(looping: tuple[LoadedModel, list[int]]) -> None:
    # twelve sevens asked for (maxItems): the default guard leaves them be, as guard off does; from the start, the
    # guard takes the repeats for a loop and ends the list early
    lm, prompt = looping
    bounded = {**SCHEMA, "properties": {"xs": {"type": "array", "items": {"const": 7}, "maxItems": 12}}}
    job = constrained(lm, "json_schema", json.dumps(bounded), 200)
    off = answer(lm, prompt, job, OFF)
    assert off == ('{"xs":[' + ",".join(["7"] * 12) + "]}", "stop")
    assert answer(lm, prompt, job, EngineConfig()) == off
    early, reason = answer(lm, prompt, job, FROM_START)
    assert reason == "stop" and len(json.loads(early)["xs"]) < 12


def test_a_regex_answer_may_repeat(looping: tuple[LoadedModel, list[int]]) -> None:
    lm, prompt = looping
    regex = r'\{"xs":\[(7,)*'  # as long as the budget lets it
    text, reason = answer(lm, prompt, constrained(lm, "regex", regex, 30), FROM_START)
    assert reason == "length" and text == LOOP[: len(text)] and text.count("7,") >= 10
