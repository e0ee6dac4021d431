"""llguidance against xgrammar for constrained decoding, on this CPU with the bundled model's tokenizer.

    .venv/bin/python bench/grammar_libs.py [--steps 200] [--load-model] [--json PATH]

A measurement, not a test: nothing here asserts a time. It reads the schema set `bench/schemas.json` (each entry a
JSON schema a user would send in `response_format`, a prompt asking for it and a hand-written valid instance,
`example`), checks every schema with `jsonschema` and both libraries, then measures, for each library:

- building its tokenizer info from the transformers tokenizer (once);
- compiling each schema: the first compile, and a second one (xgrammar's compiler cache; llguidance has none, so
  its second is a new matcher from the kept grammar text, and the per-request copy of a kept matcher is timed too);
- the token mask at batch 1: a matcher per schema walked through the tokens of that schema's `example` (tokenized
  without special tokens, then EOS), a mask before every token; µs per mask, cold (the first matcher after the
  compile) and warm (a second matcher of the same compiled grammar once the first has walked: llguidance builds its
  lexer's states lazily, and the copies of a matcher share them);
- the token mask at batch 16: 16 matchers of 16 different schemas advanced together token by token, a row that
  reaches its end going on with a schema no other row has (so the masks are mid-document masks; the grammars are
  warm, walked above), each step's masks
  computed by a plain loop over the rows and by the library's batch API (`fill_next_token_bitmask_par` with an
  `LLExecutor`; `BatchGrammarMatcher.batch_fill_next_token_bitmask`), both at their default thread counts and at
  one thread per core; every mask checked to allow the token the document goes on with;
- whether the batch mask call releases the GIL: another thread computes 1024 masks in one call while this one
  sleeps 50 µs at a time, and wakes (which needs the GIL) during the call or not;
- applying a [16, vocab] int32 bitmask to float32 logits on the CPU (each library's `apply_token_bitmask_inplace`,
  and numpy's `unpackbits` with torch's `masked_fill_` for reference), checked against the mask bit by bit;
- which JSON-schema keywords each library rejects, enforces or ignores, each alone in a tiny schema under the
  strictest setting (llguidance `lenient: false`, its default; xgrammar `strict_mode=True`, its default) and the
  lax one: a valid and a violating instance are fed to a matcher token by token.

The tokenizer is loaded as models/loader.py loads it for a GGUF file (`AutoTokenizer.from_pretrained` on the
bundled GGUF, no model); `--load-model` loads the whole model through `generation.prepare.load_model` instead
(converted into a temporary cache folder, slower). Results are printed; `--json PATH` also writes them.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMAS = Path(__file__).resolve().parent / "schemas.json"
BATCH = 16

# keyword probes: (label, schema, an instance valid under JSON Schema, one that violates only that keyword)
PROBES: list[tuple[str, dict[str, Any], str, str]] = [
    ("format: email", {"type": "string", "format": "email"}, '"a@b.co"', '"not an email"'),
    ("format: date", {"type": "string", "format": "date"}, '"2025-03-14"', '"14/03/2025"'),
    ("format: date-time", {"type": "string", "format": "date-time"}, '"2025-03-14T09:30:00Z"', '"yesterday"'),
    ("format: uuid", {"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"xyz"'),
    ("format: uri", {"type": "string", "format": "uri"}, '"https://example.com/a"', '"not a uri"'),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 2]", "[1, 1]"),
    ("multipleOf", {"type": "integer", "multipleOf": 3}, "9", "10"),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, "0.5", "0"),
    ("exclusiveMaximum", {"type": "integer", "exclusiveMaximum": 10}, "9", "10"),
    (
        "patternProperties",
        {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
        '{"x_a": 1}',
        '{"x_a": "s"}',
    ),
    (
        "additionalProperties: schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        '{"k": 1}',
        '{"k": "v"}',
    ),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, '{"ab": 1}', '{"A1": 1}'),
    (
        "minProperties",
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "minProperties": 1},
        '{"a": 1}',
        "{}",
    ),
    (
        "maxProperties",
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "maxProperties": 1},
        '{"a": 1}',
        '{"a": 1, "b": 2}',
    ),
    (
        "dependentRequired",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        '{"a": 1, "b": 2}',
        '{"a": 1}',
    ),
    ("not", {"type": "integer", "not": {"const": 3}}, "4", "3"),
    (
        "if/then/else",
        {
            "type": "object",
            "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
            "required": ["kind"],
            "if": {"properties": {"kind": {"const": "a"}}},
            "then": {"required": ["n"]},
        },
        '{"kind": "a", "n": 1}',
        '{"kind": "a"}',
    ),
    ("oneOf (overlapping)", {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}, "-1", "5"),
    ("allOf", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 10}]}, "5", "11"),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1, 5]", "[1, 2]"),
    (
        "prefixItems, items: false",
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        '["a", 1]',
        '["a", "b"]',
    ),
    (
        "unevaluatedProperties: false",
        {"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False},
        '{"a": 1}',
        '{"a": 1, "b": 2}',
    ),
    # compact: xgrammar takes an object or array in `enum`/`const` only as json.dumps(separators=(",", ":")) writes it
    ("enum of objects", {"enum": [{"a": 1}, [1, 2], "x"]}, '{"a":1}', '{"a":2}'),
    ("pattern, unanchored", {"type": "string", "pattern": "[0-9]+"}, '"abc123"', '"abc"'),
    ("pattern with lookahead", {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4,}$"}, '"abc1"', '"abcd"'),
    (
        "annotations (title, description, default, examples)",
        {"type": "integer", "title": "t", "description": "d", "default": 1, "examples": [1]},
        "1",
        '"x"',
    ),
    ("$ref to another document", {"$ref": "https://example.com/schema.json"}, "1", '"x"'),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_tokenizer(full: bool) -> tuple[Any, list[int]]:
    """The bundled model's transformers tokenizer and the server's EOS ids."""
    if full:
        from generation.prepare import load_model
        from models.loader import ModelConfig

        with tempfile.TemporaryDirectory() as cache:
            lm = load_model(ModelConfig(device="cpu", cache_dir=Path(cache)))
        return lm.tokenizer, sorted(lm.eos_token_ids)
    from transformers import AutoTokenizer

    from models.loader import bundled_model_path

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return tokenizer, [tokenizer.eos_token_id]  # models/loader.py _eos_ids: {2} for the bundled model


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """What C++ code writes to file descriptor 2 meanwhile (xgrammar logs its warnings there, and a line per
    rejected token), as a list holding one string once the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            out.append(sink.read().decode("utf-8", "replace"))


def xgrammar_logs(text: str) -> list[str]:
    """xgrammar's log lines without their time and source prefix ("[14:00:03] /project/cpp/x.cc:12: ")."""
    lines = []
    for line in text.splitlines():
        if ".cc:" in line:
            line = line.split(".cc:", 1)[1].split(": ", 1)[-1]
        if line.strip() and line not in lines:
            lines.append(line.strip())
    return lines


def us(seconds: float) -> float:
    return seconds * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def allows(bitmask: Any, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


class Lib(abc.ABC):
    """One library behind the calls the benchmark needs."""

    name = ""
    vocab = 0
    tokenizer_s = 0.0  # building its tokenizer info

    @abc.abstractmethod
    def compile(self, schema: dict[str, Any]) -> Any: ...
    @abc.abstractmethod
    def recompile(self, schema: dict[str, Any], compiled: Any) -> Any: ...
    @abc.abstractmethod
    def warnings(self, compiled: Any) -> list[str]: ...
    @abc.abstractmethod
    def size(self, compiled: Any) -> int | None: ...
    @abc.abstractmethod
    def matcher(self, compiled: Any) -> Any: ...
    @abc.abstractmethod
    def fill(self, matcher: Any, bitmask: Any, row: int) -> None: ...
    @abc.abstractmethod
    def consume(self, matcher: Any, token: int) -> bool: ...
    @abc.abstractmethod
    def accepting(self, matcher: Any) -> bool: ...
    @abc.abstractmethod
    def batch_filler(self, threads: int | None) -> Callable[[list[Any], Any], None]: ...
    @abc.abstractmethod
    def apply(self, logits: Any, bitmask: Any) -> None: ...


class Guidance(Lib):
    name = "llguidance"

    def __init__(self, tokenizer: Any, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        start = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
        self.tokenizer_s = time.perf_counter() - start
        self.vocab = self.tokenizer.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"lenient": False})
        template = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(template.get_error())
        return grammar, template

    def warnings(self, compiled: Any) -> list[str]:
        return list(compiled[1].get_grammar_warnings())

    def size(self, compiled: Any) -> int | None:
        return None  # not exposed

    def recompile(self, schema: dict[str, Any], compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tokenizer, compiled[0], log_level=0)  # no cache: the kept text, parsed again

    def matcher(self, compiled: Any) -> Any:
        return compiled[1].deep_copy()

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        self.lt.fill_next_token_bitmask(matcher, bitmask, row)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def batch_filler(self, threads: int | None) -> Callable[[list[Any], Any], None]:
        executor = self.ll.LLExecutor(threads) if threads else self.ll.LLExecutor()

        def fill(matchers: list[Any], bitmask: Any) -> None:
            self.lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

        return fill

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, eos: list[int]) -> None:
        import xgrammar

        self.xgr = xgrammar
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self.tokenizer_s = time.perf_counter() - start
        self.vocab = self.info.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(schema, strict_mode=True)

    def warnings(self, compiled: Any) -> list[str]:
        return []  # xgrammar logs to stderr instead (captured by the caller)

    def size(self, compiled: Any) -> int | None:
        return int(compiled.memory_size_bytes)

    def recompile(self, schema: dict[str, Any], compiled: Any) -> Any:
        return self.compiler.compile_json_schema(schema, strict_mode=True)  # a hit in the compiler's cache

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())

    def batch_filler(self, threads: int | None) -> Callable[[list[Any], Any], None]:
        batch = self.xgr.BatchGrammarMatcher(threads or "auto")

        def fill(matchers: list[Any], bitmask: Any) -> None:
            batch.batch_fill_next_token_bitmask(matchers, bitmask)

        return fill

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


def check_schemas(entries: list[dict[str, Any]], tokenizer: Any) -> list[list[int]]:
    import jsonschema

    docs = []
    for entry in entries:
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        jsonschema.Draft202012Validator(entry["schema"]).validate(entry["example"])
        text = json.dumps(entry["example"], ensure_ascii=False)
        docs.append(tokenizer.encode(text, add_special_tokens=False))
    return docs


def walk(lib: Lib, matcher: Any, ids: list[int], eos: int, bitmask: Any) -> list[float]:
    """Mask before every token of the document and before EOS; every mask must allow the token that follows."""
    times = []
    for token in [*ids, eos]:
        start = time.perf_counter()
        lib.fill(matcher, bitmask, 0)
        times.append(time.perf_counter() - start)
        if not allows(bitmask, 0, token):
            raise AssertionError(f"{lib.name}: the mask forbids token {token}")
        if token != eos and not lib.consume(matcher, token):
            raise AssertionError(f"{lib.name}: token {token} refused")
    if not lib.accepting(matcher) or not lib.consume(matcher, eos):
        raise AssertionError(f"{lib.name}: the document does not end the grammar")
    return times


def per_schema(lib: Lib, entries: list[dict[str, Any]], docs: list[list[int]], eos: int) -> dict[str, Any]:
    import torch

    bitmask = torch.full((1, (lib.vocab + 31) // 32), -1, dtype=torch.int32)
    compiled, rows = [], []
    for entry, ids in zip(entries, docs, strict=True):
        with captured_stderr() as log:
            start = time.perf_counter()
            grammar = lib.compile(entry["schema"])
            compile_s = time.perf_counter() - start
        warnings = lib.warnings(grammar) + xgrammar_logs(log[0])
        if warnings:
            print(f"{lib.name} warns on {entry['name']}: {warnings}")
        start = time.perf_counter()
        lib.recompile(entry["schema"], grammar)
        second_s = time.perf_counter() - start
        start = time.perf_counter()
        first = lib.matcher(grammar)
        matcher_s = time.perf_counter() - start
        cold = walk(lib, first, ids, eos, bitmask)
        warm = walk(lib, lib.matcher(grammar), ids, eos, bitmask)
        compiled.append(grammar)
        rows.append(
            {
                "name": entry["name"],
                "tokens": len(ids),
                "warnings": warnings,
                "bytes": lib.size(grammar),
                "compile_ms": 1e3 * compile_s,
                "second_ms": 1e3 * second_s,
                "matcher_us": us(matcher_s),
                "first_mask_us": us(cold[0]),
                "cold_us": [us(t) for t in cold],
                "warm_us": [us(t) for t in warm],
            }
        )
    return {"compiled": compiled, "rows": rows}


def batch16(lib: Lib, compiled: list[Any], docs: list[list[int]], eos: int, steps: int) -> dict[str, Any]:
    """16 rows of 16 schemas advanced together; each step's masks by a plain loop and by the batch API."""
    import torch

    bitmask = torch.full((BATCH, (lib.vocab + 31) // 32), -1, dtype=torch.int32)
    cores = os.cpu_count() or 1
    fillers = {
        "batch API, default threads": lib.batch_filler(None),
        f"batch API, {cores} threads": lib.batch_filler(cores),
    }
    order = list(range(len(docs)))
    nxt = BATCH % len(order)
    rows = [[lib.matcher(compiled[i]), i, 0] for i in order[:BATCH]]  # matcher, schema, position
    per_row, loop_wall, consume, created = [], [], [], []
    walls: dict[str, list[float]] = {name: [] for name in fillers}
    for step in range(steps):
        runs = ["loop", *fillers]
        if step % 2:
            runs.reverse()
        for run in runs:
            bitmask.fill_(0)
            start = time.perf_counter()
            if run == "loop":
                for r, (m, _, _) in enumerate(rows):
                    t0 = time.perf_counter()
                    lib.fill(m, bitmask, r)
                    per_row.append(time.perf_counter() - t0)
                loop_wall.append(time.perf_counter() - start)
            else:
                fillers[run]([row[0] for row in rows], bitmask)
                walls[run].append(time.perf_counter() - start)
            for r, (_, schema, pos) in enumerate(rows):
                token = docs[schema][pos] if pos < len(docs[schema]) else eos
                if not allows(bitmask, r, token):
                    raise AssertionError(f"{lib.name} {run}: row {r} forbids token {token}")
        for r, row in enumerate(rows):
            m, schema, pos = row
            token = docs[schema][pos] if pos < len(docs[schema]) else eos
            t0 = time.perf_counter()
            ok = lib.consume(m, token)
            consume.append(time.perf_counter() - t0)
            if not ok:
                raise AssertionError(f"{lib.name}: row {r} refused token {token}")
            if token == eos:  # a new request's matcher, of a schema no other row has
                busy = {other[1] for other in rows}
                while order[nxt] in busy:
                    nxt = (nxt + 1) % len(order)
                t0 = time.perf_counter()
                rows[r] = [lib.matcher(compiled[order[nxt]]), order[nxt], 0]
                created.append(time.perf_counter() - t0)
                nxt = (nxt + 1) % len(order)
            else:
                row[2] += 1
    result: dict[str, Any] = {
        "row_us_median": us(statistics.median(per_row)),
        "row_us_p90": us(pct(per_row, 0.9)),
        "loop_step_us_median": us(statistics.median(loop_wall)),
        "loop_step_us_p90": us(pct(loop_wall, 0.9)),
        "consume_us_median": us(statistics.median(consume)),
        "new_matcher_us_median": us(statistics.median(created)) if created else None,
        "steps": steps,
    }
    for name, values in walls.items():
        result[name] = {"step_us_median": us(statistics.median(values)), "step_us_p90": us(pct(values, 0.9))}
    return result


def woken_during(call: Callable[[], None], calls: int = 30) -> dict[str, float]:
    """Share of `calls` calls, made in another thread, during which this thread woke from a 50 µs sleep: a thread
    needs the GIL to return from `time.sleep`, so near 100% means the call releases the GIL and 0% that it holds it
    (whatever the cores are busy with)."""
    windows: list[tuple[float, float]] = []
    done = threading.Event()

    def worker() -> None:
        time.sleep(0.02)
        for _ in range(calls):
            start = time.perf_counter()
            call()
            windows.append((start, time.perf_counter()))
            time.sleep(0.003)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    wakes = []
    while not done.is_set():
        time.sleep(0.00005)
        wakes.append(time.perf_counter())
    thread.join()
    woken = [any(start < t < end for t in wakes) for start, end in windows]
    return {
        "woken_pct": 100.0 * sum(woken) / len(woken),
        "call_us": us(statistics.median(end - start for start, end in windows)),
    }


def gil_test(lib: Lib, compiled: list[Any], docs: list[list[int]]) -> dict[str, float]:
    """Whether the batch mask call runs without the GIL (so a thread could compute masks while the model runs):
    1024 rows mid-document, the batch API at one thread."""
    import torch

    rows = 1024
    bitmask = torch.full((rows, (lib.vocab + 31) // 32), -1, dtype=torch.int32)
    matchers = []
    for i in range(rows):
        m = lib.matcher(compiled[i % len(compiled)])
        ids = docs[i % len(docs)]
        for token in ids[: (i * 7) % len(ids)]:
            lib.consume(m, token)
        matchers.append(m)
    fill = lib.batch_filler(1)
    return woken_during(lambda: fill(matchers, bitmask))


def busy_python() -> None:
    """The control for `woken_during`: 3 ms of Python, which holds the GIL."""
    start = time.perf_counter()
    while time.perf_counter() - start < 0.003:
        pass


def apply_bench(libs: list[Lib], compiled: dict[str, list[Any]], docs: list[list[int]]) -> dict[str, Any]:
    """[16, vocab] float32 logits and a real mid-document bitmask (each library's own); the first call (llguidance's
    is a `torch.compile`d function) and the median of 100, at one torch thread: at two, with the other core busy
    elsewhere, a `masked_fill_` measured 0.4 or 16 ms from run to run."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def plain(logits: Any, bitmask: Any) -> None:  # numpy unpackbits and masked_fill_: no compiled kernel
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        logits.masked_fill_(~torch.from_numpy(bits.view(np.bool_)), float("-inf"))

    out: dict[str, Any] = {}
    for lib in libs:
        bitmask = torch.full((BATCH, (lib.vocab + 31) // 32), -1, dtype=torch.int32)
        for r in range(BATCH):
            m = lib.matcher(compiled[lib.name][r])
            for token in docs[r][: len(docs[r]) // 3]:
                lib.consume(m, token)
            lib.fill(m, bitmask, r)
        logits = torch.randn(BATCH, lib.vocab)
        reference = logits.clone()
        for r in range(BATCH):  # the bitmask's meaning, bit by bit
            allowed = [t for t in range(lib.vocab) if allows(bitmask, r, t)]
            keep = reference[r, allowed].clone()
            reference[r] = float("-inf")
            reference[r, allowed] = keep
        for label, fn in (
            (f"{lib.name} apply_token_bitmask_inplace", lib.apply),
            (f"numpy unpackbits + masked_fill_ ({lib.name}'s mask)", plain),
        ):
            work = logits.clone()
            start = time.perf_counter()
            fn(work, bitmask)
            first = time.perf_counter() - start
            times = []
            for _ in range(100):
                work = logits.clone()
                start = time.perf_counter()
                fn(work, bitmask)
                times.append(time.perf_counter() - start)
            if not torch.equal(work, reference):
                raise AssertionError(f"{label}: wrong logits")
            out[label] = {"first_call_ms": 1e3 * first, "us_median": us(statistics.median(times))}
    torch.set_num_threads(threads)
    return out


def accepts(lib_name: str, matcher: Any, ids: list[int]) -> bool:
    if lib_name == "llguidance":
        return bool(matcher.consume_tokens(ids) and matcher.is_accepting())
    return all(matcher.accept_token(t) for t in ids) and bool(matcher.is_completed())


def probe_keywords(guidance: Guidance, xgr: XGrammar, tokenizer: Any) -> list[dict[str, Any]]:
    import jsonschema

    rows = []
    for label, schema, valid, bad in PROBES:
        jsonschema.Draft202012Validator.check_schema(schema)
        valid_ids = tokenizer.encode(valid, add_special_tokens=False)
        bad_ids = tokenizer.encode(bad, add_special_tokens=False)
        row: dict[str, Any] = {"keyword": label}
        for column, lenient in (("llguidance lenient false", False), ("llguidance lenient true", True)):
            ll = guidance.ll
            grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"lenient": lenient})
            probe = ll.LLMatcher(guidance.tokenizer, grammar, log_level=0)
            if probe.is_error():
                row[column] = "error: " + shorten(probe.get_error())
                continue
            warnings = probe.get_grammar_warnings()
            row[column] = verdict(
                accepts("llguidance", probe.deep_copy(), valid_ids), accepts("llguidance", probe.deep_copy(), bad_ids)
            ) + (" (warns: " + "; ".join(warnings) + ")" if warnings else "")
        for column, strict in (("xgrammar strict_mode=True", True), ("xgrammar strict_mode=False", False)):
            try:
                with captured_stderr() as log:
                    compiled = xgr.compiler.compile_json_schema(schema, strict_mode=strict)
            except Exception as exc:  # the library's own message is the result
                row[column] = "error: " + xgrammar_logs(str(exc).strip().splitlines()[0])[0]
                continue
            with captured_stderr():
                ok_valid = accepts("xgrammar", xgr.xgr.GrammarMatcher(compiled), valid_ids)
                ok_bad = accepts("xgrammar", xgr.xgr.GrammarMatcher(compiled), bad_ids)
            logs = xgrammar_logs(log[0])
            row[column] = verdict(ok_valid, ok_bad) + (" (logs: " + "; ".join(logs) + ")" if logs else "")
        rows.append(row)
    return rows


def shorten(message: str, limit: int = 160) -> str:
    """llguidance's error on one line (a regex error spans several, with a caret under the spot), cut at `limit`."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def verdict(valid_accepted: bool, bad_accepted: bool) -> str:
    if valid_accepted and not bad_accepted:
        return "enforced"
    if valid_accepted:
        return "ignored"
    return "rejects the valid instance" + ("" if not bad_accepted else ", accepts the violating one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="batch-16 steps (default 200)")
    parser.add_argument("--load-model", action="store_true", help="load the whole model, as the server does")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    start = time.perf_counter()
    tokenizer, eos_ids = load_tokenizer(args.load_model)
    load_s = time.perf_counter() - start
    eos = eos_ids[0]
    entries = json.loads(SCHEMAS.read_text())
    docs = check_schemas(entries, tokenizer)

    imports: dict[str, float] = {}
    for module in ("llguidance", "xgrammar"):
        start = time.perf_counter()
        __import__(module)
        imports[module] = time.perf_counter() - start
    libs: list[Lib] = [Guidance(tokenizer, eos_ids), XGrammar(tokenizer, eos_ids)]
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"python {platform.python_version()}"
    )
    from importlib.metadata import version

    print(
        f"llguidance {version('llguidance')}, xgrammar {version('xgrammar')}, transformers {version('transformers')}; "
        f"tokenizer vocab {len(tokenizer)}, EOS {eos_ids}, loaded in {load_s:.1f} s; {len(entries)} schemas, "
        f"documents of {min(map(len, docs))}-{max(map(len, docs))} tokens"
    )
    results: dict[str, Any] = {"cpu": cpu_model(), "torch": torch.__version__, "libs": {}}
    compiled: dict[str, list[Any]] = {}
    for lib in libs:
        measured = per_schema(lib, entries, docs, eos)
        compiled[lib.name] = measured["compiled"]
        batch = batch16(lib, measured["compiled"], docs, eos, args.steps)
        gil = gil_test(lib, measured["compiled"], docs)
        results["libs"][lib.name] = {
            "import_s": imports[lib.name],
            "tokenizer_s": lib.tokenizer_s,
            "schemas": measured["rows"],
            "batch16": batch,
            "gil": gil,
        }
    results["gil_control"] = woken_during(busy_python)
    results["apply"] = apply_bench(libs, compiled, docs)
    results["keywords"] = probe_keywords(libs[0], libs[1], tokenizer)  # type: ignore[arg-type]
    report(results, [lib.name for lib in libs])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))


def report(results: dict[str, Any], names: list[str]) -> None:
    libs = results["libs"]

    def cell(name: str, fn: Callable[[dict[str, Any]], str]) -> str:
        return " | ".join(fn(libs[n]) for n in names)

    def everything(lib: dict[str, Any], key: str) -> list[float]:
        return [t for row in lib["schemas"] for t in row[key]]

    def summary(lib: dict[str, Any], key: str) -> str:
        values = [row[key] for row in lib["schemas"]]
        return f"{statistics.median(values):.2f} / {max(values):.2f}"

    print(f"\n| | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("import (s)", lambda lib: f"{lib['import_s']:.2f}"),
        ("tokenizer info (s)", lambda lib: f"{lib['tokenizer_s']:.3f}"),
        ("compile, first: median / max (ms)", lambda lib: summary(lib, "compile_ms")),
        ("compile, second: median / max (ms)", lambda lib: summary(lib, "second_ms")),
        (
            "compiled grammar's size: median / max (KiB)",
            lambda lib: (
                "not exposed"
                if lib["schemas"][0]["bytes"] is None
                else "{:.0f} / {:.0f}".format(
                    statistics.median(r["bytes"] for r in lib["schemas"]) / 1024,
                    max(r["bytes"] for r in lib["schemas"]) / 1024,
                )
            ),
        ),
        (
            "matcher per request: median (µs)",
            lambda lib: f"{statistics.median(r['matcher_us'] for r in lib['schemas']):.0f}",
        ),
        (
            "first mask after compile: median / max (µs)",
            lambda lib: "{:.0f} / {:.0f}".format(
                statistics.median(r["first_mask_us"] for r in lib["schemas"]),
                max(r["first_mask_us"] for r in lib["schemas"]),
            ),
        ),
        (
            "batch 1, cold walk: median / p90 / max µs a mask",
            lambda lib: "{:.1f} / {:.1f} / {:.0f}".format(
                statistics.median(everything(lib, "cold_us")),
                pct(everything(lib, "cold_us"), 0.9),
                max(everything(lib, "cold_us")),
            ),
        ),
        (
            "batch 1, warm walk: median / p90 / max µs a mask",
            lambda lib: "{:.1f} / {:.1f} / {:.0f}".format(
                statistics.median(everything(lib, "warm_us")),
                pct(everything(lib, "warm_us"), 0.9),
                max(everything(lib, "warm_us")),
            ),
        ),
        (
            "batch 16, loop: µs per row, median / p90",
            lambda lib: "{:.1f} / {:.1f}".format(lib["batch16"]["row_us_median"], lib["batch16"]["row_us_p90"]),
        ),
        (
            "batch 16, loop: µs a step, median / p90",
            lambda lib: "{:.0f} / {:.0f}".format(
                lib["batch16"]["loop_step_us_median"], lib["batch16"]["loop_step_us_p90"]
            ),
        ),
    ]

    def api_step(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda lib: "{:.0f} / {:.0f}".format(
            lib["batch16"][key]["step_us_median"], lib["batch16"][key]["step_us_p90"]
        )

    for key in libs[names[0]]["batch16"]:
        if key.startswith("batch API"):
            lines.append((f"batch 16, {key}: µs a step, median / p90", api_step(key)))
    lines += [
        ("consume a token: median µs", lambda lib: f"{lib['batch16']['consume_us_median']:.1f}"),
    ]

    control = results["gil_control"]
    label = (
        "GIL released: share of batch mask calls (1024 rows, in a thread; median µs) during which a sleeping thread "
        f"woke (control, {control['call_us']:.0f} µs of Python: {control['woken_pct']:.0f}%)"
    )
    lines.append((label, lambda lib: "{:.0f}% ({:.0f})".format(lib["gil"]["woken_pct"], lib["gil"]["call_us"])))
    for label, fn in lines:
        print(f"| {label} | {cell(label, fn)} |")

    print("\n| apply a [16, vocab] bitmask to float32 logits, 1 torch thread | first call (ms) | median (µs) |")
    print("|---|---|---|")
    for label, value in results["apply"].items():
        print(f"| {label} | {value['first_call_ms']:.1f} | {value['us_median']:.0f} |")

    print(
        f"\n| schema | tokens | {' | '.join(f'{n} compile ms (2nd)' for n in names)} | "
        f"{' | '.join(f'{n} cold / warm µs a mask' for n in names)} |"
    )
    print(f"|---|---|{'---|' * 2 * len(names)}")
    for i, row in enumerate(libs[names[0]]["schemas"]):
        compiles = " | ".join(
            f"{libs[n]['schemas'][i]['compile_ms']:.2f} ({libs[n]['schemas'][i]['second_ms']:.2f})" for n in names
        )
        masks = " | ".join(
            "{:.1f} / {:.1f}".format(
                statistics.mean(libs[n]["schemas"][i]["cold_us"]), statistics.mean(libs[n]["schemas"][i]["warm_us"])
            )
            for n in names
        )
        print(f"| {row['name']} | {row['tokens']} | {compiles} | {masks} |")

    columns = [k for k in results["keywords"][0] if k != "keyword"]
    print(f"\n| keyword | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for row in results["keywords"]:
        print(f"| {row['keyword']} | {' | '.join(row[c] for c in columns)} |")


if __name__ == "__main__":
    main()
