"""The memory kinds an expert host keeps experts in, and sizing them against the RAM that is free.

- mapped: experts are zero-copy views of the model file's map (float experts) or of the expert cache file's
  (quantized ones, in their serving format); `prefetch` asks the kernel to read pages ahead of use.
- pinned: one shared-memory segment per host (/dev/shm, MAP_SHARED) that experts are copied into, page-locked
  (registered with CUDA) where a GPU DMAs from host memory, so its pages are never swapped out or faulted in.

The GPU worker streams cold experts into its VRAM slots from its own read-only, DMA-registered map of the model
or expert cache file, not from a host's memory: a pinned copy beside that map would be a second copy of the same
experts in RAM, so a pinned host refuses to start where the worker streams (ExpertStore.from_config).
(Write-combined memory, which only DMA reads at speed, has no place here: on the H100 machine it also DMAs at
69% of pinned memory's rate, bench/stream_bench.md.)

Hosts of one user starting together take their copied memory one at a time (`host_memory_lock`): each
measures what is free only once the one before it has taken its pages, so together they cannot over-commit
RAM that each of them alone would have seen free.

Pinned memory is laid out layer by layer (each layer a page-aligned run of the experts'
page-aligned regions, as shared.expert_cache lays them out), so a migration can fill one layer and free the old
copy of that layer before it moves on.

A segment never outlives its process: it is unlinked from /dev/shm right after it is opened, and the fd
and the mapping keep it alive until the process ends, however it ends (SIGKILL included). Its name
carries the pid, so a segment left by a process killed between open and unlink is removed by the next
segment created on the machine; the process holds it locked from the open (`hold_while_open`), so a live
one's is kept even where its pid, from another PID namespace sharing /dev/shm, looks dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import time
from collections.abc import Callable, Iterator
from itertools import count

import torch

from shared.config import HOST_MEMORY_KINDS
from shared.expert_source import ExpertSource
from shared.memory_use import HostMemoryError, MemInfo, size_text
from shared.model_config import EXPERT_TENSOR_KINDS, expert_tensor_name
from shared.pages import advise
from shared.run_files import hold_while_open, remove_files_of_dead_processes

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "tierserve-experts-"
LOCK_POLL_S = 0.1
_segment_numbers = count()
log = logging.getLogger(__name__)

# ---- measured free memory and the sizing rule


def shm_free_bytes(directory: str = SHM_DIR) -> int:
    """Room left in the tmpfs that segments live in (its size is a mount option, often half of RAM)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_fit(kind: str, need: int, n_experts: int, largest_expert: int, mem: MemInfo, floor: int,
              shm_free: int | None = None, freed: int = 0) -> None:
    """Raise HostMemoryError unless `need` bytes of page-locked `kind` memory (pinned) fit in what is free now,
    less the floor. `freed` is what this host holds now in that kind and releases as it
    migrates. Swap does not count: page-locked pages cannot be swapped out. (Mapped experts are views of a
    file and need no memory of their own.)"""
    if need <= 0:
        return
    budget = mem.available + freed - floor
    limit = f"{size_text(budget)} is available after the {size_text(floor)} host_memory_floor"
    if kind == "pinned" and shm_free is not None and shm_free + freed < budget:
        budget = shm_free + freed
        limit = f"{size_text(budget)} is free in {SHM_DIR}"
    if need <= budget:
        return
    fit = max(0, budget) // max(1, largest_expert)
    raise HostMemoryError(f"placement needs {size_text(need)} of {kind} memory for {n_experts:,} experts; {limit}: "
                          f"at most {fit:,} experts fit, or use host_memory = mapped")


@contextlib.contextmanager
def host_memory_lock(waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Held from a host's fit check until its new arena is filled: another host of this user that measured free
    memory meanwhile would count pages this one is about to take. An flock, not a pid file, so the kernel lets
    go of it when its process ends, however it ends; one file per user, so hosts of different users never wait
    for each other. While another host holds it, `waiting` is called every LOCK_POLL_S (the host's heartbeat:
    a fill can outlast the coordinator's heartbeat timeout)."""
    path = os.path.join(SHM_DIR, f"tierserve-host-memory-{os.getuid()}.lock")
    try:  # no symlink followed: SHM_DIR is writable by every user
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:  # e.g. another user's file under this name: a start is not refused for the lock's sake
        fd, why = -1, e.strerror
    else:
        if os.fstat(fd).st_uid != os.getuid():  # readable, but another user's, who could hold it for ever
            os.close(fd)
            fd, why = -1, "another user's file"
    if fd < 0:  # outside the except clause: an error in the caller's block is not chained to this one
        log.warning("cannot open %s (%s): measuring free memory without waiting for other hosts", path, why)
        yield
        return
    try:
        if not _try_lock(fd):
            log.info("another expert host is filling its memory: waiting for it before measuring what is free")
            while not _try_lock(fd):
                waiting()
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # the lock goes with the file's last descriptor


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_kind(kind: str) -> None:
    """Refuse, at start-up, a memory kind there is none of."""
    if kind not in HOST_MEMORY_KINDS:
        raise HostMemoryError(f"unknown host memory kind {kind!r}; choose from {', '.join(HOST_MEMORY_KINDS)}")


# ---- copied memory, one region per layer


class SharedSegment:
    """The pinned kind: one /dev/shm segment for all of a host's layers, MAP_SHARED."""

    def __init__(self, layer_sizes: list[int], register: bool) -> None:
        remove_stale_segments()
        self.offsets = [0]
        for size in layer_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.nbytes = self.offsets[-1]
        self.register, self.registered = register, False
        path = os.path.join(SHM_DIR, f"{SEGMENT_PREFIX}{os.getuid()}-{os.getpid()}-{next(_segment_numbers)}")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        hold_while_open(self.fd)
        with contextlib.suppress(FileNotFoundError):  # a sweep in another PID namespace took it before the lock
            os.unlink(path)  # from here on nothing of it is left in /dev/shm, however this process ends
        os.ftruncate(self.fd, self.nbytes)  # sparse: pages are allocated layer by layer, as they are filled
        self.map = mmap.mmap(self.fd, self.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def region(self, layer: int) -> torch.Tensor:
        """The layer's bytes, allocated now: a full /dev/shm is an error here rather than a SIGBUS later."""
        start, end = self.offsets[layer], self.offsets[layer + 1]
        if end > start:
            try:
                os.posix_fallocate(self.fd, start, end - start)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise HostMemoryError(f"{SHM_DIR} is full: layer {layer} needs {size_text(end - start)} more "
                                      f"({size_text(shm_free_bytes())} free); enlarge it or use host_memory = mapped"
                                      ) from None
        return self._bytes[start:end]

    def finish(self) -> None:
        """Every layer is filled (so every page is faulted in): page-lock the segment (register it with CUDA) if
        asked to."""
        if not self.register or self.nbytes == 0:
            return
        err = int(torch.cuda.cudart().cudaHostRegister(self._bytes.data_ptr(), self.nbytes, 0))
        if err != 0:
            raise HostMemoryError(f"cudaHostRegister of the {size_text(self.nbytes)} expert segment failed with CUDA "
                                  f"error {err}: use host_memory = mapped")
        self.registered = True

    def release(self, layer: int) -> None:
        """Give the layer's pages back to the system (page-locked pages cannot be, so unregister first)."""
        self._unregister()
        start, end = self.offsets[layer], self.offsets[layer + 1]
        if end > start:
            self.map.madvise(mmap.MADV_REMOVE, start, end - start)

    def close(self) -> None:
        """Free every page now; the mapping itself goes with the last tensor over it."""
        if self.fd < 0:
            return
        self._unregister()
        if self.nbytes:
            self.map.madvise(mmap.MADV_REMOVE, 0, self.nbytes)
        os.close(self.fd)
        self.fd = -1

    def _unregister(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr())
            self.registered = False


def remove_stale_segments(directory: str = SHM_DIR) -> list[str]:
    """Remove this user's segments whose process is gone; the paths removed."""
    prefix = f"{SEGMENT_PREFIX}{os.getuid()}-"
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-\d+$")

    def owner(path: str) -> int | None:
        m = pattern.match(os.path.basename(path))
        return int(m.group(1)) if m else None

    return remove_files_of_dead_processes(directory, prefix, owner)


# ---- page advice over the model file's and the expert cache file's maps


def prefetch(tensors: list[torch.Tensor]) -> None:
    """Start reading these tensors' pages in (MADV_WILLNEED returns at once; the reads go on behind it)."""
    for t in tensors:
        advise(t.data_ptr(), t.numel() * t.element_size(), mmap.MADV_WILLNEED)


def drop_file_pages(source: ExpertSource, layer: int, experts: list[int]) -> None:
    """Once a layer's experts are copied out of their file (the model's for float experts, the expert cache's
    for quantized ones): unmap the layer's experts from this process and drop the copied experts' pages from
    the page cache, so RAM holds one copy of them, not two.

    The whole layer is unmapped, not expert by expert, because a fault maps the whole (large) page-cache
    folio around it, neighbours included, and a folio still mapped cannot be dropped from the cache."""
    if source.cache is not None and source.format(layer) != "float":
        cache = source.cache
        whole = cache.regions(layer)
        advise(whole.ctypes.data, whole.nbytes, mmap.MADV_DONTNEED)
        ranges = [(cache.file_offset(layer, e), whole.shape[1]) for e in experts]
        path = cache.path
    else:
        model = source.model
        ranges = []
        for kind in EXPERT_TENSOR_KINDS:
            name = expert_tensor_name(layer, kind)
            whole = model.raw(name)
            advise(whole.ctypes.data, whole.nbytes, mmap.MADV_DONTNEED)
            for e in experts:
                stored = model.expert_bytes(layer, kind, e)
                ranges.append((model.file_offset(name) + stored.ctypes.data - whole.ctypes.data, stored.nbytes))
        path = model.path
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, nbytes in ranges:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
