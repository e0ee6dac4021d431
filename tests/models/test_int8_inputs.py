"""An LM head fed int8 inputs (models/int8_inputs.py): its top logits, and so a greedy answer, are those of its int8
rows in float32; a row's logits do not depend on the rows beside it; a product that disagrees is refused at load; the
calibration feeds the head int8 only where that measures faster, and never under `--dtype`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from generation.prepare import load_model
from models import int8_inputs, quantize
from models.loader import LoadedModel, ModelConfig
from models.quantize import QuantizedLinear, quantize_linear
from tests.conftest import build_tiny_gguf
from tests.models.test_kernels import slow_product, slowed

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="this PyTorch has no FBGEMM (not x86)"
)


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("q4"), "Q4_1")


def lm_head(hidden: int = 256, vocab: int = 8192) -> QuantizedLinear:
    linear = nn.Linear(hidden, vocab, bias=False)
    linear.weight.data = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(1)) * 0.05
    head = quantize_linear(linear, 8, 32, torch.float32, "cpu")
    head.keep_top_exact()
    return head


def hidden_states(rows: int, hidden: int = 256) -> torch.Tensor:
    """Rows of different sizes with a few large columns, as a final norm's output has."""
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(2))
    x[:, 3] *= 20
    x[:, hidden // 3] *= 8
    return x * torch.linspace(0.2, 5, rows)[:, None]


def test_the_top_logits_are_the_int8_rows_in_float32() -> None:
    head = lm_head()
    x = hidden_states(8)
    plain = x @ head.dense_weight().t()  # the int8 rows dequantized, in float32
    assert head.set_int8_inputs() and head.int8 is not None
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == plain.shape
    assert torch.equal(logits.argmax(-1), plain.argmax(-1))
    top = plain.topk(16, dim=-1).indices
    assert torch.allclose(logits.gather(-1, top), plain.gather(-1, top), rtol=1e-5, atol=1e-4)
    # below the top the logits are rougher than float32, but the distribution barely moves
    rest = (logits - plain).abs().amax(-1) / plain.abs().amax(-1)
    assert 0 < float(rest.max()) < 0.15
    kl = (plain.log_softmax(-1).exp() * (plain.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    assert float(kl.max()) < 0.02


def test_a_row_gets_the_same_logits_alone_as_beside_others() -> None:
    head = lm_head()
    assert head.set_int8_inputs()
    x = hidden_states(16)
    together = head(x)
    alone = torch.cat([head(x[i : i + 1]) for i in range(16)])
    assert torch.equal(together, alone)


def test_a_product_that_disagrees_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """As full-range inputs overflowing on an AVX2 CPU would: the head keeps its weight-only kernel."""
    head = lm_head()
    x = hidden_states(4)
    before = head(x)
    monkeypatch.setitem(int8_inputs.KERNELS, "int8x8", lambda x, packed: int8_inputs._product(x, packed) * 1.4)
    assert not head.set_int8_inputs() and head.int8 is None and head.extra_bytes == 0
    assert torch.equal(head(x), before)


def test_only_an_lm_head_that_keeps_its_top_exact_takes_int8_inputs() -> None:
    linear = nn.Linear(64, 128, bias=False)
    layer = quantize_linear(linear, 8, 32, torch.float32, "cpu")
    assert not layer.set_int8_inputs() and layer.int8 is None


def head_of(lm: LoadedModel) -> tuple[QuantizedLinear, dict[str, Any]]:
    head = lm.model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and lm.kernels is not None
    [route] = [layer for key, layer in lm.kernels["layers"].items() if key.endswith("-head")]
    return head, route


def greedy_tokens(lm: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 9, 23, 81, 7, 64, 3, 11, 90, 2]])
    with torch.inference_mode():
        logits: torch.Tensor = lm.model(input_ids=ids).logits
    return logits.argmax(-1)


def test_the_calibration_feeds_the_head_int8_only_where_faster(q4_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantize.KERNELS, "int8pack", slowed("int8pack"))  # the weight-only head made slow
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=None, quantize=4))
    head, route = head_of(lm)
    assert route["act"] == "int8" and head.int8 is not None
    assert lm.weight_bytes >= head.extra_bytes > 0  # FBGEMM's copy of the rows counts
    int8_answer = greedy_tokens(lm)
    head.set_act(torch.float32)  # the weight-only kernel, as without int8 inputs
    assert torch.equal(greedy_tokens(lm), int8_answer)
    monkeypatch.undo()

    monkeypatch.setitem(int8_inputs.KERNELS, "int8x8", slow_product)
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=None, quantize=4))
    head, route = head_of(lm)
    assert route["act"] in ("float32", "bfloat16") and head.int8 is None
    monkeypatch.undo()

    # `--dtype` fixes what every kernel is fed: even where int8 inputs would win
    monkeypatch.setitem(quantize.KERNELS, "int8pack", slowed("int8pack"))
    lm = load_model(ModelConfig(path=q4_gguf, device="cpu", cache_dir=None, quantize=4, dtype="float32"))
    head, route = head_of(lm)
    assert route["act"] == "float32" and head.int8 is None


def test_a_vocabulary_smaller_than_the_exact_top_is_recomputed_whole() -> None:
    head = lm_head(hidden=64, vocab=40)
    assert head.set_int8_inputs()
    x = hidden_states(3, hidden=64)
    assert torch.allclose(head(x), x @ head.dense_weight().t(), rtol=1e-5, atol=1e-4)


def test_a_kept_choice_of_int8_inputs_that_cannot_be_had_now_falls_back_to_a_dtype(
    q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The calibration kept per CPU says int8 inputs, but this start's product disagrees (a changed FBGEMM): the head
    is fed the fastest dtype measured instead, says so, and answers as before."""
    config = ModelConfig(path=q4_gguf, device="cpu", cache_dir=tmp_path, quantize=4)
    monkeypatch.setitem(quantize.KERNELS, "int8pack", slowed("int8pack"))
    first = load_model(config)
    assert head_of(first)[0].int8 is not None
    answer = greedy_tokens(first)
    monkeypatch.undo()
    monkeypatch.setitem(int8_inputs.KERNELS, "int8x8", lambda x, packed: int8_inputs._product(x, packed) * 1.4)
    with caplog.at_level(logging.WARNING, logger="models.calibrate"):
        again = load_model(config)
    head, route = head_of(again)
    assert again.kernels is not None and again.kernels["cached"] and route["act"] == "int8"
    assert head.int8 is None and head.act in (torch.float32, torch.bfloat16)
    assert "int8 inputs measured fastest but are unavailable now" in caplog.text
    assert torch.equal(greedy_tokens(again), answer)
