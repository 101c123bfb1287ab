"""Measuring a training or inference step: wall time, peak memory and FLOPs (torch's flop
counter, with the CPU attention kernels counted like the CUDA ones), and the fraction of the
device's peak. Shared by ``mimbench bench``, the recipe benchmarks and the OpenMMLab glue."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter as fc

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``
#: (vendors' data sheets: A100 312, H100 / H200 SXM 989, L40S 362, V100 125 fp16).
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "V100": 125.0,
}

def peak_fraction(flops_per_s: float, device_name: str) -> float | None:
    """Achieved FLOP/s over the device's dense bf16 peak, or None for a device not in the table."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return flops_per_s / (tflops * 1e12)
    return None


def _cpu_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU kernels of scaled-dot-product attention, which torch's counter
    does not register (it knows the CUDA flash / efficient / cuDNN ones): the same counts."""
    aten = torch.ops.aten

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return int(fc.sdpa_flop_count(q, k, v))

    def backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                 **kw: Any) -> int:  # fmt: skip
        return int(fc.sdpa_backward_flop_count(grad_out, q, k, v))

    table: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return table


def count_flops(step: Callable[[], None]) -> float:
    """Total FLOPs of one call of ``step`` (forward and backward), by torch's flop counter
    (with the CPU attention kernels counted like the GPU ones)."""
    counter = fc.FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        step()
    return float(counter.get_total_flops())


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: Any) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_step(step: Callable[[], None], steps: int, device: Any) -> list[float]:
    """Seconds of ``steps`` calls of ``step`` after one warm-up call."""
    times = []
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return times


