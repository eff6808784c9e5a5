"""The worker's side of the mailbox lanes (gpu_worker/crossing.py) against a forked host that answers each lane
request with its rows times (layer + 1): the exchange's result, the owner table and pair counts the host sees,
a step that failed, and a host that stops answering. On a CPU the worker's thread makes the exchange; the same
helpers run it captured in a CUDA graph on a GPU (tests/gpu/test_device_crossings.py)."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

import pytest
import torch
import zmq

from gpu_worker import crossing
from gpu_worker.crossing import DeviceCrossings
from gpu_worker.remote import ExpertHostError, RemoteExperts
from shared.mailbox import Backoff, Mailbox
from shared.run_files import mailbox_path

FORK = multiprocessing.get_context("fork")
LAYERS, EXPERTS, K, COLS = 4, 8, 2, 64


def serve_lanes(path: str, answers: int) -> None:
    """Answer `answers` lane requests (rows times layer + 1, the pairs it owns counted), then stall."""
    mailbox = Mailbox.create(path, 1 << 20, EXPERTS, n_layers=LAYERS)
    backoff = Backoff(max_sleep_s=1e-3)
    try:
        for _ in range(answers):
            if not backoff.wait(mailbox.lane_pending, time.monotonic() + 30):
                return
            backoff.reset()
            request = mailbox.lane_take()
            rows = request.hidden.shape[0]
            request.out[:rows] = request.hidden * (request.layer + 1)
            request.out[rows:] = 0
            mailbox.lane_reply(int(request.owned[request.ids.long()].sum()))
        time.sleep(60)
    finally:
        mailbox.close()
        os.unlink(path)


class Host:
    def __init__(self, answers: int) -> None:
        self.endpoint = f"ipc:///tmp/tierserve-lane-test-{uuid.uuid4().hex}.sock"
        self.process = FORK.Process(target=serve_lanes, args=(mailbox_path(self.endpoint), answers), daemon=True)
        self.process.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(mailbox_path(self.endpoint)):
            assert time.monotonic() < deadline, "the host made no mailbox"
            time.sleep(0.01)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        if os.path.exists(mailbox_path(self.endpoint)):
            os.unlink(mailbox_path(self.endpoint))


def crossings_to(host: Host, device: torch.device, timeout_s: float = 10.0) -> tuple[DeviceCrossings, RemoteExperts]:
    remote = RemoteExperts(zmq.Context.instance(), [host.endpoint], timeout_s)
    crossings = DeviceCrossings(remote, device, timeout_s)
    owners = torch.full((LAYERS, EXPERTS), -1, dtype=torch.int64)
    owners[:, ::2] = 0  # the host computes the even experts
    crossings.set_owners(owners)
    return crossings, remote


def exchange(crossings: DeviceCrossings, layer: int, h: torch.Tensor, weights: torch.Tensor,
             ids: torch.Tensor, hosts: tuple[int, ...] | list[int] = (0,)) -> torch.Tensor:
    """One layer's crossing to `hosts`, as a crossing layer makes it."""
    crossings.post(layer, list(hosts), h, weights, ids)
    return crossings.collect(layer, list(hosts), h)


def routed(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of `rows` rows, each routed to one even and one odd expert."""
    ids = torch.tensor([[2 * (r % 4), 2 * (r % 4) + 1] for r in range(rows)], device=device)
    return torch.full((rows, K), 0.5, device=device), ids


@pytest.fixture
def host():
    hosts: list[Host] = []
    yield lambda answers=1000: hosts.append(Host(answers)) or hosts[-1]
    for h in hosts:
        h.stop()


def test_each_layer_gets_the_hosts_answer_and_its_pairs_are_counted(host):
    crossings, remote = crossings_to(host(), torch.device("cpu"))
    changes: list[int] = []
    crossings.on_change = lambda: changes.append(1)
    weights, ids = routed(4, torch.device("cpu"))
    h = torch.randn(4, COLS)
    crossings.begin_step()
    for layer in range(LAYERS):
        assert crossings.open([0], 3, 4, K, COLS, torch.float32)
        assert torch.equal(exchange(crossings, layer, h, weights, ids)[:3], h[:3] * (layer + 1))
    # the host saw the owner table: one even expert per real row
    assert crossings.end_step() == 3 * LAYERS
    assert changes == [1], "a new lane (its addresses and flag values) drops the graphs once"
    remote.close()


def test_a_host_that_stops_answering_fails_the_step_and_is_left_out_for_a_while(host, monkeypatch):
    monkeypatch.setattr(crossing, "STALLED_RETRY_S", 0.3)
    crossings, remote = crossings_to(host(answers=2), torch.device("cpu"), timeout_s=0.5)
    weights, ids = routed(2, torch.device("cpu"))
    h = torch.randn(2, COLS)
    crossings.begin_step()
    assert crossings.open([0], 2, 2, K, COLS, torch.float32)
    exchange(crossings, 0, h, weights, ids)
    exchange(crossings, 1, h, weights, ids)
    with pytest.raises(ExpertHostError, match="no answer within"):
        exchange(crossings, 2, h, weights, ids)
    assert not crossings.open([0], 2, 2, K, COLS, torch.float32), "a stalled host's lane is left out"
    time.sleep(0.3)
    assert crossings.open([0], 2, 2, K, COLS, torch.float32), "and tried again later"
    remote.close()


def test_answers_left_behind_by_a_failed_step_are_never_taken_for_a_later_one(host):
    """Host 0 stalls in a layer; host 1 answered that layer, but the step failed before its answer was read.
    The next step's exchanges with host 1 must wait for its new answers, not take the old flag for them."""
    stalling, steady = host(answers=1), host()
    remote = RemoteExperts(zmq.Context.instance(), [stalling.endpoint, steady.endpoint], 0.5)
    crossings = DeviceCrossings(remote, torch.device("cpu"), 0.5)
    owners = torch.full((LAYERS, EXPERTS), 1, dtype=torch.int64)
    owners[:, ::2] = 0
    crossings.set_owners(owners)
    weights, ids = routed(2, torch.device("cpu"))
    h = torch.randn(2, COLS)
    crossings.begin_step()
    assert crossings.open([0, 1], 2, 2, K, COLS, torch.float32)
    for layer, hosts in ((0, [0, 1]), (1, [1, 0])):  # host 1 answers layer 1 before host 0 is found stalled
        crossings.post(layer, hosts, h, weights, ids)
        if layer == 1:
            with pytest.raises(ExpertHostError):
                crossings.collect(layer, [0], h)
        else:
            assert torch.equal(crossings.collect(layer, hosts, h), 2 * h)
    time.sleep(0.1)  # host 1's answer to layer 1 is in, never read
    fresh = torch.randn(2, COLS)
    crossings.begin_step()
    assert crossings.open([1], 2, 2, K, COLS, torch.float32)
    for layer in (0, 1):
        assert torch.equal(exchange(crossings, layer, fresh, weights, ids, hosts=[1]), fresh * (layer + 1))
    remote.close()


def test_a_lane_too_small_for_a_steps_rows_is_kept_for_the_steps_that_fit(host):
    """A step of more rows than the mailbox holds takes the usual path; the lane stays, so the next small step
    crosses without a new lane (which would drop every layer's graphs)."""
    crossings, remote = crossings_to(host(), torch.device("cpu"))
    changes: list[int] = []
    crossings.on_change = lambda: changes.append(1)
    weights, ids = routed(2, torch.device("cpu"))
    h = torch.randn(2, COLS)
    for rows in (2, 4096, 2):
        crossings.begin_step()
        fits = crossings.open([0], rows, rows, K, COLS, torch.float32)
        assert fits == (rows == 2)
        if fits:
            assert torch.equal(exchange(crossings, 1, h, weights, ids), 2 * h)
        crossings.end_step()
    assert changes == [1]
    remote.close()


def test_a_mailbox_replaced_and_closed_between_steps_is_dropped_and_its_successor_crosses(host, monkeypatch):
    monkeypatch.setattr("gpu_worker.remote.RECHECK_S", 0.0)
    first = host()
    crossings, remote = crossings_to(first, torch.device("cpu"))
    weights, ids = routed(2, torch.device("cpu"))
    h = torch.randn(2, COLS)
    crossings.begin_step()
    assert crossings.open([0], 2, 2, K, COLS, torch.float32)
    exchange(crossings, 0, h, weights, ids)
    crossings.end_step()
    first.process.kill()
    first.process.join()
    os.unlink(mailbox_path(first.endpoint))
    successor = FORK.Process(target=serve_lanes, args=(mailbox_path(first.endpoint), 1000), daemon=True)
    successor.start()
    try:
        deadline = time.monotonic() + 30
        while remote.lane_mailbox(0, torch.device("cpu")) is None or not remote.retired:
            assert time.monotonic() < deadline, "the successor's mailbox was not found"
            time.sleep(0.01)
        remote.close_retired()  # a step that did not cross: the data plane closes the old mailbox
        crossings.begin_step()
        assert not crossings.retired, "a closed mailbox is nothing a failed step could poison"
        assert crossings.open([0], 2, 2, K, COLS, torch.float32)
        assert torch.equal(exchange(crossings, 3, h, weights, ids), 4 * h)
        assert crossings.end_step() == 2
    finally:
        successor.kill()
        successor.join()
        remote.close()
