"""Prompt building, incremental detokenization and stop strings, on the tiny model's real tokenizer."""

from __future__ import annotations

import random

import pytest

from generation.detokenize import REPLACEMENT, IncrementalDecoder, StopMatcher
from generation.prompts import PromptTooLong, fit_chat
from models.chat_format import Message, fallback_prompt
from models.loader import LoadedModel

MIXED = "Hello 你好，世界！🌍🚀 café — 流式输出 👍👌🔥 done."


def stream_text(lm: LoadedModel, ids: list[int], prompt: list[int]) -> list[str]:
    decoder = IncrementalDecoder(lm.tokenizer, prompt)
    deltas = [decoder.push(t) for t in ids]
    deltas.append(decoder.flush())
    return deltas


def test_decoder_never_splits_a_character(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    ids = tok(MIXED, add_special_tokens=False)["input_ids"]
    # the test is only meaningful if some character really spans several tokens
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    deltas = stream_text(tiny_lm, ids, tok("User: hi\nAssistant:")["input_ids"])
    assert "".join(deltas) == MIXED
    assert not any(REPLACEMENT in d for d in deltas)
    assert "" in deltas[:-1]  # bytes were held back until their character was complete


def test_decoder_skips_special_tokens(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    ids = [*tok("你好", add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]
    assert "".join(stream_text(tiny_lm, ids, [])) == "你好"


def test_decoder_drops_an_unfinished_character_at_the_end(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    ids = tok("ab😀", add_special_tokens=False)["input_ids"]
    assert "".join(stream_text(tiny_lm, ids[:-1], [])) == "ab"


@pytest.mark.parametrize("seed", range(5))
def test_stop_matcher_random_chunking(seed: int) -> None:
    rng = random.Random(seed)
    text = "alpha beta STOP gamma"
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        pieces.append(text[i : i + n])
        i += n
    matcher = StopMatcher(["STOP", "zzz"])
    out, hit = "", None
    for piece in pieces:
        emitted, hit = matcher.push(piece)
        out += emitted
        # never a stop string, whole or as a prefix still waiting for its end
        assert "STOP" not in out and not out.endswith(("S", "ST", "STO"))
        if hit:
            break
    assert hit == "STOP"
    assert out == "alpha beta "


def test_stop_matcher_names_the_stop_string_that_starts_first() -> None:
    matcher = StopMatcher(["end", "b", "and"])
    assert matcher.push("x and b") == ("x ", "and")  # "and" starts before "b" and "end" is not there
    assert StopMatcher(["ab", "a"]).push("xab") == ("x", "ab")  # both start at 1: the one listed first


def test_stop_matcher_releases_a_false_start() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("a </e") == ("a ", None)  # held: could still become the stop string
    assert matcher.push("nd") == ("", None)
    assert matcher.push("x") == ("</endx", None)  # released once it cannot
    assert matcher.flush() == ""


def test_stop_matcher_flush_returns_held_text() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.push("answer #") == ("answer ", None)
    assert matcher.flush() == "#"


def test_fit_chat_drops_oldest_rounds_first(tiny_lm: LoadedModel) -> None:
    history = [
        Message("user", f"question {i} " * 8) if j == 0 else Message("assistant", f"answer {i} " * 8)
        for i in range(20)
        for j in range(2)
    ]
    messages = [Message("system", "be brief"), *history, Message("user", "latest question")]
    ids, dropped = fit_chat(tiny_lm.chat, messages, context_length=256, reserve=32)
    assert len(ids) + 32 <= 256
    assert dropped > 0 and dropped % 2 == 0
    prompt = tiny_lm.tokenizer.decode(ids)
    assert "be brief" in prompt and "latest question" in prompt
    assert "question 19" in prompt and "question 0 " not in prompt


def test_fit_chat_rejects_a_query_that_alone_is_too_long(tiny_lm: LoadedModel) -> None:
    with pytest.raises(PromptTooLong, match="maximum context length is 256"):
        fit_chat(tiny_lm.chat, [Message("user", "word " * 400)], context_length=256, reserve=1)


def test_fallback_prompt_format() -> None:
    messages = [Message("system", "S"), Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2")]
    assert fallback_prompt(messages) == "S\n\nUser: Q1\nAssistant: A1\n\nUser: Q2\nAssistant:"


def test_model_without_template_uses_fallback(plain_lm: LoadedModel) -> None:
    ids, _ = fit_chat(plain_lm.chat, [Message("user", "hi")], 256, 1)
    assert plain_lm.tokenizer.decode(ids) == "User: hi\nAssistant:"
