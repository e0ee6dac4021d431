"""Where a model runs and in what precision: `--device`, `--dtype`, the combinations that cannot work, the memory a
device has, and the batch size it affords."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPUINFO = Path("/proc/cpuinfo")
MAX_BATCH = 64  # past this a CPU or one GPU gains little; the memory rule below can only lower it


class DeviceError(Exception):
    """A device or precision that cannot work here; the message says what would."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86, BF16 on Arm), from the kernel's flags,
    and PyTorch dispatches to code that uses it: with `ATEN_CPU_CAPABILITY=avx2` (how this project emulates an
    AVX2-only CPU, or how a user caps PyTorch) it does not, whatever the flags say."""
    import torch

    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "bf16" in flags


def cpu_identity() -> dict[str, object]:
    """What makes measurements on this CPU valid for another start: its model, flags, cores and the instruction set
    PyTorch dispatches to."""
    import torch

    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    model = next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {
        "model": model,
        "flags": sorted(cpu_flags()),
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def resolve_devices(spec: str | None) -> list[str]:
    """`--device` as torch device strings: cpu, 0, cuda:1, or a comma list of GPUs (one model spread over them)."""
    import torch

    if not spec:
        return ["cuda:0" if torch.cuda.is_available() else "cpu"]
    if spec == "cpu":
        return ["cpu"]
    devices = []
    for part in (p.strip() for p in spec.split(",")):
        index = part.removeprefix("cuda:") if part.startswith("cuda:") else part
        if part == "cuda":
            index = "0"
        if not index.isdigit():
            raise DeviceError(f"--device {spec}: expected cpu, a CUDA index like 0, cuda:N, or a list like 0,1")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: this torch build sees no CUDA device (use --device cpu)")
        if int(index) >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        devices.append(f"cuda:{int(index)}")
    if len(set(devices)) != len(devices):
        raise DeviceError(f"--device {spec}: a GPU is named twice")
    return devices


def resolve_dtype(dtype: str, device: str) -> Any:
    """`--dtype` as a torch dtype: auto is bf16 where the device computes it natively, else fp16 (CUDA), fp32 (CPU)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {device} has no bf16 arithmetic (use --dtype float16)")
    if dtype == "bfloat16" and device == "cpu" and not cpu_has_bf16():
        log.warning("this CPU has no native bf16: --dtype bfloat16 is emulated and slow (float32 is faster here)")
    return getattr(torch, dtype)


def check_quantized(devices: list[str], bits: int) -> None:
    """Quantized weights are packed for one device's kernels: they cannot be spread over several GPUs."""
    if bits in (8, 4) and len(devices) > 1:
        raise DeviceError(f"--quantize {bits} runs on one device: use --device {devices[0]} (or --quantize 16)")


def memory_report(devices: list[str]) -> dict[str, Any]:
    """What each GPU holds (allocated by tensors, reserved by the caching allocator); nothing for a CPU."""
    import torch

    report: dict[str, Any] = {}
    for device in devices:
        if device.startswith("cuda"):
            report[device] = {
                "allocated_bytes": torch.cuda.memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device),
            }
    return report


def clear_caches(devices: list[str]) -> None:
    """Give cached allocator memory back on every GPU the model uses; tensors in use are untouched."""
    import torch

    for device in devices:
        if device.startswith("cuda"):
            with torch.cuda.device(device):
                torch.cuda.empty_cache()
                torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]


def free_memory(devices: list[str]) -> int:
    """Bytes still free for the KV cache: the GPUs' free memory, or the machine's available memory for a CPU."""
    import torch

    if devices[0].startswith("cuda"):
        return sum(torch.cuda.mem_get_info(d)[0] for d in devices)
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30  # an unknown machine: assume a modest 8 GiB


def default_batch_size(kv_bytes_per_token: int, context_length: int, free: int) -> int:
    """Requests decoded together by default: as many as half the free memory holds at their full context, at most
    MAX_BATCH, at least 1. The other half stays for activations, the prompts being built and the rest."""
    per_request = max(1, kv_bytes_per_token * context_length)
    return max(1, min(MAX_BATCH, free // 2 // per_request))


def placement(devices: list[str]) -> dict[str, Any]:
    """from_pretrained arguments that spread a model over exactly these GPUs (accelerate's device map)."""
    import torch

    if len(devices) == 1:
        return {}
    indices = [int(d.partition(":")[2]) for d in devices]
    # only the GPUs named get memory, each what it has free less a margin for the KV cache and activations
    return {"device_map": "auto", "max_memory": {i: int(torch.cuda.mem_get_info(i)[0] * 0.8) for i in indices}}


def spread(model: Any, devices: list[str], no_split: list[str]) -> Any:
    """One model over several GPUs, whole blocks on each, with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    indices = [int(d.partition(":")[2]) for d in devices]
    memory = get_balanced_memory(model, max_memory=None, no_split_module_classes=no_split)
    memory = {i: memory[i] for i in indices if i in memory}
    placement = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=placement)
