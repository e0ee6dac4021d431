"""GGUF models: served from a `.gguf` file, converted once, and started from the converted copy afterwards."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from generation.prepare import load_model
from models.devices import resolve_dtype
from models.gguf_files import gguf_cache_entry
from models.loader import LoadedModel, ModelConfig
from tests.conftest import LiveServer, MakeClient, build_tiny_gguf, start_server, stop_server

GREEDY = {"query": "你好 hello 😀", "temperature": 0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def load(path: Path, cache: Path | None, dtype: str = "auto") -> LoadedModel:
    return load_model(ModelConfig(path=path, device="cpu", cache_dir=cache, dtype=dtype))


def entry_of(path: Path, cache: Path, dtype: str = "auto") -> Path:
    return gguf_cache_entry(path, cache, resolve_dtype(dtype, "cpu"))


async def greedy_answer(make_client: MakeClient, lm: LoadedModel) -> str:
    client = await make_client(lm)
    body = await (await client.post("/chat", json=GREEDY)).json()
    answer: str = body["response"]
    return answer


async def test_a_gguf_is_converted_once_and_answers_the_same_from_its_copy(
    tiny_gguf: Path, tmp_path: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="models")
    first = load(tiny_gguf, tmp_path)
    entry = entry_of(tiny_gguf, tmp_path)
    assert "kept the converted model" in caplog.text and (entry / "model.safetensors").is_file()
    assert os.listdir(tmp_path) == [entry.name]  # no partial copy left behind
    caplog.clear()
    second = load(tiny_gguf, tmp_path)
    assert "from its converted copy" in caplog.text
    assert (second.name, second.context_length, second.eos_token_ids) == (first.name, 256, first.eos_token_ids)
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert await greedy_answer(make_client, second) == await greedy_answer(make_client, first)


def test_without_a_cache_nothing_is_written(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where the default cache would go
    before = sorted(p.name for p in tiny_gguf.parent.iterdir())
    caplog.set_level(logging.INFO, logger="models")
    load(tiny_gguf, None)
    assert sorted(p.name for p in tiny_gguf.parent.iterdir()) == before
    assert not any(tmp_path.iterdir()) and "converted" not in caplog.text


def test_a_changed_gguf_is_converted_again(tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mine = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf, mine)
    load(mine, tmp_path / "cache")
    stat = mine.stat()
    os.utime(mine, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the user replaced the file
    caplog.set_level(logging.INFO, logger="models")
    load(mine, tmp_path / "cache")
    assert "kept the converted model" in caplog.text and "from its converted copy" not in caplog.text
    assert len(list((tmp_path / "cache").iterdir())) == 2


async def test_a_broken_copy_is_converted_again(
    tiny_gguf: Path, tmp_path: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await greedy_answer(make_client, load(tiny_gguf, None))
    load(tiny_gguf, tmp_path)
    entry = entry_of(tiny_gguf, tmp_path)
    (entry / "model.safetensors").write_bytes(b"truncated by a full disk")
    caplog.set_level(logging.INFO, logger="models")
    lm = load(tiny_gguf, tmp_path)
    assert "is unreadable" in caplog.text and "kept the converted model" in caplog.text
    assert await greedy_answer(make_client, lm) == expected
    caplog.clear()
    load(tiny_gguf, tmp_path)
    assert "from its converted copy" in caplog.text


def test_each_dtype_keeps_its_own_copy(tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="models")
    assert load(tiny_gguf, tmp_path, "float32").dtype == "float32"
    assert load(tiny_gguf, tmp_path, "bfloat16").dtype == "bfloat16"
    assert caplog.text.count("kept the converted model") == 2 and "from its converted copy" not in caplog.text
    assert entry_of(tiny_gguf, tmp_path, "float32") != entry_of(tiny_gguf, tmp_path, "bfloat16")
    caplog.clear()
    assert load(tiny_gguf, tmp_path, "bfloat16").dtype == "bfloat16"
    assert "from its converted copy" in caplog.text


def test_a_cache_that_cannot_be_written_only_costs_time(
    tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    caplog.set_level(logging.INFO, logger="models")
    lm = load(tiny_gguf, blocked)
    assert lm.name == "tiny" and "could not keep the converted model" in caplog.text


def test_the_cli_serves_a_gguf_and_keeps_its_copy_where_told(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "default"))  # the servers inherit it
    cache = tmp_path / "cache"
    server = start_server(["--model", str(tiny_gguf), "--device", "cpu", "--cache-dir", str(cache)], tmp_path / "log")
    try:
        assert server.get("/health")["model"] == "tiny"
        assert server.post("/chat", {**GREEDY, "max_tokens": 3})["usage"]["completion_tokens"] == 3
        assert (entry_of(tiny_gguf, cache) / "config.json").is_file()
    finally:
        stop_server(server)
    server = start_server(["--model", str(tiny_gguf), "--device", "cpu", "--no-cache"], tmp_path / "log2")
    try:
        assert server.get("/health")["model"] == "tiny"
    finally:
        stop_server(server)
    assert "converted" not in (tmp_path / "log2").read_text() and not (tmp_path / "default").exists()


async def test_the_bundled_model_answers_the_same_from_its_converted_copy(
    bundled_server: LiveServer, bundled_cache: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # the bundled server's start converted the GGUF into this cache; a second start reads the copy
    caplog.set_level(logging.INFO, logger="models")
    lm = load_model(ModelConfig(device="cpu", cache_dir=bundled_cache))
    assert "from its converted copy" in caplog.text and lm.dtype == str(resolve_dtype("auto", "cpu"))[6:]
    body = {"query": "What is the capital of France?", "temperature": 0, "max_tokens": 16}
    client = await make_client(lm)
    ours = (await (await client.post("/chat", json=body)).json())["response"]
    assert ours == bundled_server.post("/chat", body)["response"]


def test_a_load_that_fails_for_another_reason_keeps_the_copy(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    load(tiny_gguf, tmp_path)
    entry = entry_of(tiny_gguf, tmp_path)
    before = sorted(p.name for p in entry.iterdir())

    def interrupted(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")  # as on SIGTERM mid-load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(RuntimeError):
        load(tiny_gguf, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in entry.iterdir()) == before  # the next start still finds its copy
