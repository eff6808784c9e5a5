"""A shared-memory mailbox: one exchange at a time between a gpu_worker and an expert host on one machine.

The host creates the mailbox (a file in /dev/shm) and answers it; the worker attaches, writes a request's
rows straight into the request area, publishes it, and waits for the answer in the response area. No
sockets: a round trip is a few microseconds where a ZeroMQ one costs tens.

Layout (byte offsets; every field naturally aligned, the sequence numbers and flags on cache lines of their own):

    0       magic, capacity (u64: bytes of each payload area), max_experts, n_layers (u32 each)
    64      request sequence number (u32), stored by the worker after the request
    128     response sequence number (u32), stored by the host after the answer
    192     request: step (i64), layer, n_experts, rows, cols, dtype code (i32 each)
    224     response: status, rows, cols, dtype code, code length, message length (i32 each), compute_s (f64)
    256     lane request flag (u32): the value of the lane's posted request, 0 once the host took it
    320     lane response flag (u32): the value of the request the host answered, 0 once the worker read it
    384     lane: rows, padded rows, top-k, cols, dtype code (i32 each; the worker's), then the host's: status,
            failure code and message lengths (i32 each), pairs computed in all (i64 at 416), the value of the
            request it took last (u32 at 424); the worker's generation (u32 at 428)
    448     failure code and message (TEXT_BYTES of utf-8), then the lane's (TEXT_BYTES)
    ...     expert ids (i32 x max_experts), counts (i32 x max_experts)
    ...     the lane's owner table: one byte per (layer, expert), 1 where this host computes the expert
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

A worker on a CUDA device page-locks the whole mailbox (`register_for_dma`), so the GPU copies activations
straight into the request area and results straight out of the response area, where copies to and from
pageable memory are staged by the driver through a bounce buffer of its own.

The lane is the exchange a decode step makes without the worker's Python: the device itself copies a layer's
rows, expert ids and routing weights into the request area (ids, then weights, then rows 64-byte aligned; the
answer at the start of the response area) and raises the request flag; the host computes the pairs routed to the
experts the owner table gives it, writes each row's weighted sum and raises the response flag, which the device
waits on (gpu_worker/crossing.py). A request's value is generation x (n_layers + 1) + layer + 1 (`lane_value`):
a captured CUDA graph writes the same values on every replay, so they repeat from step to step; the host clears
the request flag when it takes a request and answers with its value, and the device clears the response flag
once it has the answer. A worker begins a new generation (counted in the mailbox, so a worker that restarts
continues it) for a new lane and after a failed exchange: an answer to an abandoned request then carries a
smaller value than any it waits for (values compare as the device does, (int32)(flag - value) >= 0), and the
poison that drains a stream stuck on a host satisfies every wait of one generation and none of the next. The
worker writes the lane's shapes and the owner table with ordinary stores while no lane request is in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.run_files import MAILBOX_MAGIC, MAILBOX_OWNER_AT, hold_while_open

ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")

SEQ_MASK = 0xFFFFFFFF
TEXT_BYTES = 1024
PAGE = mmap.PAGESIZE
DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_DTYPE_OF = {code: dtype for dtype, code in DTYPES.items()}

_HEADER = struct.Struct("<8sQII")
_REQUEST_SEQ, _RESPONSE_SEQ = 64, 128
_REQUEST = struct.Struct("<qiiiii")  # step, layer, n_experts, rows, cols, dtype
_REQUEST_AT = 192
_RESPONSE = struct.Struct("<iiiiiid")  # status, rows, cols, dtype, code length, message length, compute_s
_RESPONSE_AT = 224
_LANE_REQUEST, _LANE_RESPONSE = 256, 320
_LANE = struct.Struct("<iiiii")  # rows, padded rows, top-k, cols, dtype (the worker's)
_LANE_AT = 384
_LANE_FAILURE = struct.Struct("<iii")  # status, code length, message length (the host's)
_LANE_FAILURE_AT = 404
_LANE_PAIRS_AT = 416  # i64: pairs computed through the lane in all (the host's)
_LANE_TAKEN_AT = 424  # u32: the value of the request the host took last (the host's)
_LANE_GENERATION_AT = 428  # u32: the last generation a worker began (the worker's)
_LANE_FAILED_AT = 432  # u32: the value of the request the failure answered (the host's)
_TEXT_AT = 448
_LANE_TEXT_AT = _TEXT_AT + TEXT_BYTES
_IDS_AT = _LANE_TEXT_AT + TEXT_BYTES
_OK, _FAILED = 0, 1
_CU_MEMHOSTREGISTER_DEVICEMAP = 0x02

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


def _owners_at(max_experts: int) -> int:
    return _IDS_AT + 8 * max_experts


def _payload_at(max_experts: int, n_layers: int) -> int:
    return -(-(_owners_at(max_experts) + n_layers * max_experts) // PAGE) * PAGE


class MailboxError(ValueError):
    """Not a mailbox, a mailbox in use by another worker, or a request that does not describe its payload."""


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


@dataclass
class LaneAreas:
    """The lane's payload as the device fills and reads it, for `padded` rows: views of the mailbox."""

    ids: torch.Tensor  # (padded, k) int32: each row's routed experts
    weights: torch.Tensor  # (padded, k) float32: their routing weights
    hidden: torch.Tensor  # (padded, cols): the rows
    out: torch.Tensor  # (padded, cols): each row's weighted sum over the pairs the host computed


@dataclass
class LaneRequest:
    """A lane request as the host reads it: the real rows' views, valid until it answers."""

    layer: int
    ids: torch.Tensor
    weights: torch.Tensor
    hidden: torch.Tensor
    out: torch.Tensor  # every padded row: the host writes the padding's rows too (zeros)
    owned: torch.Tensor  # (max_experts,) bool: the experts of the layer this host computes


def _lane_rows_at(padded: int, k: int) -> int:
    """Offset of the lane's rows in the request area: after the ids and weights, 64-byte aligned."""
    return -(-(8 * padded * k) // 64) * 64


class Mailbox:
    """One side of a mailbox; `create` is the host's, `attach` the worker's."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd
        stat = os.fstat(fd)
        self.identity = (stat.st_dev, stat.st_ino)
        if stat.st_size < _HEADER.size:  # nothing to map or to read a header from
            raise MailboxError(f"{path} is not a tierserve mailbox")
        self._map = mmap.mmap(fd, stat.st_size)
        magic, self.capacity, self.max_experts, self.n_layers = _HEADER.unpack_from(self._map, 0)
        if magic != MAILBOX_MAGIC or stat.st_size < _payload_at(self.max_experts, self.n_layers) + 2 * self.capacity:
            self._map.close()
            raise MailboxError(f"{path} is not a tierserve mailbox")
        self.size = stat.st_size
        self._request_seq = memoryview(self._map)[_REQUEST_SEQ : _REQUEST_SEQ + 4].cast("I")
        self._response_seq = memoryview(self._map)[_RESPONSE_SEQ : _RESPONSE_SEQ + 4].cast("I")
        self._lane_request = memoryview(self._map)[_LANE_REQUEST : _LANE_REQUEST + 4].cast("I")
        self._lane_response = memoryview(self._map)[_LANE_RESPONSE : _LANE_RESPONSE + 4].cast("I")
        self._lane_taken = 0  # the host's: the flag value of the lane request it took
        with warnings.catch_warnings():  # the map is writable; torch warns about any buffer it cannot prove so
            warnings.simplefilter("ignore", UserWarning)
            self._areas = [torch.frombuffer(self._map, dtype=torch.uint8, count=self.capacity,
                                            offset=_payload_at(self.max_experts, self.n_layers) + i * self.capacity)
                           for i in (0, 1)]
            # where the mailbox starts in this process: the lane's flags and areas are at fixed offsets from it
            self.address = self._areas[0].data_ptr() - _payload_at(self.max_experts, self.n_layers)
            self._owners = torch.frombuffer(self._map, dtype=torch.bool, count=self.n_layers * self.max_experts,
                                            offset=_owners_at(self.max_experts)).view(self.n_layers,
                                                                                      self.max_experts)
        self._typed: dict[tuple[int, torch.dtype, int], torch.Tensor] = {}
        # the host's: each layer's lane request views, made once per layer and lane header, not once per request
        self._lane_requests: dict[int, LaneRequest] = {}
        self._lane_header: tuple[int, ...] = ()
        self._seq = self._request_seq[0]  # the worker's last request; the host's last taken request
        self.dma: bool | None = None  # the mailbox page-locked and mapped for the GPU; None: not tried

    @classmethod
    def create(cls, path: str, capacity: int, max_experts: int, first_seq: int = 0, n_layers: int = 1) -> Mailbox:
        """A fresh mailbox at `path`, replacing whatever is there (a crashed predecessor's). It is made ready
        under a temporary name, host side included, and renamed into place: a worker may post the moment the
        name appears, and that request must already count as pending. `n_layers`: the lane's owner table's."""
        capacity = -(-capacity // PAGE) * PAGE
        payload_at = _payload_at(max_experts, n_layers)
        tmp = f"{path}.{os.getpid()}.tmp"
        remove_mailbox(tmp)  # a predecessor that died here under this pid (a container's restart); no one else's
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            hold_while_open(fd)  # the pid in the name and header means nothing to a sweep in another PID namespace
            try:  # every page allocated now: a full tmpfs is an error here, not a SIGBUS in whichever side writes
                os.posix_fallocate(fd, 0, payload_at + 2 * capacity)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise MailboxError(f"{os.path.dirname(path) or '.'} has no room for a mailbox of "
                                   f"{payload_at + 2 * capacity} bytes") from None
            with mmap.mmap(fd, payload_at) as header:
                _HEADER.pack_into(header, 0, MAILBOX_MAGIC, capacity, max_experts, n_layers)
                struct.pack_into("<I", header, MAILBOX_OWNER_AT, os.getpid())
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
        """Page-lock the mailbox for the current CUDA device and map it into the device's address space, so
        device copies into and out of its areas are DMAs and the device can raise and wait on the lane's flags;
        returns the CUDA driver's result (0: registered). `dma` says how it went (None: never tried)."""
        err = cuda_driver().cuMemHostRegister_v2(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size),
                                                  ctypes.c_uint(_CU_MEMHOSTREGISTER_DEVICEMAP))
        self.dma = err == 0
        return err

    def close(self) -> None:
        """Unmap (once the last view a caller holds is gone) and release the worker's lock. A registered
        mailbox waits for the device first: a copy out of the response area may still be queued."""
        if self.dma:
            torch.cuda.synchronize()
            cuda_driver().cuMemHostUnregister(ctypes.c_void_p(self.address))
            self.dma = None
        for view in (self._request_seq, self._response_seq, self._lane_request, self._lane_response):
            view.release()
        self._areas, self._typed, self._owners = [], {}, None  # type: ignore[assignment]
        self._lane_requests = {}
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
        """The answer to the last request (once `wait_answer` returned True). MailboxError when its metadata does
        not describe an output in this mailbox."""
        status, rows, cols, dtype, code_len, msg_len, compute_s = _RESPONSE.unpack_from(self._map, _RESPONSE_AT)
        if status != _OK:
            code = self._map[_TEXT_AT : _TEXT_AT + code_len].decode("ascii", "replace")
            message = self._map[_TEXT_AT + code_len : _TEXT_AT + code_len + msg_len].decode("utf-8", "replace")
            return Answer(None, compute_s, (code, message))
        torch_dtype = _DTYPE_OF.get(dtype)
        if torch_dtype is None or rows < 0 or cols <= 0 or rows * cols * torch_dtype.itemsize > self.capacity:
            raise MailboxError(f"answer {self._seq}: {rows} x {cols} rows of dtype code {dtype} do not fit this "
                               f"mailbox")
        return Answer(self._rows(1, torch_dtype, rows, cols), compute_s)

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

    # --- the lane ---------------------------------------------------------------------------------------

    def _lane_areas(self, padded: int, k: int, cols: int, dtype: torch.dtype) -> LaneAreas:
        request, response = self._areas
        pairs = padded * k
        at = _lane_rows_at(padded, k)
        return LaneAreas(request[: 4 * pairs].view(torch.int32).view(padded, k),
                         request[4 * pairs : 8 * pairs].view(torch.float32).view(padded, k),
                         request[at : at + padded * cols * dtype.itemsize].view(dtype).view(padded, cols),
                         response[: padded * cols * dtype.itemsize].view(dtype).view(padded, cols))

    def lane_fits(self, padded: int, k: int, cols: int, dtype: torch.dtype) -> bool:
        return dtype in DTYPES and _lane_rows_at(padded, k) + padded * cols * dtype.itemsize <= self.capacity

    @property
    def lane_flags(self) -> tuple[int, int]:
        """Addresses of the lane's request and response flags in this process."""
        return self.address + _LANE_REQUEST, self.address + _LANE_RESPONSE

    def lane_value(self, generation: int, layer: int) -> int:
        """The flag value of `layer`'s request in `generation`."""
        return (generation * (self.n_layers + 1) + layer + 1) & SEQ_MASK

    def _u32(self, at: int) -> int:
        return struct.unpack_from("<I", self._map, at)[0]

    # worker side

    def lane_begin_generation(self) -> int:
        """A generation none of this mailbox's earlier workers used (no request of it is in flight)."""
        generation = (self._u32(_LANE_GENERATION_AT) + 1) & SEQ_MASK
        struct.pack_into("<I", self._map, _LANE_GENERATION_AT, generation)
        return generation

    def lane_open(self, rows: int, padded: int, k: int, cols: int, dtype: torch.dtype) -> LaneAreas:
        """Set the lane's shapes for the requests that follow (none may be in flight; check `lane_fits`):
        `padded` rows of `cols` in `dtype` with `k` routed experts each, of which the first `rows` are real.
        Returns the areas the device fills and reads."""
        _LANE.pack_into(self._map, _LANE_AT, rows, padded, k, cols, DTYPES[dtype])
        _LANE_FAILURE.pack_into(self._map, _LANE_FAILURE_AT, _OK, 0, 0)
        return self._lane_areas(padded, k, cols, dtype)

    def set_owners(self, owners: torch.Tensor) -> None:
        """The owner table: (n_layers, max_experts) bool, True where this host computes the expert."""
        self._owners.copy_(owners)

    def lane_post(self, value: int) -> None:
        """Raise the request flag (what the device does; the areas must be filled first)."""
        self._lane_request[0] = value

    def lane_answered(self, value: int) -> bool:
        """Whether the response flag is at or past `value`, compared as the device compares."""
        return (self._lane_response[0] - value) & SEQ_MASK < 1 << 31

    def lane_clear(self) -> None:
        """Clear the response flag once the answer is read (what the device does after its wait)."""
        self._lane_response[0] = 0

    def lane_poison(self, generation: int) -> None:
        """Satisfy every wait of `generation`'s requests: drains a device stream stuck on a host."""
        self._lane_response[0] = self.lane_value(generation + 1, -1)  # above its values, below the next one's

    def _of_generation(self, value: int, generation: int) -> bool:
        first, last = self.lane_value(generation, 0), self.lane_value(generation, self.n_layers - 1)
        return (value - first) & SEQ_MASK <= (last - first) & SEQ_MASK

    def lane_stalled(self, generation: int) -> bool:
        """Whether a request of `generation` waits on this host: posted and not taken, or taken and unanswered."""
        request, taken, response = self._lane_request[0], self._u32(_LANE_TAKEN_AT), self._lane_response[0]
        return (request != 0 and self._of_generation(request, generation)) or \
            (self._of_generation(taken, generation) and response != taken)

    def lane_pairs(self) -> int:
        """Pairs the host computed through the lane since it made the mailbox."""
        return struct.unpack_from("<q", self._map, _LANE_PAIRS_AT)[0]

    def lane_failure(self, generation: int) -> tuple[str, str] | None:
        """(code, message) of a request of `generation` that failed since the last lane_open, or None: a late
        failure of an earlier generation's request (one a failed step abandoned) is not this one's."""
        status, code_len, msg_len = _LANE_FAILURE.unpack_from(self._map, _LANE_FAILURE_AT)
        if status == _OK or not self._of_generation(self._u32(_LANE_FAILED_AT), generation):
            return None
        code = self._map[_LANE_TEXT_AT : _LANE_TEXT_AT + code_len].decode()
        text = self._map[_LANE_TEXT_AT + code_len : _LANE_TEXT_AT + code_len + msg_len].decode("utf-8", "replace")
        return code, text

    # host side

    def lane_pending(self) -> bool:
        return self._lane_request[0] != 0

    def lane_take(self) -> LaneRequest:
        """The pending lane request, taken (its flag cleared). MailboxError when its value or the lane's shapes
        do not fit this mailbox (answer that with `lane_fail`)."""
        value = self._lane_taken = self._lane_request[0]
        self._lane_request[0] = 0
        struct.pack_into("<I", self._map, _LANE_TAKEN_AT, value)
        layer = (value - 1) % (self.n_layers + 1)
        header = _LANE.unpack_from(self._map, _LANE_AT)
        if header != self._lane_header:
            self._lane_requests, self._lane_header = {}, header
        request = self._lane_requests.get(layer)
        if request is None:
            rows, padded, k, cols, code = header
            dtype = _DTYPE_OF.get(code)
            if layer >= self.n_layers or dtype is None or not 0 <= rows <= padded or k <= 0 or cols <= 0 or \
                    not self.lane_fits(padded, k, cols, dtype):
                raise MailboxError(f"lane request {value} (layer {layer} of {self.n_layers}): {rows} of {padded} rows "
                                   f"x {cols} of dtype code {code} with {k} experts each do not fit this mailbox")
            areas = self._lane_areas(padded, k, cols, dtype)
            request = self._lane_requests[layer] = LaneRequest(layer, areas.ids[:rows], areas.weights[:rows],
                                                               areas.hidden[:rows], areas.out, self._owners[layer])
        return request

    def lane_reply(self, pairs: int) -> None:
        """Answer the taken lane request (its rows written into its `out`), having computed `pairs` pairs."""
        (total,) = struct.unpack_from("<q", self._map, _LANE_PAIRS_AT)
        struct.pack_into("<q", self._map, _LANE_PAIRS_AT, total + pairs)
        self._lane_response[0] = self._lane_taken  # last: publishes the answer

    def lane_fail(self, code: str, message: str) -> None:
        """Answer the taken lane request with a failure (the device goes on; the worker reads it afterwards)."""
        code_bytes = code.encode("ascii", "replace")[: TEXT_BYTES // 4]
        msg_bytes = message.encode()[: TEXT_BYTES - len(code_bytes)]
        self._map[_LANE_TEXT_AT : _LANE_TEXT_AT + len(code_bytes) + len(msg_bytes)] = code_bytes + msg_bytes
        struct.pack_into("<I", self._map, _LANE_FAILED_AT, self._lane_taken)
        _LANE_FAILURE.pack_into(self._map, _LANE_FAILURE_AT, _FAILED, len(code_bytes), len(msg_bytes))
        self._lane_response[0] = self._lane_taken
