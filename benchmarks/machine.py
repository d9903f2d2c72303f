# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What machine a benchmark ran on, for the first line of its output (the CPU model varies between sessions, and
figures from different CPUs are not comparable)."""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_model", "cpu_flags", "load_average", "machine_line"]


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector instruction sets that decide PyTorch's CPU kernels: AVX-512 and AMX when present, else AVX2."""
    flags = set((_cpuinfo("flags") or "").split())
    names = [n for n in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if n in flags]
    return " ".join(names) or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    """``machine: <CPU model> (<vector sets>), <n> cores, torch <version> (<threads> threads, kernels <capability>),
    load average ...``: the capability is the instruction set of the ATen kernels torch dispatches to (the CPU's
    best, or what ``ATEN_CPU_CAPABILITY`` asks for)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"machine: {cpu_model()} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, kernels {capability}), load average {load_average()}"
    )
