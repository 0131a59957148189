"""ai_engine_common/machine.py: the one /proc/cpuinfo parser and what is read from it."""

from __future__ import annotations

import os

import pytest

from ai_engine_common import machine

# Two hyper-threaded cores on one socket; processor 4 is outside the process's affinity.
X86 = "".join(f"processor\t: {cpu}\nmodel name\t: Xeon\nphysical id\t: 0\ncore id\t\t: {core}\n"
              f"flags\t\t: fpu sse2 avx2\n\n" for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1), (4, 2)))
# ARM: no core ids (each processor is a core), "Features", and a last block about the board.
ARM = ("processor\t: 0\nFeatures\t: fp asimd\n\nprocessor\t: 1\nFeatures\t: fp asimd\n\n"
       "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4\n")


@pytest.fixture(autouse=True)
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize("text, cores", [(X86, 2), (ARM, 2), ("", 4), ("garbage\n", 4)])
def test_physical_cores(text, cores):
    assert machine.physical_cores(text) == cores


def test_blocks_and_cpu_info():
    assert machine.cpuinfo_blocks(ARM)[-1] == {"Hardware": "BCM2835", "Model": "Raspberry Pi 4"}
    assert len(machine.cpuinfo_blocks(X86)) == 5
    x86, arm = machine.read_cpu_info(X86), machine.read_cpu_info(ARM)
    assert x86.model == "Xeon" and x86.flags == {"fpu", "sse2", "avx2"}
    assert arm.flags == {"fp", "asimd"} and arm.model  # no "model name": the platform's name


def test_the_real_machine():
    assert machine.physical_cores() >= 1 and machine.read_cpu_info().logical >= 1
    total, available = machine.memory_info()
    assert 0 < available <= total
