"""Teaching a tiny model a behaviour in the test that needs it: a few hundred optimizer steps on CPU make it emit a
fixed continuation for each of a few prompts. `learned` checks with `generate` that it did, before a server test
relies on it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from generation.prepare import load_model
from models.loader import LoadedModel, ModelConfig
from models.tools.hermes import HermesFormat

Examples = Sequence[tuple[Sequence[int], Sequence[int]]]  # (prompt ids, the continuation to learn)

# A Hermes / Qwen2.5-style template, small: the tools in a `<tools>` system turn, calls as `<tool_call>` blocks,
# results as `<tool_response>` user turns
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for call in m.tool_calls or [] %}<tool_call>\n"
    '{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def teach(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], steps: int = 300) -> float:
    """Train `model` in place so that each prompt is followed by its continuation (the loss counts only the
    continuation's tokens); returns the last loss. The model goes back to inference mode afterwards."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=3e-3)
    batches = []
    for prompt, continuation in examples:
        ids = torch.tensor([[*prompt, *continuation]])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        batches.append((ids, labels))
    model.train(True)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum((model(input_ids=ids, labels=labels).loss for ids, labels in batches), torch.tensor(0.0))
            loss.backward()
            optimizer.step()
    model.train(False)
    for p in params:
        p.requires_grad_(False)
    return float(loss.detach()) / len(batches)


def generate(model: Any, prompt: Sequence[int], stops: set[int], max_new: int = 200) -> list[int]:
    """Greedy continuation of `prompt` with transformers' own `generate`, up to and without a stop token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=sorted(stops)[0],
        )
    new = [int(t) for t in out[0, len(prompt) :]]
    return new[:-1] if new and new[-1] in stops else new


def learned(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], stops: set[int]) -> bool:
    """Whether greedy decoding gives each prompt its continuation (a trailing stop token is not compared)."""
    for prompt, continuation in examples:
        want = [t for t in continuation if t not in stops]
        if generate(model, prompt, stops, len(continuation) + 2) != want:
            return False
    return True


def hermes_model(folder: Path) -> LoadedModel:
    """The tiny model in `folder` given the Hermes template (its tool format is read off the template's text), loaded
    with float32 weights a test can train."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = HERMES_TEMPLATE
    tokenizer.save_pretrained(folder)
    lm = load_model(ModelConfig(path=folder, device="cpu", dtype="float32", quantize=16))
    assert isinstance(lm.chat.tool_format, HermesFormat)
    return lm


def taught(lm: LoadedModel, examples: Examples, steps: int = 25, rounds: int = 8) -> LoadedModel:
    """`lm` taught its examples in rounds of `steps`, checked with `generate` after each (a few more steps where the
    first fall short), on one thread (a tiny model trains fastest so); the test fails if it never learns them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            teach(lm.model, examples, steps)
            if learned(lm.model, examples, set(lm.eos_token_ids)):
                return lm
    finally:
        torch.set_num_threads(threads)
    pytest.fail("the tiny model did not learn its answers")
