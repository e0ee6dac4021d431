"""ChatGLM-6B's tokenizer, prompt format and answer post-processing against the original's golden outputs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.chat_format import ChatRejected, Message
from models.chatglm.chatglm6b_chat import ChatGLM6BFormat, ResponseStream, build_prompt, process_response, to_rounds
from models.chatglm.chatglm6b_tokenizer import ChatGLMTokenizer, clean_up_tokenization, preprocess
from tests.glm import GOLDEN, golden

TOKENIZER_CASES = golden("tokenizer_cases.json")


@pytest.fixture(scope="module")
def tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer(GOLDEN / "ice_text.model")


@pytest.mark.parametrize("case", TOKENIZER_CASES["cases"], ids=lambda c: repr(c["text"][:24]))
def test_encode_and_decode_are_the_originals(case: dict[str, Any], tokenizer: ChatGLMTokenizer) -> None:
    assert preprocess(case["text"]) == case["preprocessed"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tokenizer.convert_ids_to_tokens(case["ids_no_special"]) == case["tokens"]
    assert tokenizer.encode(case["text"]) == case["ids"]  # `[gMASK] <sop>` appended
    assert tokenizer.decode(case["ids_no_special"]) == case["decode_ids_no_special"]
    assert tokenizer.decode(case["ids"]) == case["decode_ids"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decode_ids_skip_special"]
    assert tokenizer.decode(case["ids"], clean_up_tokenization_spaces=False) == case["decode_ids_no_cleanup"]


def test_special_pieces_decode_like_the_originals(tokenizer: ChatGLMTokenizer) -> None:
    for token, text in TOKENIZER_CASES["decode_single_special_ids"].items():
        assert tokenizer.decode([int(token)]) == text
    meta = TOKENIZER_CASES["meta"]
    assert tokenizer.vocab_size == meta["tokenizer_vocab_size"]
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id] == (
        meta["all_special_ids"][:4]
    )


def test_the_image_token_offset_shifts_every_id(tokenizer: ChatGLMTokenizer) -> None:
    shifted = ChatGLMTokenizer(GOLDEN / "ice_text.model", num_image_tokens=20000)
    variant = TOKENIZER_CASES["num_image_tokens_20000_variant"]
    for case in (c for c in variant if "text" in c):
        assert shifted.encode(case["text"]) == case["ids"]
        assert shifted.decode(case["ids"]) == case["decode"]
        assert shifted.vocab_size == case["vocab_size"]
    # ids below the offset are image tokens and read as their names
    assert shifted.decode([5, 19999, 20424]) == variant[-1]["decode_of_ids_below_offset_dropped"]


@pytest.mark.parametrize("case", TOKENIZER_CASES["chat_prompts"], ids=lambda c: f"{len(c['history'] or [])}-rounds")
def test_chat_prompts_are_the_originals(case: dict[str, Any], tokenizer: ChatGLMTokenizer) -> None:
    history = [tuple(pair) for pair in case["history"] or []]
    assert build_prompt(case["query"], history) == case["prompt_text"]
    messages = [Message(role, text) for q, a in history for role, text in (("user", q), ("assistant", a))]
    assert ChatGLM6BFormat(tokenizer).encode([*messages, Message("user", case["query"])]) == case["input_ids"][0]


@pytest.mark.parametrize("case", TOKENIZER_CASES["process_response"], ids=lambda c: repr(c["in"]))
def test_answers_are_post_processed_like_the_originals(case: dict[str, str]) -> None:
    assert process_response(case["in"]) == case["out"]
    # streamed one character at a time, after the decode clean-up the original also applied before it
    stream = ResponseStream()
    streamed = "".join(stream.push(ch) for ch in case["in"]) + stream.flush()
    assert streamed == process_response(clean_up_tokenization(case["in"]))


TRICKY = [*list(" \n\t,!:;?.'ntmsvre中文a[]训练时间😀年"), "[[训练时间]]", " n't", " 's", " ' "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(TRICKY), max_size=6).map("".join), max_size=12))
def test_streamed_answers_equal_the_whole_answer_processed(pieces: list[str]) -> None:
    """However decoded text arrives, the deltas concatenate to what the original makes of the whole text."""
    stream = ResponseStream()
    deltas = [stream.push(piece) for piece in pieces] + [stream.flush()]
    assert "".join(deltas) == process_response(clean_up_tokenization("".join(pieces)))


def test_a_conversation_becomes_rounds() -> None:
    messages = [
        Message("system", "be brief"),
        Message("user", "a"),
        Message("user", "b"),
        Message("assistant", "c"),
        Message("assistant", "d"),
        Message("user", "e"),
    ]
    assert to_rounds(messages) == ("be brief", [("a\nb", "c"), ("", "d")], "e")
    with pytest.raises(ChatRejected):
        to_rounds([Message("user", "a"), Message("assistant", "b")])


def test_a_system_message_leads_the_prompt(tokenizer: ChatGLMTokenizer) -> None:
    ids = ChatGLM6BFormat(tokenizer).encode([Message("system", "be brief"), Message("user", "你好")])
    assert ids == tokenizer.encode("be brief\n你好")
