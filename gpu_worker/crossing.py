"""A decode step's crossings to the expert hosts made by the device itself, through each host's mailbox lane
(shared/mailbox.py), so a decode graph captures a layer whole, its cold experts included: no wait on the device
and no Python between layers (DESIGN.md's decode target; its §8 measured 18 us a crossing inside a CUDA graph).

On a GPU the mailbox is page-locked and mapped into the device's address space: the stream copies the layer's
rows, expert ids and routing weights into the request area, raises the request flag (cuStreamWriteValue32),
holds until the host raises the response flag (cuStreamWaitValue32), copies the answer out and clears the flag,
all stream operations a graph captures. On a CPU the worker's thread makes the same stores and waits. A layer
posts, queues its own experts' work, then collects, so the two overlap.

A failed exchange starts a new generation of every lane (their flag values change, so graphs that captured the
old ones go: on_change); a host that stalled is left out until STALLED_RETRY_S have passed or its mailbox is
replaced.
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
STALLED_RETRY_S = 30.0


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
    """One host's lane as the worker uses it."""

    mailbox: Mailbox
    areas: LaneAreas | None  # None while the step's shapes do not fit the mailbox
    request_flag: int  # device addresses of the flags (on a CPU unused)
    response_flag: int
    generation: int  # of the flag values this lane's requests carry
    pairs_seen: int  # the host's running count of lane pairs at the step's start

    def value(self, layer: int) -> int:
        return self.mailbox.lane_value(self.generation, layer)

    @property
    def open_areas(self) -> LaneAreas:
        assert self.areas is not None, "a layer crosses only through lanes open for its step's shapes"
        return self.areas


class DeviceCrossings:
    """The lanes of a RemoteExperts' hosts. A step begins (`begin_step`), opens them for its rows (`open`), each
    layer that crosses posts its rows and collects the answers, and the step ends with `end_step` once the device
    is done (`wait`), or with `abandon` where it raised."""

    def __init__(self, remote: RemoteExperts, device: torch.device, timeout_s: float,
                 hosts: frozenset[int] | None = None, max_rows: int | None = None) -> None:
        self.remote, self.device, self.timeout_s = remote, device, timeout_s
        # a decode step of more rows takes the usual path (Config.decode_crossings_max_rows); None: any
        self.max_rows = max_rows
        self.lane_hosts = hosts  # those that may have a lane (None: all); a layer with another's experts won't cross
        self.lanes: dict[int, _Lane] = {}
        self.retired: list[_Lane] = []  # lanes of replaced mailboxes, until the step that may use them ends
        self.owners: torch.Tensor | None = None  # (n_layers, n_experts) owning host (-1: the worker), for tables
        self.stalled: dict[int, float] = {}  # host -> when its lane may be tried again
        self.supported = True  # the device's stream memory operations work (found on the first lane)
        # hosts this step's layers cross to: opened for it, since a replayed graph posts without calling post
        self.posted: set[int] = set()
        self._shape: tuple | None = None
        self._tables: dict[int, tuple[tuple[int, int], int]] = {}  # host -> (mailbox identity, owners version)
        self._owners_version = 0
        self.on_change: Callable[[], None] = lambda: None  # graphs that captured lanes' addresses or values go

    def set_owners(self, owners: torch.Tensor) -> None:
        """A new placement's owner of each (layer, expert): the hosts' tables are rewritten at the next open."""
        self.owners = owners
        self._owners_version += 1

    def open(self, hosts: list[int], rows: int, padded: int, k: int, cols: int, dtype: torch.dtype) -> bool:
        """Make the lanes of `hosts` ready for a decode step of `padded` rows (`rows` real): whether every one is
        (attached, mapped for the device, large enough, not stalled). Called for each crossing layer of a step:
        the lanes are set once for the step's shapes."""
        if not self.supported or (self.max_rows is not None and rows > self.max_rows):
            return False
        self._drop_replaced(retire=True)
        shape = (rows, padded, k, cols, dtype)
        if shape != self._shape:
            # every lane follows the step's shapes; one they do not fit is kept (a new lane would drop every graph)
            for lane in self.lanes.values():
                fits = lane.mailbox.lane_fits(padded, k, cols, dtype)
                lane.areas = lane.mailbox.lane_open(*shape) if fits else None
            self._shape = shape
        ready = True
        for host in hosts:
            if time.monotonic() < self.stalled.get(host, 0.0) or (self.lane_hosts is not None and
                                                                   host not in self.lane_hosts):
                ready = False
                continue
            lane = self.lanes.get(host)
            if lane is not None and lane.areas is None:
                ready = False
                continue
            if lane is None:
                mailbox = self.remote.lane_mailbox(host, self.device)
                if mailbox is None or not mailbox.lane_fits(padded, k, cols, dtype) or not self._new_lane(host,
                                                                                                          mailbox):
                    ready = False
                    continue
                lane = self.lanes[host]
            if self._tables.get(host) != (lane.mailbox.identity, self._owners_version):
                assert self.owners is not None, "set_owners comes with the placement"
                lane.mailbox.set_owners(self.owners == host)
                self._tables[host] = (lane.mailbox.identity, self._owners_version)
        if ready:
            self.posted.update(hosts)
        return ready

    def _new_lane(self, host: int, mailbox: Mailbox) -> bool:
        """Open a lane to a host's (new) mailbox; False where the device cannot drive one."""
        areas = mailbox.lane_open(*self._shape)  # type: ignore[misc]
        request, response = mailbox.lane_flags
        if self.device.type == "cuda":
            try:
                request, response = (self._device_pointer(address) for address in (request, response))
                if not self.lanes and not self.retired:  # once, before any lane can hold the stream
                    self._probe(response)
            except (AttributeError, RuntimeError) as e:
                log.warning("decode steps cannot cross from the device (%s); they take the host's path", e)
                self.supported = False
                return False
        self.lanes[host] = _Lane(mailbox, areas, request, response, mailbox.lane_begin_generation(),
                                 mailbox.lane_pairs())
        self.on_change()
        return True

    @staticmethod
    def _device_pointer(address: int) -> int:
        pointer = ctypes.c_uint64()
        _check(_stream_ops()[4](ctypes.byref(pointer), ctypes.c_void_p(address), 0), "cuMemHostGetDevicePointer")
        return pointer.value

    def _probe(self, flag: int) -> None:
        """A stream memory operation on a lane's flag, now: some drivers have them off."""
        stream = torch.cuda.current_stream(self.device)
        _check(_stream_ops()[0](ctypes.c_void_p(stream.cuda_stream), flag, 0, 0), "cuStreamWriteValue32")
        stream.synchronize()

    def _drop_replaced(self, retire: bool) -> None:
        """Drop lanes whose mailbox the RemoteExperts let go of (its host's file was replaced or removed, as any
        exchange may find). Mid-step they are retired: queued work may still wait on them until the step ends.
        Between steps nothing does, and the data plane may have closed their mailboxes already."""
        for host, lane in list(self.lanes.items()):
            if self.remote.mailboxes[host] is not lane.mailbox:
                dropped = self.lanes.pop(host)
                if retire:
                    self.retired.append(dropped)
                self.stalled.pop(host, None)
                self.on_change()

    def begin_step(self) -> None:
        """Before a step: what the hosts computed through their lanes until now is not this step's, and the
        lanes of mailboxes replaced meanwhile go (the data plane closes them between steps)."""
        self.posted.clear()
        self.retired.clear()
        for host in self.lanes:  # a host restarted since its lane opened (a new mailbox): its lane goes with the old
            self.remote.lane_mailbox(host, self.device)
        self._drop_replaced(retire=False)
        for lane in self.lanes.values():
            lane.pairs_seen = lane.mailbox.lane_pairs()

    def post(self, layer: int, hosts: list[int], h: torch.Tensor, weights: torch.Tensor,
             expert_ids: torch.Tensor) -> None:
        """Hand every padded row of the layer to the hosts: rows, expert ids and routing weights into each lane,
        then its request flag. On a GPU it is queued (capturable), so work queued after it overlaps the hosts'."""
        self.posted.update(hosts)
        if self.device.type == "cpu":
            for host in hosts:
                lane = self.lanes[host]
                areas = lane.open_areas
                areas.ids.copy_(expert_ids)
                areas.weights.copy_(weights)
                areas.hidden.copy_(h)
                lane.mailbox.lane_post(lane.value(layer))
            return
        write, _, dtoh, _, _ = _stream_ops()
        stream = ctypes.c_void_p(torch.cuda.current_stream(h.device).cuda_stream)
        sources = (expert_ids.to(torch.int32).contiguous(), weights.float().contiguous(), h.contiguous())
        for host in hosts:
            lane = self.lanes[host]
            areas = lane.open_areas
            for source, area in zip(sources, (areas.ids, areas.weights, areas.hidden), strict=True):
                assert source.dtype == area.dtype and source.shape == area.shape, "the lane is open for other rows"
                _check(dtoh(ctypes.c_void_p(area.data_ptr()), source.data_ptr(), source.nbytes, stream),
                       "cuMemcpyDtoHAsync")
            _check(write(stream, lane.request_flag, lane.value(layer), 0), "cuStreamWriteValue32")

    def collect(self, layer: int, hosts: list[int], like: torch.Tensor) -> torch.Tensor:
        """The hosts' share of the layer `post` handed them (each host's weighted sum over the pairs routed to its
        experts, added up), shaped like `like`; on a GPU queued behind a wait on each host's answer flag."""
        total = torch.zeros_like(like)
        if self.device.type == "cpu":
            for host in hosts:
                lane = self.lanes[host]

                def answered(seconds: float, lane: _Lane = lane) -> bool:
                    return Backoff(FIRST_SLEEP_S).wait(lambda: lane.mailbox.lane_answered(lane.value(layer)),
                                                       time.monotonic() + seconds)

                try:
                    self.remote.wait_for(host, time.monotonic() + self.timeout_s, answered)
                except ExpertHostError:
                    self._failed([host])
                    raise
                total += lane.open_areas.out
                lane.mailbox.lane_clear()
            return total
        write, wait, _, htod, _ = _stream_ops()
        stream = ctypes.c_void_p(torch.cuda.current_stream(like.device).cuda_stream)
        for host in hosts:
            lane = self.lanes[host]
            _check(wait(stream, lane.response_flag, lane.value(layer), _WAIT_GEQ), "cuStreamWaitValue32")
            answer = torch.empty_like(like)
            _check(htod(answer.data_ptr(), ctypes.c_void_p(lane.open_areas.out.data_ptr()), answer.nbytes, stream),
                   "cuMemcpyHtoDAsync")
            _check(write(stream, lane.response_flag, 0, 0), "cuStreamWriteValue32")
            total += answer
        return total

    def _failed(self, stalled: list[int]) -> None:
        """After a failed exchange: the stalled hosts are left out for a while, and every lane begins a new
        generation, so answers to what this step posted can never be taken for a later request's."""
        for host in stalled:
            self.stalled[host] = time.monotonic() + STALLED_RETRY_S
        for lane in self.lanes.values():
            lane.generation = lane.mailbox.lane_begin_generation()
        self._shape = None  # reopening the lanes resets a failure status a late answer may still leave
        self.on_change()

    def _progress(self) -> int:
        return sum(lane.mailbox.lane_pairs() for lane in self.lanes.values())

    def wait(self, done: torch.cuda.Event) -> None:
        """Until the device has run the step (`done` recorded after it), with the worker's keep-alive. While no
        host answers anything for the expert timeout, the lanes are answered with poison so the stream drains,
        and the step fails."""
        backoff = Backoff(FIRST_SLEEP_S)
        progress, deadline = self._progress(), time.monotonic() + self.timeout_s
        while not backoff.wait(done.query, min(deadline, time.monotonic() + KEEP_ALIVE_S)):
            self.remote.keep_alive()
            if self._progress() != progress:
                progress, deadline = self._progress(), time.monotonic() + self.timeout_s
            if time.monotonic() < deadline:
                continue
            stalled = [host for host, lane in self.lanes.items() if lane.mailbox.lane_stalled(lane.generation)]
            while not done.query():  # retired lanes too: a replaced host's old mailbox may hold the stream
                for lane in [*self.retired, *self.lanes.values()]:
                    lane.mailbox.lane_poison(lane.generation)
                time.sleep(1e-4)
            self._failed(stalled)
            raise ExpertHostError(stalled[0] if stalled else min(self.posted, default=-1), "timeout",
                                  f"no lane answer within {self.timeout_s:.1f} s")

    def settle(self) -> None:
        """Wait for what the step queued so far (before anything else in it waits on the device)."""
        if self.device.type == "cuda" and self.posted:
            done = torch.cuda.Event()
            done.record()
            self.wait(done)

    def abandon(self) -> None:
        """A step that raised: drain what it queued (poison past the timeout), begin new generations."""
        try:
            self.settle()
        except ExpertHostError as e:
            log.warning("abandoned step: %s", e)
        else:
            self._failed([])
        self.retired.clear()

    def end_step(self) -> int:
        """Pairs the hosts posted to computed through their lanes this step (the device done with it);
        ExpertHostError where a host failed a lane request."""
        self.settle()
        self.retired.clear()
        self._drop_replaced(retire=False)
        pairs, failed = 0, None
        for host in sorted(self.posted & set(self.lanes)):
            lane = self.lanes[host]
            pairs += lane.mailbox.lane_pairs() - lane.pairs_seen
            failure = lane.mailbox.lane_failure(lane.generation)
            if failure is not None and failed is None:
                failed = host, failure
        if failed is not None:
            self._failed([])
            raise ExpertHostError(failed[0], *failed[1])
        return pairs
