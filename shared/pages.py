"""Advice to the kernel about pages of memory-mapped files (madvise over any address range)."""

from __future__ import annotations

import ctypes
import mmap
import os

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def advise(address: int, nbytes: int, advice: int) -> None:
    """madvise over every page that [address, address + nbytes) touches."""
    start = address - address % PAGE
    if _libc.madvise(start, address + nbytes - start, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise: {os.strerror(err)}")
