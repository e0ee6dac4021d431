"""Does quantization keep the answers? 20 short factual questions, greedy, on the bundled model (or --model), in
float32 and at the defaults (the weight format and kernels measured fastest on this CPU), --quantize 16 (the default
dtype), 8 and 4; an answer is right when it holds the expected word. A finer measure beside it: float32's own
answers fed back token by token through each configuration's decode steps (teacher forcing), and how often its
top token is float32's (top-1 agreement) and how far its distribution is (mean KL divergence, nats a token).

    .venv/bin/python bench/quality.py

Writes bench/results/quality_<instruction set>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
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


@dataclass
class Reference:
    """float32's greedy answers and its log-probabilities at each of their tokens."""

    ids: list[list[int]]
    logprobs: list[Any]  # per question: [tokens, V] float16


def answers(
    model: Path | None, dtype: str, quantize: int | None, tokens: int, reference: Reference | None
) -> tuple[list[str], Reference, dict[str, Any]]:
    """Greedy answers (text, and ids with their log-probabilities); against `reference`'s answers fed back token by
    token through the decode steps: how often the top token is the reference's, and the mean KL divergence."""
    import torch

    from generation.batch import KVBatch, decode_step, prefill
    from generation.prepare import load_model
    from models.chat_format import Message
    from models.loader import ModelConfig, default_cache_dir

    lm = load_model(ModelConfig(model, "cpu", quantize=quantize, cache_dir=default_cache_dir(), dtype=dtype))
    texts, own = [], Reference([], [])
    agree = total = 0
    divergence = 0.0
    with torch.inference_mode():
        for i, (question, _) in enumerate(QUESTIONS):
            prompt = lm.chat.encode([Message("user", question)])
            forced = None if reference is None else reference.ids[i]
            batch = KVBatch()
            logits, cache, mask = prefill(lm, [prompt])
            batch.add(cache, mask)
            ids: list[int] = []
            steps = []
            while True:
                steps.append(torch.log_softmax(logits[0].float(), dim=-1))
                token = int(logits[0].argmax())
                if forced is not None:
                    want = reference.logprobs[i][len(ids)].float() if reference is not None else None
                    assert want is not None
                    agree += token == forced[len(ids)]
                    divergence += float((want.exp() * (want - steps[-1])).sum())
                    total += 1
                    token = forced[len(ids)]
                ids.append(token)
                done = len(ids) == len(forced) if forced is not None else token in lm.eos_token_ids
                if done or len(ids) >= tokens:
                    break
                logits = decode_step(lm, batch, [token])
            answer = ids if forced is not None or ids[-1] not in lm.eos_token_ids else ids[:-1]
            texts.append(str(lm.tokenizer.decode(answer, skip_special_tokens=True)))
            own.ids.append(ids)
            own.logprobs.append(torch.stack(steps).half())
    measured: dict[str, Any] = {"bits": lm.bits, "dtype": lm.dtype, "kernels": lm.kernels}
    if reference is not None:
        measured.update(top1_agreement=round(agree / total, 4), mean_kl_nats=round(divergence / total, 5))
    return texts, own, measured


def right(answer: str, words: list[str]) -> bool:
    """The expected word as a word of its own: "7" in "129.99997" or "0" in "-18.000" is no answer."""
    return any(re.search(rf"(?<![\w.]){re.escape(w)}(?!\w)(?!\.\d)", answer.lower()) for w in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="default: the bundled model")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--dtype", default="auto", help="the dtype of every configuration but float32 (default: auto)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    import torch

    runs: dict[str, Any] = {}
    reference: Reference | None = None
    d = args.dtype
    configs = [("float32", "float32", 16), ("defaults", d, None), ("16", d, 16), ("8", d, 8), ("4", d, 4)]
    for name, dtype, quantize in configs:
        got, ids, measured = answers(args.model, dtype, quantize, args.tokens, reference)
        if reference is None:  # float32's answers, its end token included: the others are held to it too
            reference = ids
        runs[name] = {"answers": got, "right": [right(a, w) for a, (_, w) in zip(got, QUESTIONS, strict=True)]}
        runs[name].update(measured)
        print(json.dumps({name: {k: v for k, v in runs[name].items() if k not in ("answers", "kernels")}}), flush=True)
    expected = runs["float32"]["right"]
    summary: dict[str, Any] = {"float32_right": sum(expected)}
    for name in ("defaults", "16", "8", "4"):
        kept = sum(r and ref for r, ref in zip(runs[name]["right"], expected, strict=True))
        summary[name] = {
            "bits": runs[name]["bits"],
            "dtype": runs[name]["dtype"],
            "right": sum(runs[name]["right"]),
            "keeps_of_float32_right": kept,
            "top1_agreement": runs[name]["top1_agreement"],
            "mean_kl_nats": runs[name]["mean_kl_nats"],
        }
    print(json.dumps(summary, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    isa = torch.backends.cpu.get_cpu_capability().lower()
    report = {"command": " ".join(sys.argv), "cpu": isa, "summary": summary, "questions": [q for q, _ in QUESTIONS]}
    suffix = "" if d == "auto" else f"_{d}"
    (args.out / f"quality_{isa}{suffix}.json").write_text(json.dumps({**report, **runs}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
