"""Pages of memory-mapped files: advice to the kernel about them (madvise over any address range), and
tensors over read-only mappings."""

from __future__ import annotations

import ctypes
import mmap
import os
import warnings

import numpy as np
import torch

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def advise(address: int, nbytes: int, advice: int) -> None:
    """madvise over every page that [address, address + nbytes) touches."""
    start = address - address % PAGE
    if _libc.madvise(start, address + nbytes - start, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise: {os.strerror(err)}")


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only mapping's pages, zero-copy. torch warns that it cannot mark tensors
    read-only; these are only ever read (computed from, or copied from into VRAM or page-locked memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
