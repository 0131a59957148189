"""What this machine has: physical cores, the CPU's model and feature flags, RAM.

/proc/cpuinfo is parsed here only (`cpuinfo_blocks`): the settings' thread defaults, `ai-engine
doctor`, the converter's verification and the benchmark read it through these functions.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path


def cpuinfo_blocks(text: str | None = None) -> list[dict[str, str]]:
    """/proc/cpuinfo (or `text`) as one {key: value} dict per blank-line-separated block: one per
    logical CPU (ARM adds a last block about the board). Empty where the file is missing."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            text = ""
    blocks: list[dict[str, str]] = []
    block: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key:
            block.setdefault(key, value.strip())
        elif block:
            blocks.append(block)
            block = {}
    if block:
        blocks.append(block)
    return blocks


def physical_cores(text: str | None = None) -> int:
    """Physical cores this process may run on (hyper-threads share a core's decode throughput).
    `text`: /proc/cpuinfo's content (read when not given)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    for block in cpuinfo_blocks(text):
        cpu = block.get("processor", "")
        if cpu.isdigit() and int(cpu) in allowed:
            cores.add((block.get("physical id") or "0", block.get("core id", cpu)))
    return max(1, len(cores) or len(allowed))


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as /proc/cpuinfo describes it."""

    model: str
    flags: frozenset[str]
    logical: int


def read_cpu_info(text: str | None = None) -> CpuInfo:
    """Model name and feature flags of the first CPU in /proc/cpuinfo (or in `text`)."""
    blocks = cpuinfo_blocks(text)
    model = next((b["model name"] for b in blocks if "model name" in b), None)
    # x86 says "flags", ARM "Features"
    flags = next((value for b in blocks for key, value in b.items() if key in ("flags", "Features")), None)
    return CpuInfo(model=model or platform.processor() or platform.machine(),
                   flags=frozenset(flags.split()) if flags else frozenset(), logical=os.cpu_count() or 1)


def memory_info() -> tuple[int, int]:
    """(total, available) RAM in bytes; available falls back to free where the kernel lacks it."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in values:
        return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError, AttributeError):
        return 0, 0
