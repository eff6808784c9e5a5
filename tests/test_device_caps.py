"""Unified-memory detection: the decision from made-up attribute values of real kinds of systems."""

from __future__ import annotations

import pytest
import torch

from shared.device_caps import HOST_DMA, PAGEABLE, UNIFIED, decide, read_device_caps


@pytest.mark.parametrize(("system", "register_supported", "host_page_tables", "register_works", "expected"), [
    ("H100 on PCIe", True, False, True, HOST_DMA),
    ("register attribute not probed yet", True, False, None, HOST_DMA),
    ("GB10: registration not supported, coherent access to host memory", False, True, None, UNIFIED),
    ("Grace Hopper: registration works, but the GPU reads host page tables", True, True, True, UNIFIED),
    ("attribute set, registration answers not-supported", True, False, False, PAGEABLE),
    ("no registration, no coherent access (e.g. WSL)", False, False, None, PAGEABLE),
])
def test_decision_from_device_attributes(system, register_supported, host_page_tables, register_works, expected):
    assert decide(register_supported, host_page_tables, register_works) == expected, system


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_no_caps_without_cuda():
    assert read_device_caps() is None
