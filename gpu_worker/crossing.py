"""A decode step's crossings to the expert hosts made by the device itself, through each host's mailbox lane
(shared/mailbox.py), so a decode graph captures a layer whole, its cold experts included: no wait on the device
and no Python between layers (DESIGN.md's decode target; its §8 measured 18 us a crossing inside a CUDA graph).

On a GPU the mailbox is page-locked and mapped into the device's address space: the stream copies the layer's
rows, expert ids and routing weights into the request area, raises the request flag (cuStreamWriteValue32),
holds until the host raises the response flag (cuStreamWaitValue32), copies the answer out and clears the flag,
all stream operations a graph captures. On a CPU the worker's thread makes the same stores and waits. A layer
posts, queues its own experts' work, then collects, so the two overlap.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpu_worker.remote import KEEP_ALIVE_S, ExpertHostError, RemoteExperts
from shared.mailbox import FIRST_SLEEP_S, Backoff, LaneAreas, Mailbox, cuda_driver

log = logging.getLogger(__name__)
_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: until (int32)(*flag - value) >= 0


@functools.cache
def _stream_ops() -> tuple[Callable[..., int], ...]:
    """(write a 32-bit value, wait for one, device-to-host copy, host-to-device copy, device pointer of mapped
    host memory) from the CUDA driver, each returning its CUresult."""
    lib = cuda_driver()

    def newest(name: str) -> Callable[..., int]:
        return getattr(lib, f"{name}_v2", None) or getattr(lib, name)

    write, wait = newest("cuStreamWriteValue32"), newest("cuStreamWaitValue32")
    for op in (write, wait):
        op.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    dtoh, htod = lib.cuMemcpyDtoHAsync_v2, lib.cuMemcpyHtoDAsync_v2
    dtoh.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    htod.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    device_pointer = lib.cuMemHostGetDevicePointer_v2
    device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    return write, wait, dtoh, htod, device_pointer


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"CUDA driver error {result} in {what}")


@dataclass
class _Lane:
    """One host's lane as this step uses it."""

    mailbox: Mailbox
    areas: LaneAreas
    request_flag: int  # device addresses of the flags (on a CPU unused)
    response_flag: int
    pairs_seen: int  # the host's running count of lane pairs at the last end_step


class DeviceCrossings:
    """The lanes of a RemoteExperts' hosts. A step opens them for its rows (`open`), each layer that crosses
    posts its rows and collects the answers, and `end_step` (once the device is done: `wait`) reads what the
    hosts computed."""

    def __init__(self, remote: RemoteExperts, device: torch.device, timeout_s: float) -> None:
        self.remote, self.device, self.timeout_s = remote, device, timeout_s
        self.lanes: dict[int, _Lane] = {}
        self.owners: torch.Tensor | None = None  # (n_layers, n_experts) owning host (-1: the worker), for tables
        self.broken: set[int] = set()  # hosts whose lane failed: not used again until their mailbox is replaced
        self._shape: tuple | None = None
        self._tables: dict[int, tuple[int, int]] = {}  # host -> (mailbox identity, owners version) written
        self._owners_version = 0
        self.on_change: Callable[[], None] = lambda: None  # graphs that captured a replaced mailbox must go

    def set_owners(self, owners: torch.Tensor) -> None:
        """A new placement's owner of each (layer, expert): the hosts' tables are rewritten at the next open."""
        self.owners = owners
        self._owners_version += 1
        self.broken.clear()

    def open(self, hosts: list[int], rows: int, padded: int, k: int, cols: int, dtype: torch.dtype) -> bool:
        """Make the lanes of `hosts` ready for a decode step of `padded` rows (`rows` real): whether every one is
        (attached, mapped for the device, large enough, not broken). Called for each layer of a step: the lanes
        are set once for the step's shapes; a host's replaced mailbox calls on_change first."""
        shape = (rows, padded, k, cols, dtype)
        ready = True
        for host in hosts:
            mailbox = self.remote.lane_mailbox(host, self.device)
            lane = self.lanes.get(host)
            if lane is not None and (mailbox is None or mailbox.identity != lane.mailbox.identity):
                del self.lanes[host]
                self.broken.discard(host)
                self.on_change()
                lane = None
            if mailbox is None or host in self.broken or not mailbox.lane_fits(padded, k, cols, dtype):
                ready = False
                continue
            if lane is None or shape != self._shape:
                self._open_lane(host, mailbox, shape)
            if self._tables.get(host) != (mailbox.identity, self._owners_version):
                assert self.owners is not None, "set_owners comes with the placement"
                mailbox.set_owners(self.owners == host)
                self._tables[host] = (mailbox.identity, self._owners_version)
        if ready and shape != self._shape:
            for host, lane in self.lanes.items():  # lanes of hosts this call did not name follow the step too
                if host not in hosts:
                    self._open_lane(host, lane.mailbox, shape)
            self._shape = shape
        return ready

    def _open_lane(self, host: int, mailbox: Mailbox, shape: tuple) -> None:
        areas = mailbox.lane_open(*shape)
        request, response = mailbox.lane_flags
        if self.device.type == "cuda":
            request, response = (self._device_pointer(address) for address in (request, response))
        old = self.lanes.get(host)
        pairs = old.pairs_seen if old is not None and old.mailbox is mailbox else mailbox.lane_outcome()[0]
        self.lanes[host] = _Lane(mailbox, areas, request, response, pairs)

    @staticmethod
    def _device_pointer(address: int) -> int:
        pointer = ctypes.c_uint64()
        _check(_stream_ops()[4](ctypes.byref(pointer), ctypes.c_void_p(address), 0), "cuMemHostGetDevicePointer")
        return pointer.value

    def post(self, layer: int, hosts: list[int], h: torch.Tensor, weights: torch.Tensor,
             expert_ids: torch.Tensor) -> None:
        """Hand every padded row of the layer to the hosts: rows, expert ids and routing weights into each lane,
        then its request flag. On a GPU it is queued (capturable), so work queued after it overlaps the hosts'."""
        if self.device.type == "cpu":
            for host in hosts:
                lane = self.lanes[host]
                lane.areas.ids.copy_(expert_ids)
                lane.areas.weights.copy_(weights)
                lane.areas.hidden.copy_(h)
                lane.mailbox.lane_post(layer)
            return
        write, _, dtoh, _, _ = _stream_ops()
        stream = ctypes.c_void_p(torch.cuda.current_stream(h.device).cuda_stream)
        sources = (expert_ids.to(torch.int32).contiguous(), weights.float().contiguous(), h.contiguous())
        for host in hosts:
            lane = self.lanes[host]
            for source, area in zip(sources, (lane.areas.ids, lane.areas.weights, lane.areas.hidden), strict=True):
                _check(dtoh(ctypes.c_void_p(area.data_ptr()), source.data_ptr(), source.nbytes, stream),
                       "cuMemcpyDtoHAsync")
            _check(write(stream, lane.request_flag, layer + 1, 0), "cuStreamWriteValue32")

    def collect(self, layer: int, hosts: list[int], like: torch.Tensor) -> torch.Tensor:
        """The hosts' share of the layer `post` handed them (each host's weighted sum over the pairs routed to its
        experts, added up), shaped like `like`; on a GPU queued behind a wait on each host's answer flag."""
        total = torch.zeros_like(like)
        if self.device.type == "cpu":
            for host in hosts:
                mailbox = self.lanes[host].mailbox

                def answered(seconds: float, mailbox: Mailbox = mailbox) -> bool:
                    return Backoff(FIRST_SLEEP_S).wait(lambda: mailbox.lane_answered(layer),
                                                       time.monotonic() + seconds)

                try:
                    self.remote.wait_for(host, time.monotonic() + self.timeout_s, answered)
                except ExpertHostError:
                    self.broken.add(host)
                    raise
                total += self.lanes[host].areas.out
                mailbox.lane_clear()
            return total
        write, wait, _, htod, _ = _stream_ops()
        stream = ctypes.c_void_p(torch.cuda.current_stream(like.device).cuda_stream)
        for host in hosts:
            lane = self.lanes[host]
            _check(wait(stream, lane.response_flag, layer + 1, _WAIT_GEQ), "cuStreamWaitValue32")
            answer = torch.empty_like(like)
            _check(htod(answer.data_ptr(), ctypes.c_void_p(lane.areas.out.data_ptr()), answer.nbytes, stream),
                   "cuMemcpyHtoDAsync")
            _check(write(stream, lane.response_flag, 0, 0), "cuStreamWriteValue32")
            total += answer
        return total

    def wait(self, done: torch.cuda.Event) -> None:
        """Until the device has run the step (`done` recorded after it), with the worker's keep-alive; past the
        timeout every lane is answered with poison so the stream drains, and the step fails."""
        self._drop_replaced()
        deadline = time.monotonic() + self.timeout_s
        backoff = Backoff(FIRST_SLEEP_S)
        while not backoff.wait(done.query, min(deadline, time.monotonic() + KEEP_ALIVE_S)):
            if time.monotonic() < deadline:
                self.remote.keep_alive()
                continue
            # which host stopped answering is not known here: none of the lanes is used again until the next
            # placement (the coordinator's answer to a lost host) or a host's new mailbox
            while not done.query():
                for lane in self.lanes.values():
                    lane.mailbox.lane_poison()
                time.sleep(1e-4)
            for lane in self.lanes.values():
                lane.mailbox.lane_clear()
            self.broken.update(self.lanes)
            raise ExpertHostError(min(self.lanes), "timeout", f"no lane answer within {self.timeout_s:.1f} s")

    def begin_step(self) -> None:
        """Before a step: what the hosts computed through their lanes until now (a failed step's answers among it)
        is not this step's."""
        self._drop_replaced()
        for lane in self.lanes.values():
            lane.pairs_seen = lane.mailbox.lane_outcome()[0]

    def _drop_replaced(self) -> None:
        """Forget lanes whose mailbox the RemoteExperts let go of (its host's file was replaced or removed, found
        by any exchange), before anything reads a mailbox that is closed."""
        for host, lane in list(self.lanes.items()):
            if self.remote.mailboxes[host] is not lane.mailbox:
                del self.lanes[host]
                self.broken.discard(host)
                self.on_change()

    def end_step(self) -> int:
        """Pairs the hosts computed through their lanes since the last end_step (the device done with the step);
        ExpertHostError where a host failed a lane request (its lane is not used again)."""
        self._drop_replaced()
        pairs = 0
        for host, lane in self.lanes.items():
            total, failure = lane.mailbox.lane_outcome()
            pairs += total - lane.pairs_seen
            lane.pairs_seen = total
            if failure is not None:
                self.broken.add(host)
                self._shape = None  # the next open resets the lanes' status
                raise ExpertHostError(host, *failure)
        return pairs
