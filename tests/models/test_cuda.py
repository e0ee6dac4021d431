"""The CUDA paths: `--device 0`, half precision, `--quantize 8/4` and `/clear` on a GPU. Skipped without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from generation.prepare import load_model
from models.loader import ModelConfig
from tests.conftest import LiveServer, MakeClient, build_tiny_model, start_server, stop_server
from tests.glm import GOLDEN, golden, write_bin_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
CASES = golden("cases.json")["cases"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_gpu_follows_fp32_on_the_cpu(dtype: str) -> None:
    cpu = load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="float32"))
    gpu = load_model(ModelConfig(path=GOLDEN, device="0", dtype=dtype))
    assert gpu.device == "cuda:0" and str(gpu.model.lm_head.weight.device) == "cuda:0"
    for case in CASES:
        ids = torch.tensor(case["input_ids"])
        with torch.no_grad():
            want = cpu.model(ids).logits[0, -1]
            got = gpu.model(ids.cuda()).logits[0, -1].float().cpu()
        assert (got - want).abs().max() < 0.25


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_on_the_gpu_uses_a_kernel_that_agrees_with_the_cpu(bits: int) -> None:
    cpu = load_model(ModelConfig(path=GOLDEN, device="cpu", dtype="bfloat16", quantize=bits))
    gpu = load_model(ModelConfig(path=GOLDEN, device="0", dtype="bfloat16", quantize=bits))
    assert gpu.weight_bytes <= cpu.weight_bytes * 1.1
    ids = torch.tensor(CASES[0]["input_ids"])
    with torch.no_grad():
        want = cpu.model(ids).logits[0, -1].float()
        got = gpu.model(ids.cuda()).logits[0, -1].float().cpu()
    assert (got - want).abs().max() < 0.5
    out = gpu.model.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = write_bin_checkpoint(tmp_path_factory.mktemp("glm"))
    server = start_server(["--model", str(folder), "--device", "0", "--quantize", "8"], Path(folder) / "server.log")
    yield server
    stop_server(server)


def test_clear_on_the_gpu_keeps_answers_coming(gpu_server: LiveServer) -> None:
    health = gpu_server.get("/health")
    assert health["device"] == "cuda:0" and health["weight_bytes"] > 0
    first = gpu_server.post("/chat", {"query": "你好", "temperature": 0, "max_tokens": 8})
    assert gpu_server.get("/clear") == {"success": True, "prefix_cache_freed_bytes": 0}  # ChatGLM-6B: no prefix cache
    assert (
        gpu_server.post("/chat", {"query": "你好", "temperature": 0, "max_tokens": 8})["response"] == first["response"]
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_the_prefix_cache_on_the_gpu(dtype: str, make_client: MakeClient, tmp_path: Path) -> None:
    """Its blocks live on the GPU beside the cache they came from; in float32 answers are the same as without it."""
    from tests.engine.test_prefix_cache import cached, converse

    lm = load_model(ModelConfig(path=build_tiny_model(tmp_path), device="0", dtype=dtype))
    without = await converse(await make_client(lm, prefix_cache_mb=0), "Hello there!")
    client = await make_client(lm, prefix_cache_mb=64)
    rounds = await converse(client, "Hello there!")
    assert all(cached(usage) > 0 for _, usage, _ in rounds[1:])
    if dtype == "float32":
        assert [a for a, _, _ in rounds] == [a for a, _, _ in without]
    else:  # half precision: a chunk's sums differ in the last bits from a whole prompt's; the first round has no hit
        assert rounds[0][0] == without[0][0] and all(a for a, _, _ in rounds)
    assert (await (await client.get("/health")).json())["prefix_cache"]["bytes"] > 0


def test_sampling_on_the_gpu_keeps_to_its_candidates_and_its_seed() -> None:
    from generation.sampling import SamplingParams, pick

    logits = torch.randn(49152, generator=torch.Generator().manual_seed(0)) * 4
    logits[:1000] = float("-inf")  # a grammar's mask: these can never be drawn
    on_gpu = logits.to("cuda:0", torch.bfloat16)
    kth = float(torch.topk(on_gpu.float(), 50).values[-1])  # top-k keeps what ties with it too
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)

    def tokens(seed: int) -> list[int]:
        generator = torch.Generator(device="cuda:0").manual_seed(seed)
        return [pick(on_gpu, params, generator) for _ in range(200)]

    drawn = tokens(1)
    assert drawn == tokens(1) != tokens(2)
    assert min(drawn) >= 1000 and all(float(on_gpu[t]) >= kth for t in drawn) and len(set(drawn)) > 1
