"""How this machine's GPU reaches host memory, decided once at start-up.

- `host_dma`: the GPU DMAs from page-locked host memory (cudaHostRegister works), so experts held in
  host memory are copied into VRAM slots to be computed there (discrete GPUs on PCIe).
- `unified`: the GPU reads pageable host memory through the host's own page tables (Grace Hopper,
  GB10 and other coherent systems, where cudaHostRegister is often not supported): the GPU computes
  straight from host memory, and experts must never be copied into device allocations.
- `pageable`: neither; host-to-GPU copies go through pageable memory at a fraction of the link's speed.

The decision is a pure function of the attribute values; only `read_device_caps` touches CUDA.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import torch

HOST_DMA, UNIFIED, PAGEABLE = "host_dma", "unified", "pageable"

# CUdevice_attribute values (the same numbers as the runtime's cudaDevAttr*).
_ATTR_HOST_REGISTER_SUPPORTED = 99
_ATTR_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES = 100
_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_SUPPORTED = 801


@dataclass(frozen=True)
class DeviceCaps:
    device: int
    name: str
    host_register_supported: bool  # device attribute HostRegisterSupported
    pageable_uses_host_page_tables: bool  # device attribute PageableMemoryAccessUsesHostPageTables
    host_register_works: bool | None  # cudaHostRegister of a test page; False when it said not-supported
    decision: str  # HOST_DMA | UNIFIED | PAGEABLE


def decide(host_register_supported: bool, pageable_uses_host_page_tables: bool,
           host_register_works: bool | None = None) -> str:
    """How expert weights in host memory reach the GPU, from the device attributes and a registration probe."""
    if pageable_uses_host_page_tables:
        return UNIFIED  # coherent access to any host page: a device copy would only duplicate the weights
    if host_register_supported and host_register_works is not False:
        return HOST_DMA
    return PAGEABLE


def read_device_caps(device: int = 0) -> DeviceCaps | None:
    """The capabilities of CUDA device `device`, or None on a machine without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)  # makes the device's primary context current for the driver calls below
    cuda = ctypes.CDLL("libcuda.so.1")
    handle = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")

    def attribute(attr: int) -> bool:
        value = ctypes.c_int()
        _check(cuda.cuDeviceGetAttribute(ctypes.byref(value), attr, handle), "cuDeviceGetAttribute")
        return bool(value.value)

    register_supported = attribute(_ATTR_HOST_REGISTER_SUPPORTED)
    host_page_tables = attribute(_ATTR_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES)
    works = _probe_host_register(cuda) if register_supported else None
    return DeviceCaps(device, torch.cuda.get_device_name(device), register_supported, host_page_tables, works,
                      decide(register_supported, host_page_tables, works))


def _probe_host_register(cuda: ctypes.CDLL) -> bool:
    """Register one page of anonymous memory, then unregister it: some systems advertise the attribute and
    still answer not-supported. Through the driver API, so a refusal leaves no error behind for the
    runtime's next error check (torch's kernel launches) to trip over."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    view = (ctypes.c_char * mmap.PAGESIZE).from_buffer(page)
    try:
        err = cuda.cuMemHostRegister_v2(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(mmap.PAGESIZE), 0)
        if err == _CUDA_SUCCESS:
            _check(cuda.cuMemHostUnregister(ctypes.c_void_p(ctypes.addressof(view))), "cuMemHostUnregister")
            return True
        if err == _CUDA_ERROR_NOT_SUPPORTED:
            return False
        raise RuntimeError(f"cuMemHostRegister of a test page failed with CUDA driver error {err}")
    finally:
        del view
        page.close()


def _check(result: int, what: str) -> None:
    if result != _CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")
