"""The machine a benchmark ran on, recorded in every benchmark JSON: the CPU (``lscpu``'s model name, the flags that
decide which dtypes run fast), the core count and torch's version and thread count."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from haps.dtypes import cpu_flags

#: CPU flags that decide whether fp16 / bf16 / int8 kernels are fast
DTYPE_FLAGS = ("fma", "f16c", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
               "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_info() -> dict[str, Any]:
    """``{"machine", "cpus", "model_name", "dtype_flags", "torch", "torch_threads"}`` of this process."""
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    info["model_name"] = fields.get("Model name")
    flags = cpu_flags() or set(fields.get("Flags", "").split())  # /proc/cpuinfo, as `haps.dtypes` reads them
    info["dtype_flags"] = [f for f in DTYPE_FLAGS if f in flags]
    info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    return info
