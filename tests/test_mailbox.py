"""Shared-memory mailboxes between two real processes (the host side forked, real /dev/shm), the worker's
RemoteExperts over them, and the whole system with activations in shared memory against the oracle."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
import zmq

from gpu_worker.remote import KEEP_ALIVE_S, ExpertHostError, RemoteExperts
from shared.client import Client
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.mailbox import _RESPONSE, _RESPONSE_AT, DTYPES, SEQ_MASK, Backoff, Mailbox, MailboxError, remove_mailbox
from shared.make_model import make_model
from shared.protocol import ExpertResult, decode, encode
from shared.reference import ReferenceModel
from shared.run_files import MAILBOX_PREFIX, identity_at, mailbox_path, remove_if_same, remove_stale_mailboxes

FORK = multiprocessing.get_context("fork")  # the child needs nothing but this module; no second torch import
CAPACITY = 1 << 16
MAX_EXPERTS = 16
STOP_LAYER = -1
FAIL_LAYER = 99
SHORT_LAYER = 98  # answered with a row fewer than asked
NAN_TIME_LAYER = 97  # answered right, with a compute time of NaN


def expected(hidden: torch.Tensor, layer: int, experts: list[int], counts: list[int]) -> torch.Tensor:
    """What the test host answers: each row times 2, plus its expert id, plus the layer (exact in every dtype)."""
    offsets = torch.tensor(experts, dtype=torch.float32).repeat_interleave(torch.tensor(counts, dtype=torch.long))
    return (hidden.float() * 2 + offsets[:, None] + layer).to(hidden.dtype)


def run_host(path: str, first_seq: int, answers: int, stall_s: float) -> None:
    """The host side: create the mailbox, answer until told to stop (or `answers` are given, then hang).
    With `stall_s` the host stalls that long right after the mailbox's name appears, as a descheduled one can."""
    if stall_s:
        rename = os.rename

        def rename_then_stall(src: str, dst: str) -> None:
            rename(src, dst)
            time.sleep(stall_s)

        os.rename = rename_then_stall  # only in this forked child
    mailbox = Mailbox.create(path, CAPACITY, MAX_EXPERTS, first_seq)
    backoff = Backoff(max_sleep_s=1e-3)
    try:
        for _ in range(answers):
            assert backoff.wait(mailbox.pending, time.monotonic() + 30)
            backoff.reset()
            try:
                request = mailbox.take()
            except MailboxError as e:
                mailbox.fail("bad_work", str(e))
                continue
            if request.layer == STOP_LAYER:
                return
            if request.layer == FAIL_LAYER:
                mailbox.fail("bad_work", "layer 99 — not held here")
                continue
            output = expected(request.hidden, request.layer, request.experts, request.counts)
            if request.layer == SHORT_LAYER:
                output = output[1:]
            mailbox.reply(output, compute_s=math.nan if request.layer == NAN_TIME_LAYER else float(request.step))
        time.sleep(60)  # answers nothing more, like a host that froze
    finally:
        mailbox.close()
        os.unlink(path)


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


HOSTS: list[Host] = []


class Host:
    """A forked process serving a mailbox at `path`."""

    def __init__(self, path: str, first_seq: int = 0, answers: int = 10**9, stall_s: float = 0.0) -> None:
        self.path = path
        HOSTS.append(self)
        self.process = FORK.Process(target=run_host, args=(path, first_seq, answers, stall_s), daemon=True)
        replaced = inode(path)  # a dead predecessor's mailbox, which this host replaces
        self.process.start()
        deadline = time.monotonic() + 10
        while inode(path) in (None, replaced):
            assert time.monotonic() < deadline and self.process.is_alive(), "host did not create its mailbox"
            time.sleep(0.005)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()


def stop_leftovers_and_check(path: str) -> None:
    """Stop whatever a failed test left running; then nothing of this test's may be left in /dev/shm (other
    entries belong to whatever else runs on this machine)."""
    for host in HOSTS:
        if host.process.is_alive():
            host.kill()
            if os.path.exists(host.path):
                os.unlink(host.path)
    HOSTS.clear()
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(os.path.basename(path))]


@pytest.fixture
def shm_path():
    path = f"/dev/shm/tierserve-test-{uuid.uuid4().hex}"
    yield path
    stop_leftovers_and_check(path)


def round_trip(mailbox: Mailbox, step: int, layer: int, hidden: torch.Tensor, experts: list[int],
               counts: list[int]) -> int:
    rows = mailbox.request_rows(hidden.shape[0], hidden.shape[1], hidden.dtype)
    rows.copy_(hidden)
    seq = mailbox.post(step, layer, experts, counts, rows)
    assert mailbox.wait_answer(seq, timeout_s=10)
    answer = mailbox.answer()
    assert answer.failure is None
    assert answer.compute_s == float(step)
    assert torch.equal(answer.output, expected(hidden, layer, experts, counts))
    return seq


def stop_host(mailbox: Mailbox, host: Host) -> None:
    rows = mailbox.request_rows(0, 8, torch.float32)
    mailbox.post(0, STOP_LAYER, [], [], rows)
    host.process.join(10)
    assert host.process.exitcode == 0
    assert not os.path.exists(host.path)  # the host removes its mailbox as it exits


def random_work(gen: torch.Generator, rows: int, cols: int, dtype: torch.dtype) -> tuple[list[int], list[int]]:
    if rows == 0:
        return [], []
    n = int(torch.randint(1, min(rows, MAX_EXPERTS) + 1, (1,), generator=gen))
    experts = sorted(torch.randperm(MAX_EXPERTS, generator=gen)[:n].tolist())
    cuts = sorted(torch.randperm(rows - 1, generator=gen)[: n - 1].add(1).tolist()) if n > 1 else []
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, rows], strict=True)]
    return experts, counts


def test_random_payloads_of_every_size_and_dtype_round_trip(shm_path):
    gen = torch.Generator().manual_seed(0)
    host = Host(shm_path)
    mailbox = Mailbox.attach(shm_path)
    try:
        for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 6):
            cols = [8, 64, 96][i % 3]
            most = CAPACITY // (cols * dtype.itemsize)
            rows = [1, 3, 40, most, 0, 17][i % 6]
            hidden = (torch.randn(rows, cols, generator=gen) * 100).round().to(dtype)
            experts, counts = random_work(gen, rows, cols, dtype)
            round_trip(mailbox, step=i, layer=i % 5, hidden=hidden, experts=experts, counts=counts)
        stop_host(mailbox, host)
    finally:
        mailbox.close()


def test_sequence_numbers_wrap(shm_path):
    host = Host(shm_path, first_seq=SEQ_MASK - 2)
    mailbox = Mailbox.attach(shm_path)
    hidden = torch.arange(24, dtype=torch.float32).view(3, 8)
    seqs = [round_trip(mailbox, step, 1, hidden, [2, 5], [1, 2]) for step in range(6)]
    stop_host(mailbox, host)
    mailbox.close()
    assert seqs == [SEQ_MASK - 1, SEQ_MASK, 0, 1, 2, 3]


def test_a_request_posted_the_moment_the_mailbox_appears_is_answered(shm_path):
    host = Host(shm_path, stall_s=0.3)
    mailbox = Mailbox.attach(shm_path)
    round_trip(mailbox, 1, 0, torch.ones(2, 8), [4], [2])  # posted while the host is still stalled
    stop_host(mailbox, host)
    mailbox.close()


def test_a_half_made_mailbox_left_under_this_pid_does_not_stop_the_next_one(shm_path):
    """A host that died while making its mailbox leaves `<path>.<pid>.tmp`; a successor given the same pid (a
    container restarted) found the name taken and could not start. No other process can own that name."""
    Path(f"{shm_path}.{os.getpid()}.tmp").write_bytes(b"half made")
    mailbox = Mailbox.create(shm_path, CAPACITY, MAX_EXPERTS)
    try:
        assert os.path.exists(shm_path) and not os.path.exists(f"{shm_path}.{os.getpid()}.tmp")
    finally:
        mailbox.close()
        remove_mailbox(shm_path)


def test_what_does_not_fit_is_refused_and_a_second_worker_is_kept_out(shm_path):
    host = Host(shm_path)
    mailbox = Mailbox.attach(shm_path)
    assert mailbox.fits(CAPACITY // 256, 64, torch.float32, MAX_EXPERTS)
    assert not mailbox.fits(CAPACITY // 256 + 1, 64, torch.float32, MAX_EXPERTS)
    assert mailbox.fits(CAPACITY // 128, 64, torch.bfloat16, 1)
    assert not mailbox.fits(1, 64, torch.float32, MAX_EXPERTS + 1)
    assert not mailbox.fits(1, 64, torch.float64, 1)
    with pytest.raises(MailboxError, match="in use by another worker"):
        Mailbox.attach(shm_path)
    stop_host(mailbox, host)
    mailbox.close()


@pytest.mark.parametrize("rows", [-2, CAPACITY])
def test_an_answer_whose_header_does_not_describe_an_output_in_the_mailbox_is_named(shm_path, rows):
    """A negative row count passed the size check and sliced rows from the end of the response area."""
    host = Mailbox.create(shm_path, CAPACITY, MAX_EXPERTS)
    worker = Mailbox.attach(shm_path)
    try:
        seq = worker.post(1, 0, [3], [2], worker.request_rows(2, 8, torch.float32))
        host.take()
        host.reply(torch.ones(2, 8), 0.0)
        _RESPONSE.pack_into(host._map, _RESPONSE_AT, 0, rows, 8, DTYPES[torch.float32], 0, 0, 0.0)  # a host's bug
        assert worker.wait_answer(seq, timeout_s=10)
        with pytest.raises(MailboxError, match=f"answer {seq}: {rows} x 8 rows of dtype code 1 do not fit"):
            worker.answer()
    finally:
        worker.close()
        host.close()
        os.unlink(shm_path)


def test_a_request_that_lies_about_its_size_is_answered_with_a_failure(shm_path):
    host = Host(shm_path)
    mailbox = Mailbox.attach(shm_path)
    rows = mailbox.request_rows(4, 8, torch.float32)
    too_many = torch.empty(CAPACITY // 32 + 1, 8)  # metadata for more rows than the mailbox holds
    seq = mailbox.post(1, 0, [3], [too_many.shape[0]], too_many)
    assert mailbox.wait_answer(seq, timeout_s=10)
    code, message = mailbox.answer().failure
    assert code == "bad_work" and "do not fit this mailbox" in message
    round_trip(mailbox, 2, 0, rows.clone().fill_(1.0), [3], [4])  # and the mailbox still works
    stop_host(mailbox, host)
    mailbox.close()


def test_the_lane_carries_a_layer_its_answer_and_a_failure(shm_path):
    """Both sides of the lane in one process (the host's side runs in expert hosts, tests/test_decode_crossings.py):
    shapes and the owner table set by the worker, the flags' meaning, a failure reported afterwards, and poison
    that satisfies every wait."""
    host = Mailbox.create(shm_path, CAPACITY, MAX_EXPERTS, n_layers=3)
    worker = Mailbox.attach(shm_path)
    owners = torch.zeros(3, MAX_EXPERTS, dtype=torch.bool)
    owners[2, [1, 4]] = True
    worker.set_owners(owners)
    assert worker.lane_fits(4, 2, 16, torch.float32) and not worker.lane_fits(CAPACITY // 64, 2, 16, torch.float32)
    areas = worker.lane_open(rows=3, padded=4, k=2, cols=16, dtype=torch.float32)
    areas.ids.copy_(torch.tensor([[1, 2], [4, 1], [0, 3], [9, 9]]))
    areas.weights.copy_(torch.rand(4, 2))
    areas.hidden.copy_(torch.randn(4, 16))
    assert not host.lane_pending()
    generation = worker.lane_begin_generation()
    worker.lane_post(worker.lane_value(generation, 2))
    assert host.lane_pending() and not worker.lane_answered(worker.lane_value(generation, 2))
    request = host.lane_take()
    assert not host.lane_pending(), "taking a request clears its flag"
    assert request.layer == 2 and request.owned.tolist() == owners[2].tolist()
    assert torch.equal(request.ids, areas.ids[:3]) and torch.equal(request.weights, areas.weights[:3])
    assert torch.equal(request.hidden, areas.hidden[:3]) and request.out.shape == (4, 16)
    request.out.copy_(torch.arange(64.0).view(4, 16))
    host.lane_reply(3)
    assert worker.lane_answered(worker.lane_value(generation, 2))
    assert not worker.lane_answered(worker.lane_value(generation + 1, 0)), "a later generation's wait goes on"
    assert torch.equal(areas.out, torch.arange(64.0).view(4, 16))
    assert worker.lane_pairs() == 3 and worker.lane_failure(generation) is None
    worker.lane_clear()
    assert not worker.lane_answered(worker.lane_value(generation, 0))

    worker.lane_open(rows=3, padded=2, k=2, cols=16, dtype=torch.float32)  # more real rows than rows
    worker.lane_post(worker.lane_value(generation, 0))
    assert worker.lane_stalled(generation), "posted, not taken"
    with pytest.raises(MailboxError, match="do not fit"):
        host.lane_take()
    assert worker.lane_stalled(generation), "taken, not answered"
    host.lane_fail("bad_work", "no such rows")
    assert not worker.lane_stalled(generation)
    assert worker.lane_answered(worker.lane_value(generation, 0))
    assert worker.lane_pairs() == 3 and worker.lane_failure(generation) == ("bad_work", "no such rows")
    assert worker.lane_failure(generation + 1) is None, "a failure of an earlier generation's request is not its"
    worker.lane_clear()
    worker.lane_poison(generation)  # every wait of this generation ends, none of the next
    assert all(worker.lane_answered(worker.lane_value(generation, layer)) for layer in range(3))
    assert worker.lane_begin_generation() == generation + 1
    assert not worker.lane_answered(worker.lane_value(generation + 1, 0))
    worker.close()
    host.close()
    os.unlink(shm_path)


@pytest.mark.parametrize("nbytes", [8192, 10, 0], ids=["zeros", "shorter than a header", "empty"])
def test_a_file_that_is_not_a_mailbox_is_refused(shm_path, nbytes):
    """Shorter than a header, it raised ValueError (mmap of an empty file) or struct.error, which the worker,
    expecting MailboxError, did not catch."""
    with open(shm_path, "wb") as f:
        f.write(b"\0" * nbytes)
    try:
        with pytest.raises(MailboxError, match="not a tierserve mailbox"):
            Mailbox.attach(shm_path)
    finally:
        os.unlink(shm_path)



# Run inside a user and mount namespace of its own, over a 1 MiB tmpfs: a 4 MiB mailbox does not fit in it.
_SMALL_TMPFS_CHILD = """
import os, sys, torch
from shared.mailbox import Mailbox, MailboxError
directory = sys.argv[1]
try:
    host = Mailbox.create(os.path.join(directory, "big"), 4 << 20, 8)
except MailboxError as e:
    print("refused:", e, flush=True)
else:  # the worker fills its request area: past the tmpfs's size, a page fault it cannot back
    Mailbox.attach(host.path).request_rows(1024, 1024, torch.float32).fill_(1.0)
    print("created", flush=True)
print("left:", sorted(os.listdir(directory)), flush=True)
small = Mailbox.create(os.path.join(directory, "small"), 64 << 10, 8)
Mailbox.attach(small.path).request_rows(64, 256, torch.float32).fill_(1.0)
print("small ok", flush=True)
"""


def test_a_mailbox_its_tmpfs_has_no_room_for_is_refused_when_made_not_a_sigbus_later(tmp_path):
    mount = tmp_path / "shm"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces to mount a small tmpfs in")
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable, _SMALL_TMPFS_CHILD],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused:") and "has no room for a mailbox of" in lines[0]
    assert lines[1:] == ["left: []", "small ok"]

# --- the worker's RemoteExperts over a mailbox ----------------------------------------------------------------


@pytest.fixture
def remote(tmp_path):
    """A RemoteExperts whose one host endpoint nobody binds: only the mailbox can answer."""
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/expert-host-0.sock"
    remote = RemoteExperts(ctx, [endpoint], timeout_s=0.5)
    yield remote, mailbox_path(endpoint)
    remote.close()
    ctx.term()
    stop_leftovers_and_check(mailbox_path(endpoint))


def remote_round_trip(remote: RemoteExperts, layer: int) -> None:
    remote.begin_step()
    h = torch.randn(6, 16).round()
    tokens = torch.tensor([5, 0, 0, 3])
    remote.send(0, layer, [1, 4], [3, 1], h, tokens)
    deadline = time.monotonic() + 10
    while not remote.answered(0):  # seen without waiting, once the host has answered
        assert time.monotonic() < deadline, "the host never answered"
    output, compute_s = remote.receive(0, layer)
    assert torch.equal(output, expected(h[tokens], layer, [1, 4], [3, 1]))
    assert compute_s == float(remote.step)


def test_worker_gathers_rows_into_the_mailbox_and_reports_host_failures(remote):
    remote, path = remote
    host = Host(path)
    for layer in range(3):
        remote_round_trip(remote, layer)
    remote.begin_step()
    remote.send(0, FAIL_LAYER, [1], [1], torch.ones(1, 16))
    with pytest.raises(ExpertHostError, match="not held here") as failure:
        remote.receive(0, FAIL_LAYER)
    assert failure.value.code == "bad_work"
    remote_round_trip(remote, 1)
    stop_host(remote.mailboxes[0], host)


@pytest.mark.parametrize(("layer", "message"),
                         [(SHORT_LAYER, r"answered \(1, 16\) torch.float32 to 2 rows of width 16"),
                          (NAN_TIME_LAYER, "reported a compute time of nan s")])
def test_an_answer_that_is_not_one_to_the_work_sent_names_its_host(remote, layer, message):
    """The wrong rows failed the step as the worker's own bug (internal_error, no host named); a NaN time went
    into the cost model's estimates of the host."""
    remote, path = remote
    host = Host(path)
    remote.begin_step()
    remote.send(0, layer, [1], [2], torch.ones(2, 16))
    with pytest.raises(ExpertHostError, match=message) as failure:
        remote.receive(0, layer)
    assert (failure.value.host, failure.value.code) == (0, "bad_output")
    remote_round_trip(remote, 1)
    stop_host(remote.mailboxes[0], host)


def test_a_host_that_dies_is_detected_by_timeout_and_its_successor_is_found(remote):
    remote, path = remote
    host = Host(path, answers=2)
    remote_round_trip(remote, 0)
    remote_round_trip(remote, 1)
    remote.begin_step()
    remote.send(0, 2, [1], [1], torch.ones(1, 16))
    host.kill()  # SIGKILL: its mailbox stays behind, as a crashed host's would
    assert not remote.answered(0)
    kept_alive: list[float] = []
    remote.keep_alive = lambda: kept_alive.append(time.monotonic())
    start = time.monotonic()
    with pytest.raises(ExpertHostError, match="no answer within 0.5 s") as timeout:
        remote.receive(0, 2)
    assert timeout.value.code == "timeout"
    assert 0.5 <= time.monotonic() - start < 2
    # the worker's heartbeat went on while it waited: at least every KEEP_ALIVE_S (and some slack)
    beats = [start, *kept_alive]
    assert len(kept_alive) >= 1 and max(b - a for a, b in zip(beats, beats[1:], strict=False)) < KEEP_ALIVE_S + 0.2
    successor = Host(path)  # replaces the dead host's mailbox, as a restarted host does
    remote_round_trip(remote, 3)
    stop_host(remote.mailboxes[0], successor)


def test_the_keep_alive_runs_while_a_host_is_awaited_over_zeromq(tmp_path):
    """No host and no mailbox at all: the work goes as a message nobody answers."""
    ctx = zmq.Context()
    remote = RemoteExperts(ctx, [f"ipc://{tmp_path}/nobody.sock"], timeout_s=0.6)
    kept_alive: list[float] = []
    remote.keep_alive = lambda: kept_alive.append(time.monotonic())
    remote.begin_step()
    remote.send(0, 0, [1], [1], torch.ones(1, 16))
    assert not remote.answered(0)
    with pytest.raises(ExpertHostError, match="no answer within 0.6 s"):
        remote.receive(0, 0)
    assert len(kept_alive) >= 2
    remote.close()
    ctx.term()


def test_an_answer_over_zeromq_of_the_wrong_width_names_its_host(tmp_path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/expert-host-0.sock"
    host = ctx.socket(zmq.ROUTER)
    host.bind(endpoint)
    remote = RemoteExperts(ctx, [endpoint], timeout_s=5.0)
    try:
        remote.begin_step()
        remote.send(0, 3, [1], [2], torch.ones(2, 16))
        frames = host.recv_multipart(copy=False)
        work = decode(frames[1:])
        answer = ExpertResult(step=work.step, layer=work.layer, output=torch.ones(2, 8), compute_s=0.001)
        host.send_multipart([frames[0], *encode(answer)], copy=False)
        with pytest.raises(ExpertHostError, match=r"answered \(2, 8\) torch.float32 to 2 rows of width 16"):
            remote.receive(0, 3)
    finally:
        remote.close()
        host.close(linger=0)
        ctx.term()


def test_mailboxes_of_hosts_that_are_gone_are_removed_and_live_ones_kept():
    """A host killed outright leaves its mailbox, under a name no later system on another run directory uses: the
    next host to start removes it (and a half-made one, and one whose name holds no possible pid), going by the pid
    in its header."""
    tag = uuid.uuid4().hex[:12]
    dead, live = f"{MAILBOX_PREFIX}test-dead-{tag}", f"{MAILBOX_PREFIX}test-live-{tag}"
    dead_pid = leave_mailbox_of_a_killed_host(dead)
    half_made = f"{live}.{dead_pid}.tmp"
    bogus = f"{live}.{1 << 40}.tmp"  # no pid at all: it overflowed the liveness check, which failed the sweep
    for path in (half_made, bogus):
        Path(path).write_bytes(b"")
    mine = Mailbox.create(live, 4096, 8)
    try:
        removed = remove_stale_mailboxes()
        assert dead in removed and half_made in removed and bogus in removed and live not in removed
        assert not os.path.exists(dead) and not os.path.exists(half_made) and os.path.exists(live)
    finally:
        mine.close()
        for path in (dead, live, half_made, bogus):
            if os.path.exists(path):
                os.unlink(path)


# A host in a PID namespace of its own (another container sharing /dev/shm): it records its pid as it knows it,
# which is `pid` here, and with "half-made" stalls before its mailbox takes its name, as a descheduled one can.
HOST_IN_ANOTHER_NAMESPACE = """
import os, sys, time
from shared.mailbox import Mailbox

path, pid, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.getpid = lambda: pid


def stall(src, dst):
    print(flush=True)
    time.sleep(60)


if stage == "half-made":
    os.rename = stall
Mailbox.create(path, 4096, 8)
print(flush=True)
time.sleep(60)
"""


def test_a_live_hosts_mailbox_is_kept_whatever_pid_it_records():
    """The pid in a mailbox's header, or in a half-made one's name, is its host's in the host's PID namespace, and
    may be no process's here: a host starting in one container swept the mailboxes of live hosts in another that
    shares /dev/shm, and their workers fell back to ZeroMQ. The host's lock on its mailbox is what says it lives."""
    tag = uuid.uuid4().hex[:12]
    live, half, abandoned = (f"{MAILBOX_PREFIX}test-{kind}-{tag}" for kind in ("live", "half", "abandoned"))
    nobody = subprocess.Popen([sys.executable, "-c", "pass"])
    nobody.wait()
    half_made = f"{half}.{nobody.pid}.tmp"
    hosts = [subprocess.Popen([sys.executable, "-c", HOST_IN_ANOTHER_NAMESPACE, path, str(nobody.pid), stage],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
             for path, stage in ((live, "whole"), (half, "half-made"))]
    try:
        for host in hosts:
            host.stdout.readline()
        leave_mailbox_of_a_killed_host(abandoned)
        assert os.path.exists(live) and os.path.exists(half_made)
        removed = remove_stale_mailboxes()
        assert abandoned in removed and live not in removed and half_made not in removed
        assert os.path.exists(live) and os.path.exists(half_made) and not os.path.exists(abandoned)
        for host in hosts:
            host.kill()
            host.wait()
        assert {live, half_made} <= set(remove_stale_mailboxes())  # with their hosts gone, so are their locks
        assert not os.path.exists(live) and not os.path.exists(half_made)
    finally:
        for host in hosts:
            host.kill()
            host.wait()
            host.stdout.close()
        for path in (live, half_made, abandoned):
            if os.path.exists(path):
                os.unlink(path)


def leave_mailbox_of_a_killed_host(path: str) -> int:
    """A mailbox made at `path` by a process then killed outright; its pid."""
    host = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shared.mailbox import Mailbox\n"
                             "Mailbox.create(sys.argv[1], 4096, 8)\nprint(flush=True)\ntime.sleep(60)", path],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    host.stdout.readline()
    host.kill()
    host.wait()
    host.stdout.close()
    return host.pid


def test_a_system_that_stops_removes_only_its_own_hosts_dead_mailboxes():
    """The worker and `tierserve up` clean up as they stop: only their own hosts' mailboxes. A header's pid is its
    host's in the host's PID namespace: another system's live host, in a container sharing /dev/shm, looks gone
    from here, and its worker would fall back from the mailbox to ZeroMQ for as long as the host lived."""
    tag = uuid.uuid4().hex[:12]
    mine, other = f"ipc:///tmp/test-{tag}/expert-host-0.sock", f"ipc:///tmp/test-other-{tag}/expert-host-0.sock"
    paths = [mailbox_path(endpoint) for endpoint in (mine, other)]
    try:
        for path in paths:
            leave_mailbox_of_a_killed_host(path)
        assert remove_stale_mailboxes([mine]) == [paths[0]]
        assert not os.path.exists(paths[0]) and os.path.exists(paths[1])
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.slow
def test_a_worker_that_stops_removes_the_mailbox_of_a_host_killed_outright(tmp_path):
    """Roles run as systemd runs them, a host killed and not restarted: its mailbox (up to 64 MiB of RAM) stayed in
    /dev/shm after the system stopped, until some later host started."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=3)
    config = Config(model=str(model), run_dir=str(tmp_path / "run"), expert_hosts=1, metrics_port=0)
    config_path = tmp_path / "tierserve.toml"
    config_path.write_text(config.to_toml())
    host = subprocess.Popen([sys.executable, "-m", "expert_host", "--config", str(config_path), "--host-id", "0"])
    worker = subprocess.Popen([sys.executable, "-m", "gpu_worker", "--config", str(config_path)],
                              stderr=subprocess.PIPE, text=True)
    mailbox = mailbox_path(config.expert_host_endpoint(0))
    try:
        for line in worker.stderr:  # up, waiting for a coordinator: a SIGTERM now goes through its exit
            if "metrics on" in line:
                break
        deadline = time.monotonic() + 60
        while not os.path.exists(mailbox):
            assert time.monotonic() < deadline, "the host made no mailbox"
            time.sleep(0.1)
        host.kill()
        host.wait()
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=60)
        assert worker.returncode == 0, log
        assert not os.path.exists(mailbox)
    finally:
        for process in (host, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
        remove_mailbox(mailbox)


# --- the whole system -------------------------------------------------------------------------------------


def _scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


@pytest.mark.slow
@pytest.mark.parametrize("data_plane", ["shm", "zmq"])
def test_system_gives_the_oracles_tokens_and_leaves_no_shared_memory(tmp_path, data_plane):
    """Two hosts, every expert cold. A mailbox of one page holds 16 rows of this model: decode steps go through
    it, the prefill of the longer prompt (17 tokens x top-2 rows) falls back to ZeroMQ."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=3)
    oracle = ReferenceModel(GGUFModel(model))
    prompts = [[1, 2, 3], list(range(40, 57))]
    # decode steps through the mailboxes' per-layer messages, not their lanes (tests/test_decode_crossings.py)
    with RunningSystem(str(model), "--expert-hosts", "2", "--hot-experts", "0", "--data-plane", data_plane,
                       "--mailbox-bytes", "4096", "--decode-crossings", "false") as system, \
            Client(system.endpoint) as client:
        run = Config(run_dir=client.stats().stats["run_dir"])  # other runs on this machine have mailboxes too
        mailboxes = [mailbox_path(run.expert_host_endpoint(i)) for i in range(2)]
        present = [os.path.exists(path) for path in mailboxes]
        for prompt in prompts:
            assert client.complete(token_ids=prompt, max_tokens=8).token_ids == oracle.greedy(prompt, 8)
        hosts = [m for m in client.health().members if m["role"] == "expert_host"]
        total = sum(_scrape(m["metrics_port"], 'tierserve_expert_host_work_total{outcome="ok"}') for m in hosts)
        mailed = sum(_scrape(m["metrics_port"], "tierserve_expert_host_mailbox_work_total") for m in hosts)
    assert not any(os.path.exists(path) for path in mailboxes)  # the hosts removed theirs as they stopped
    if data_plane == "zmq":
        assert present == [False, False] and mailed == 0 and total > 0
    else:
        assert present == [True, True]
        assert 0 < mailed < total  # both paths served: mailbox for decode, ZeroMQ for the long prefill
        assert mailed >= len(prompts) * 7 * 4  # each of 7 decode steps sends each of 4 layers to a host at least


def test_mailbox_path_is_private_to_the_endpoint(tmp_path):
    a, b = mailbox_path(f"ipc://{tmp_path}/a/expert-host-0.sock"), mailbox_path(f"ipc://{tmp_path}/b/expert-host-0.sock")
    assert a != b and Path(a).parent == Path("/dev/shm")


def test_a_file_another_process_made_at_the_same_path_is_not_removed_as_ones_own(tmp_path):
    """A superseded host stopping before it heard so removed the socket file and mailbox its successor had just
    made at the same paths."""
    path = str(tmp_path / "host.sock")
    Path(path).write_bytes(b"first")
    first = identity_at(path)
    Path(path + ".new").write_bytes(b"successor")
    os.rename(path + ".new", path)  # as a mailbox is put in place; a bind replaces a socket file the same way
    remove_if_same(path, first)
    assert Path(path).read_bytes() == b"successor"
    remove_if_same(path, identity_at(path))
    assert not Path(path).exists()
    remove_if_same(path, first)  # gone already: nothing to do

