"""Generated models shared by the expert-host tests, and readings of this process's memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from expert_host.memory import SEGMENT_PREFIX, SHM_DIR
from shared.make_model import make_model


@pytest.fixture(scope="session")
def expert_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset in three storage types: fp32 and bf16 experts are mapped as views, q8_0 dequantized."""
    directory = tmp_path_factory.mktemp("expert_host")
    paths = {}
    for dtype in ("f32", "bf16", "q8_0"):
        paths[dtype] = directory / f"tiny-{dtype}.gguf"
        make_model(paths[dtype], preset="tiny", dtype=dtype, seed=3)
    return paths


def memory_status() -> dict[str, int]:
    """This process's /proc/self/status memory lines (VmRSS, VmHWM, RssShmem, ...) in bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(kb) * 1024 for key, kb in re.findall(r"^(\w+):\s+(\d+) kB$", text, re.M)}


def segment_mappings(pid: int | str = "self") -> list[str]:
    """Lines of a process's memory map that are expert segments."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/tierserve-experts-" in line]


def segment_names() -> set[str]:
    """Expert segments by name in /dev/shm (other files there belong to other parts of the system)."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith(SEGMENT_PREFIX)}
