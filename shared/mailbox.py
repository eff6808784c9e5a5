"""A shared-memory mailbox: one exchange at a time between a gpu_worker and an expert host on one machine.

The host creates the mailbox (a file in /dev/shm) and answers it; the worker attaches, writes a request's
rows straight into the request area, publishes it, and waits for the answer in the response area. No
sockets: a round trip is a few microseconds where a ZeroMQ one costs tens.

Layout (byte offsets; every field naturally aligned, the two sequence numbers on cache lines of their own):

    0       magic, capacity (u64: bytes of each payload area), max_experts (u32)
    64      request sequence number (u32), stored by the worker after the request
    128     response sequence number (u32), stored by the host after the answer
    192     request: step (i64), layer, n_experts, rows, cols, dtype code (i32 each)
    224     response: status, rows, cols, dtype code, code length, message length (i32 each), compute_s (f64)
    256     failure code and message (TEXT_BYTES of utf-8)
    ...     expert ids (i32 x max_experts), counts (i32 x max_experts)
    page    request payload (capacity bytes), then response payload (capacity bytes)

Sequence numbers are compared for equality only and wrap modulo 2**32. One request is outstanding at a time;
a request is pending while the request number differs from the last one the host took, and answered when the
response number equals it, so an answer the host finishes after the worker gave up on it (perhaps computed from
rows the next request was overwriting) is never mistaken for the answer to a later request.

Memory ordering: the writer fills a payload and its metadata with ordinary stores, then stores the sequence
number; the reader loads the sequence number, then the rest. That is enough on x86-64, whose total store order
makes stores visible to other cores in program order and never reorders a load with an older load (glibc's
non-temporal copies end with sfence). Python has no fences, so elsewhere the mailbox is not used
(ORDERED_STORES) and the data plane stays on ZeroMQ.

A worker on a CUDA device page-locks both payload areas (`register_for_dma`), so the GPU copies activations
straight into the request area and results straight out of the response area, where copies to and from
pageable memory are staged by the driver through a bounce buffer of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import mmap
import os
import platform
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")

MAGIC = b"TSMBOX01"
SEQ_MASK = 0xFFFFFFFF
TEXT_BYTES = 1024
PAGE = mmap.PAGESIZE
DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_DTYPE_OF = {code: dtype for dtype, code in DTYPES.items()}

_HEADER = struct.Struct("<8sQI")
_REQUEST_SEQ, _RESPONSE_SEQ = 64, 128
_REQUEST = struct.Struct("<qiiiii")  # step, layer, n_experts, rows, cols, dtype
_REQUEST_AT = 192
_RESPONSE = struct.Struct("<iiiiiid")  # status, rows, cols, dtype, code length, message length, compute_s
_RESPONSE_AT = 224
_TEXT_AT = 256
_IDS_AT = _TEXT_AT + TEXT_BYTES
_OK, _FAILED = 0, 1

# Waiting: poll for SPIN_S after the last exchange, then sleep in steps doubling from FIRST_SLEEP_S, so a waiter
# with nothing coming stops burning a core. The spin has to outlast the gap between one layer's crossing and the
# next (about a millisecond of trunk work here); a host that sleeps through it wakes a sleep's length late, which
# cost more than ZeroMQ saves (bench/crossing_bench.md). Each poll yields the core, so a spinner delays nothing
# else runnable: on a machine with fewer cores than tierserve processes, spinning without yielding was slower
# than ZeroMQ.
SPIN_S = 2e-3
FIRST_SLEEP_S = 20e-6


@functools.cache
def cuda_driver() -> ctypes.CDLL:
    # The driver API rather than torch.cuda.cudart(): a refused registration there stays behind as the runtime's
    # last error, for torch's next kernel launch to raise.
    return ctypes.CDLL("libcuda.so.1")


class MailboxError(ValueError):
    """Not a mailbox, a mailbox in use by another worker, or a request that does not describe its payload."""


def mailbox_path(endpoint: str) -> str:
    """Where the host behind a data endpoint keeps its worker's mailbox; ipc endpoints live in the run dir,
    so the name is private to one run and a restarted host finds (and replaces) its predecessor's."""
    return f"/dev/shm/tierserve-mailbox-{hashlib.sha256(endpoint.encode()).hexdigest()[:20]}"


def remove_mailbox(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Backoff:
    """Poll (yielding the core) for SPIN_S after `reset`, then sleep in steps doubling up to `max_sleep_s`."""

    def __init__(self, max_sleep_s: float) -> None:
        self.max_sleep_s = max_sleep_s
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.sleep_s = FIRST_SLEEP_S

    def wait(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Until ready() (True) or the time.monotonic() deadline (False)."""
        while not ready():
            now = time.monotonic()
            if now >= deadline:
                return False
            if now - self.since < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(min(self.sleep_s, deadline - now))
                self.sleep_s = min(2 * self.sleep_s, self.max_sleep_s)
        return True


@dataclass
class Request:
    """A request as the host reads it; `hidden` is a view of the request area, valid until it answers."""

    step: int
    layer: int
    experts: list[int]
    counts: list[int]
    hidden: torch.Tensor


@dataclass
class Answer:
    """The host's answer as the worker reads it; `output` is a view of the response area, valid until the
    next request. A failed exchange has `failure` = (code, message) and no output."""

    output: torch.Tensor | None
    compute_s: float
    failure: tuple[str, str] | None = None


class Mailbox:
    """One side of a mailbox; `create` is the host's, `attach` the worker's."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd
        stat = os.fstat(fd)
        self.identity = (stat.st_dev, stat.st_ino)
        self._map = mmap.mmap(fd, stat.st_size)
        magic, self.capacity, self.max_experts = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or stat.st_size < self._payload_at() + 2 * self.capacity:
            self._map.close()
            raise MailboxError(f"{path} is not a tierserve mailbox")
        self._request_seq = memoryview(self._map)[_REQUEST_SEQ : _REQUEST_SEQ + 4].cast("I")
        self._response_seq = memoryview(self._map)[_RESPONSE_SEQ : _RESPONSE_SEQ + 4].cast("I")
        with warnings.catch_warnings():  # the map is writable; torch warns about any buffer it cannot prove so
            warnings.simplefilter("ignore", UserWarning)
            self._areas = [torch.frombuffer(self._map, dtype=torch.uint8, count=self.capacity,
                                            offset=self._payload_at() + i * self.capacity) for i in (0, 1)]
        self._typed: dict[tuple[int, torch.dtype, int], torch.Tensor] = {}
        self._seq = self._request_seq[0]  # the worker's last request; the host's last taken request
        self.dma: bool | None = None  # payload areas page-locked for the GPU; None: not tried

    def _payload_at(self) -> int:
        return -(-(_IDS_AT + 8 * self.max_experts) // PAGE) * PAGE

    @classmethod
    def create(cls, path: str, capacity: int, max_experts: int, first_seq: int = 0) -> Mailbox:
        """A fresh mailbox at `path`, replacing whatever is there (a crashed predecessor's). It is made ready
        under a temporary name, host side included, and renamed into place: a worker may post the moment the
        name appears, and that request must already count as pending."""
        capacity = -(-capacity // PAGE) * PAGE
        payload_at = -(-(_IDS_AT + 8 * max_experts) // PAGE) * PAGE
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, payload_at + 2 * capacity)  # tmpfs is sparse: pages appear when first written
            with mmap.mmap(fd, payload_at) as header:
                _HEADER.pack_into(header, 0, MAGIC, capacity, max_experts)
                struct.pack_into("<I", header, _REQUEST_SEQ, first_seq & SEQ_MASK)
                struct.pack_into("<I", header, _RESPONSE_SEQ, first_seq & SEQ_MASK)
            mailbox = cls(path, fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            remove_mailbox(tmp)
            raise
        return mailbox

    @classmethod
    def attach(cls, path: str) -> Mailbox:
        """The worker's side of the mailbox at `path`: FileNotFoundError when there is none, MailboxError when
        it is not one or another worker holds it (an exclusive lock, released when the worker exits)."""
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxError(f"{path} is in use by another worker") from None
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def register_for_dma(self) -> int:
        """Page-lock both payload areas for the current CUDA device, so device copies into and out of them are
        DMAs; returns the CUDA driver's result (0: registered). `dma` says how it went (None: never tried)."""
        err = cuda_driver().cuMemHostRegister_v2(ctypes.c_void_p(self._areas[0].data_ptr()),
                                                  ctypes.c_size_t(2 * self.capacity), ctypes.c_uint(0))
        self.dma = err == 0
        return err

    def close(self) -> None:
        """Unmap (once the last view a caller holds is gone) and release the worker's lock. A registered
        mailbox waits for the device first: a copy out of the response area may still be queued."""
        if self.dma:
            torch.cuda.synchronize()
            cuda_driver().cuMemHostUnregister(ctypes.c_void_p(self._areas[0].data_ptr()))
            self.dma = None
        self._request_seq.release()
        self._response_seq.release()
        self._areas, self._typed = [], {}
        with contextlib.suppress(BufferError):  # views still held by a caller keep the map until they go
            self._map.close()
        os.close(self._fd)

    def _rows(self, area: int, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        key = (area, dtype, cols)
        typed = self._typed.get(key)
        if typed is None:
            n_rows = self.capacity // (cols * dtype.itemsize)
            typed = self._typed[key] = self._areas[area].view(dtype)[: n_rows * cols].view(n_rows, cols)
        return typed[:rows]

    # --- worker side ------------------------------------------------------------------------------------

    def fits(self, rows: int, cols: int, dtype: torch.dtype, n_experts: int) -> bool:
        return dtype in DTYPES and n_experts <= self.max_experts and rows * cols * dtype.itemsize <= self.capacity

    def request_rows(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """The request area as (rows, cols) of dtype, for the caller to fill before `post` (check `fits`)."""
        return self._rows(0, dtype, rows, cols)

    def post(self, step: int, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> int:
        """Publish a request whose rows the caller wrote into `request_rows`; returns its sequence number."""
        rows, cols = hidden.shape
        n = len(experts)
        _REQUEST.pack_into(self._map, _REQUEST_AT, step, layer, n, rows, cols, DTYPES[hidden.dtype])
        struct.pack_into(f"<{n}i", self._map, _IDS_AT, *experts)
        struct.pack_into(f"<{n}i", self._map, _IDS_AT + 4 * self.max_experts, *counts)
        self._seq = (self._seq + 1) & SEQ_MASK
        self._request_seq[0] = self._seq  # last: publishes everything above
        return self._seq

    def wait_answer(self, seq: int, timeout_s: float) -> bool:
        return Backoff(max_sleep_s=FIRST_SLEEP_S).wait(lambda: self._response_seq[0] == seq,
                                                       time.monotonic() + timeout_s)

    def answer(self) -> Answer:
        """The answer to the last request (once `wait_answer` returned True)."""
        status, rows, cols, dtype, code_len, msg_len, compute_s = _RESPONSE.unpack_from(self._map, _RESPONSE_AT)
        if status != _OK:
            code = self._map[_TEXT_AT : _TEXT_AT + code_len].decode()
            message = self._map[_TEXT_AT + code_len : _TEXT_AT + code_len + msg_len].decode("utf-8", "replace")
            return Answer(None, compute_s, (code, message))
        return Answer(self._rows(1, _DTYPE_OF[dtype], rows, cols), compute_s)

    # --- host side --------------------------------------------------------------------------------------

    def pending(self) -> bool:
        return self._request_seq[0] != self._seq

    def take(self) -> Request:
        """The pending request. MailboxError when its metadata does not describe a payload in this mailbox
        (answer that with `fail`); the request counts as taken either way."""
        self._seq = self._request_seq[0]
        step, layer, n, rows, cols, code = _REQUEST.unpack_from(self._map, _REQUEST_AT)
        dtype = _DTYPE_OF.get(code)
        if dtype is None or not 0 <= n <= self.max_experts or rows < 0 or cols <= 0 or \
                rows * cols * dtype.itemsize > self.capacity:
            raise MailboxError(f"request {self._seq}: {n} experts, {rows} x {cols} rows of dtype code {code} "
                               f"do not fit this mailbox")
        experts = list(struct.unpack_from(f"<{n}i", self._map, _IDS_AT))
        counts = list(struct.unpack_from(f"<{n}i", self._map, _IDS_AT + 4 * self.max_experts))
        return Request(step, layer, experts, counts, self._rows(0, dtype, rows, cols))

    def reply(self, output: torch.Tensor, compute_s: float) -> None:
        """Answer the taken request with `output`, copied into the response area."""
        rows, cols = output.shape
        if output.dtype not in DTYPES or rows * cols * output.dtype.itemsize > self.capacity:
            self.fail("bad_output", f"output {tuple(output.shape)} {output.dtype} does not fit the mailbox")
            return
        self._rows(1, output.dtype, rows, cols).copy_(output)
        _RESPONSE.pack_into(self._map, _RESPONSE_AT, _OK, rows, cols, DTYPES[output.dtype], 0, 0, compute_s)
        self._response_seq[0] = self._seq  # last: publishes the answer

    def fail(self, code: str, message: str) -> None:
        """Answer the taken request with a failure."""
        code_bytes = code.encode("ascii", "replace")[: TEXT_BYTES // 4]
        msg_bytes = message.encode()[: TEXT_BYTES - len(code_bytes)]
        self._map[_TEXT_AT : _TEXT_AT + len(code_bytes) + len(msg_bytes)] = code_bytes + msg_bytes
        _RESPONSE.pack_into(self._map, _RESPONSE_AT, _FAILED, 0, 0, 0, len(code_bytes), len(msg_bytes), 0.0)
        self._response_seq[0] = self._seq
