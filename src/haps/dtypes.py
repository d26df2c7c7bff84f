"""Which floating dtype runs fast where: ``auto`` resolves to bf16 only where bf16 matmuls are native.

On CPUs, bf16 is fast only with native bf16 instructions (AMX-BF16 or AVX512-BF16): there a prefill-sized
matmul ran about 6x faster than fp32 on one core (Xeon with AMX, (7200 x 576) @ (576 x 1536)), while on an
AVX2-only CPU bf16 decode ran 9x slower than fp32 (emulated). On CUDA, bf16 where the GPU supports it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # light at import (the CLI's settings name `DtypeName`)
    import torch

DtypeName = Literal["auto", "float32", "bfloat16"]

#: CPU flags (``/proc/cpuinfo``) with native bf16 matmuls
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls are native on ``device``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and bool(cpu_flags() & BF16_CPU_FLAGS)


def resolve_dtype_name(name: str, device: torch.device | str = "cpu") -> str:
    """A dtype name as given (``float32``, ``bfloat16``, ``float16``); ``auto``: ``bfloat16`` where `fast_bf16`,
    else ``float32``."""
    if name == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return name


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of `resolve_dtype_name`."""
    import torch

    return getattr(torch, resolve_dtype_name(name, device))
