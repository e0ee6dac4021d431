"""Does quantization keep the answers? 20 short factual questions, greedy, on the bundled model (or --model), in
float32 and at --quantize 16 (the default dtype), 8 and 4; an answer is right when it holds the expected word.

    .venv/bin/python bench/quality.py

Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("How many days are in a week?", ["7", "seven"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("Which gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is the chemical formula of water?", ["h2o"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the capital of Italy?", ["rome"]),
    ("How many continents are there on Earth?", ["7", "seven"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What language is spoken in Spain?", ["spanish"]),
    ("At how many degrees Celsius does water boil at sea level?", ["100"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the tallest mountain in the world?", ["everest"]),
]


def answers(model: Path | None, dtype: str, quantize: int | None, tokens: int) -> list[str]:
    import torch

    from batch import KVBatch, decode_step, prefill
    from loader import ModelConfig, default_cache_dir, load_model
    from text import Message

    lm = load_model(ModelConfig(model, "cpu", quantize=quantize, cache_dir=default_cache_dir(), dtype=dtype))
    out = []
    with torch.inference_mode():
        for question, _ in QUESTIONS:
            batch = KVBatch()
            logits, cache, mask = prefill(lm, [lm.chat.encode([Message("user", question)])])
            batch.add(cache, mask)
            token, tokens_out = int(logits[0].argmax()), list[int]()
            while token not in lm.eos_token_ids and len(tokens_out) < tokens:
                tokens_out.append(token)
                token = int(decode_step(lm, batch, [token])[0].argmax())
            out.append(str(lm.tokenizer.decode(tokens_out, skip_special_tokens=True)))
    return out


def right(answer: str, words: list[str]) -> bool:
    """The expected word as a word of its own: "7" in "129.99997" or "0" in "-18.000" is no answer."""
    return any(re.search(rf"(?<![\w.]){re.escape(w)}(?!\w)(?!\.\d)", answer.lower()) for w in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="default: the bundled model")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    runs: dict[str, Any] = {}
    for name, dtype, quantize in [("float32", "float32", 16), ("16", "auto", 16), ("8", "auto", 8), ("4", "auto", 4)]:
        got = answers(args.model, dtype, quantize, args.tokens)
        runs[name] = {"answers": got, "right": [right(a, w) for a, (_, w) in zip(got, QUESTIONS, strict=True)]}
    reference = runs["float32"]["right"]
    summary = {"float32_right": sum(reference)}
    for name in ("16", "8", "4"):
        kept = sum(r and ref for r, ref in zip(runs[name]["right"], reference, strict=True))
        summary[f"quantize_{name}_right"] = sum(runs[name]["right"])
        summary[f"quantize_{name}_keeps_of_float32_right"] = kept
    print(json.dumps(summary, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "summary": summary, "questions": [q for q, _ in QUESTIONS], **runs}
    (args.out / "quality.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
