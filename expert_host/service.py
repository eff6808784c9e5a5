"""The expert host's socket loop: serve compute requests for the experts the placement gives it."""

from __future__ import annotations

import argparse
import collections
import logging
import os
import time

import torch
import zmq
from prometheus_client import Counter, Gauge, Histogram

from expert_host.memory import HostMemoryError
from expert_host.store import ExpertStore, PlacementStopped
from shared.config import Config, add_config_arguments, config_from_args
from shared.expert_cache import CacheError, ConversionStopped
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.mailbox import ORDERED_STORES, Backoff, Mailbox, MailboxError, remove_mailbox
from shared.memory_use import room_above_floor, size_text
from shared.model_config import ModelError
from shared.native_kernels import load_library, pin_threads
from shared.placement import expert_host_id
from shared.process import ControlLink, StopFlag, leave_run_dir, open_metrics, open_model, setup_process
from shared.protocol import (
    ExpertFailure,
    ExpertResult,
    ExpertWork,
    ProtocolError,
    decode,
    encode,
    recover_fields,
)
from shared.run_files import identity_at, listened_on, mailbox_path, remove_if_same, remove_stale_mailboxes

_log = logging.getLogger("expert_host")  # for work items, outside serve's own logger
WORK = Counter("tierserve_expert_host_work_total", "Work items (one layer's experts for one batch)", ["outcome"])
for _outcome in ("ok", "error"):  # both series from the start, so that the first error is an increase
    WORK.labels(_outcome)
ROWS = Counter("tierserve_expert_host_rows_total", "Routed (token, expert) pairs computed")
MAILBOX_WORK = Counter("tierserve_expert_host_mailbox_work_total",
                       "Work items of one layer that came through the shared-memory mailbox rather than ZeroMQ (the "
                       "lane's are lane_work_total)")
LANE_WORK = Counter("tierserve_expert_host_lane_work_total",
                    "Work items the worker's device posted through the mailbox's lane (a decode step's layer "
                    "with work for this host)")
LATENCY = Histogram("tierserve_expert_host_compute_seconds", "Compute time of one work item",
                    buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0))
QUEUE = Gauge("tierserve_expert_host_queue_depth",
              "Work items received over ZeroMQ and not yet computed (the mailbox and its lane hold one at a time)")
HELD = Gauge("tierserve_expert_host_experts", "Experts held by this host")
HELD_BYTES = Gauge("tierserve_expert_host_expert_bytes", "Bytes of expert weights held by this host")

# With a mailbox the loop watches it alone for up to SOCKETS_EVERY_S between looks at its sockets (each look
# costs microseconds the mailbox path should not pay), and an idle host sleeps at most IDLE_SLEEP_S at a time.
SOCKETS_EVERY_S = 1e-3
IDLE_SLEEP_S = 1e-3
DRAIN_QUIET_S = 0.1
DRAIN_MAX_S = 2.0
# A work item of this many rows is a prompt being prefilled (a decode batch's rows are its sequences times
# top-k spread over the hosts): after it, the next layer's mapped experts are read in ahead of their use.
PREFETCH_ROWS = 256


# The default mailbox holds a whole batch's rows up to this many bytes each way (the worker page-locks both):
# a decode batch's rows are a few MB; a long prompt's cold rows beyond it go over ZeroMQ.
MAILBOX_DEFAULT_MAX_BYTES = 64 << 20


def open_mailbox(config: Config, host_index: int, model: GGUFModel, log: logging.Logger) -> Mailbox | None:
    """This host's mailbox for the worker when the data plane to it is shared memory, sized for a whole batch's
    rows (max_batch_tokens x top-k) in the widest dtype, up to MAILBOX_DEFAULT_MAX_BYTES unless mailbox_bytes
    says otherwise; a mailbox a killed predecessor left is removed. None, said in the log, where its pages (RAM:
    /dev/shm is memory) would leave less than host_memory_floor free: activations then go over ZeroMQ."""
    path = mailbox_path(config.expert_host_endpoint(host_index))
    remove_mailbox(path)
    for stale in remove_stale_mailboxes():
        log.info("removed %s: its host is gone", stale)
    if not config.shm_data_plane(host_index):
        return None
    if not ORDERED_STORES:
        log.warning("shared-memory mailboxes need x86-64 store ordering; activations go over ZeroMQ")
        return None
    cfg = model.config
    capacity = config.mailbox_bytes or min(config.max_batch_tokens * cfg.n_experts_used * cfg.hidden * 4,
                                           MAILBOX_DEFAULT_MAX_BYTES)
    room, floor = room_above_floor(config.host_memory_floor)
    if 2 * capacity > room:  # a request's rows and their answer
        log.warning("a mailbox of %s would leave less than host_memory_floor (%s) free: %s is available above it; "
                    "activations go over ZeroMQ", size_text(2 * capacity), size_text(floor), size_text(room))
        return None
    try:
        return Mailbox.create(path, capacity, cfg.n_experts, n_layers=cfg.n_layers)
    except MailboxError as e:
        log.warning("%s; activations go over ZeroMQ", e)
        return None


def bind_threads(config: Config, host_index: int, log: logging.Logger) -> None:
    """pin_host_threads: this host's threads one per logical CPU of its own (Config.host_cores)."""
    threads = torch.get_num_threads()
    cores = config.host_cores(host_index, threads)
    if not cores:
        log.warning("threads not bound: %d hosts x %d threads outnumber the %d CPUs this process may use",
                    config.expert_hosts, threads, len(os.sched_getaffinity(0)))
    elif pin_threads(cores):
        log.info("%d threads bound to CPUs %s", len(cores), ",".join(map(str, cores)))
    else:
        log.warning("threads not all bound to CPUs %s (no native library, or a CPU refused): those not bound run on "
                    "any of them", ",".join(map(str, cores)))


def serve(config: Config, host_index: int) -> int:
    member_id = expert_host_id(host_index)
    log = setup_process(member_id, "expert_host", config)
    stop = StopFlag()
    metrics_port = open_metrics(config, log, "expert_host", host_index)
    model = open_model(config, log)
    if metrics_port is None or model is None:
        return 1
    try:
        store = ExpertStore.from_config(open_expert_source(model, config, lambda: stop.stopping), host_index, config)
    except (HostMemoryError, ModelError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1
    except ConversionStopped as e:
        log.info("told to stop while converting the expert cache (%s): it converts at the next start", e)
        return stop.exit_status
    if any(store.source.format(layer) != "float" for layer in range(model.config.n_layers)):
        load_library()  # the native kernel's build (once per machine) before the first work item, not during it
    ctx = zmq.Context()
    control = ControlLink(ctx, config, member_id, "expert_host", metrics_port, model.identity, stop)
    endpoint = config.expert_host_endpoint(host_index)
    placement = None
    if listened_on(endpoint):
        # Another process serves this id. Binding the endpoint and making the mailbox would take both from it, so
        # they wait until joining has superseded it. The coordinator takes the id over at this process's first
        # heartbeat (and tells that one to stop), unless this one serves another model file than the coordinator
        # while that one serves the coordinator's: then this one waits until that one is lost.
        log.info("%s is served by another process: joining before taking it over", endpoint)
        placement = control.wait_for_placement()
        if placement is None:
            control.socket.close(linger=0)
            ctx.term()
            store.close()
            log.info("stopped before it took the endpoint over")
            return stop.exit_status
    data = ctx.socket(zmq.ROUTER)
    data.setsockopt(zmq.LINGER, 0)
    data.bind(endpoint)
    # the files this process made: in the moment before it hears that a successor superseded it, the successor's
    # are already at the same paths
    socket_file = identity_at(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None
    mailbox = open_mailbox(config, host_index, model, log)
    if config.pin_host_threads:
        bind_threads(config, host_index, log)

    def keep_alive() -> None:  # between a placement's copies, and while it waits for another host's to end
        if stop.stopping:  # a copy of many GB, or a wait for one, heard SIGTERM only at its end
            raise PlacementStopped(f"stopped while taking placement v{placement.version} on")
        control.heartbeat_if_due(store.placement_version, {"experts": len(store.weights)})

    store.keep_alive = keep_alive
    log.info("serving %s on %s%s, metrics on :%d", config.model, endpoint,
             f" and {mailbox.path}" if mailbox else "", metrics_port)
    queue: collections.deque[list] = collections.deque()
    backoff = Backoff(max_sleep_s=IDLE_SLEEP_S)
    try:
        while not stop.stopping:
            if placement is not None and placement.version != store.placement_version:
                try:
                    store.apply(placement)
                except (HostMemoryError, CacheError) as e:  # it cannot be held here: say why and stop
                    log.error("cannot hold placement v%d: %s", placement.version, e)
                    return 1
                except PlacementStopped as e:  # cut short in the fill it holds nothing; in the wait, what it held
                    log.info("%s: holding %d experts of placement v%d", e, len(store.weights), store.placement_version)
                    break
                HELD.set(len(store.weights))
                HELD_BYTES.set(store.nbytes)
                log.info("placement v%d: holding %d experts (%.1f MB)", placement.version, len(store.weights),
                         store.nbytes / 1e6)
            control.heartbeat_if_due(store.placement_version, {"queue": len(queue), "experts": len(store.weights)})
            placement = control.read_placement()
            if mailbox is not None:
                if backoff.wait(lambda: mailbox.pending() or mailbox.lane_pending(),
                                time.monotonic() + SOCKETS_EVERY_S):
                    answer_pending(store, mailbox)
                    backoff.reset()
                if not queue and not data.poll(0):
                    continue
            elif not queue and not data.poll(50):
                continue
            while data.poll(0):
                queue.append(data.recv_multipart(copy=False))
            QUEUE.set(len(queue))
            frames = queue.popleft()
            data.send_multipart([frames[0], *handle(store, frames[1:])], copy=False)
            QUEUE.set(len(queue))
        drain(store, data, queue, mailbox)
    finally:
        store.close()
        if mailbox is not None:
            mailbox.close()
            remove_if_same(mailbox.path, mailbox.identity)
        remove_if_same(endpoint.removeprefix("ipc://"), socket_file)
        data.close(linger=1000)  # time for the drain's answers to leave
        control.socket.close(linger=0)
        ctx.term()
        log.info("stopped")
    return stop.exit_status


def drain(store: ExpertStore, data: zmq.Socket, queue: collections.deque[list], mailbox: Mailbox | None) -> None:
    """Stopping: what was asked before the signal is answered, so that the worker's step does not wait out its
    timeout. Messages the signal overtook may still be on their way through ZeroMQ: the host answers until its
    socket and mailbox have been quiet for DRAIN_QUIET_S, for at most DRAIN_MAX_S."""
    quiet_since = time.monotonic()
    deadline = quiet_since + DRAIN_MAX_S
    while True:
        answered = bool(queue)
        if mailbox is not None and (mailbox.pending() or mailbox.lane_pending()):
            answer_pending(store, mailbox)
            answered = True
        while data.poll(0):
            queue.append(data.recv_multipart(copy=False))
            answered = True
        while queue:
            frames = queue.popleft()
            data.send_multipart([frames[0], *handle(store, frames[1:])], copy=False)
        now = time.monotonic()
        if answered:
            quiet_since = now
        if now >= deadline or now - quiet_since >= DRAIN_QUIET_S:
            return
        if not answered:
            time.sleep(IDLE_SLEEP_S)


def compute(store: ExpertStore, layer: int, experts: list[int], counts: list[int],
            hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One work item through the store, timed and counted; ValueError names what is wrong with it."""
    start = time.perf_counter()
    output = store.compute(layer, experts, counts, hidden)
    seconds = time.perf_counter() - start
    if hidden.shape[0] >= PREFETCH_ROWS:
        store.prefetch_next_layer(layer)
    count_work(seconds, output.shape[0])
    return output, seconds


def count_work(seconds: float, rows: int) -> None:
    """A work item done: `rows` routed rows in `seconds`."""
    LATENCY.observe(seconds)
    WORK.labels("ok").inc()
    ROWS.inc(rows)


def handle(store: ExpertStore, frames: list) -> list:
    try:
        msg = decode(frames, expected=(ExpertWork,))
    except ProtocolError as e:
        WORK.labels("error").inc()
        # answered under its header's step and layer where they can be read: the worker waits for that step and
        # layer's answer, and passed one under -1 over as stale, waiting out its timeout
        header = recover_fields(frames, ("step", "layer"))
        step, layer = (v if type(v := header.get(k)) is int else -1 for k in ("step", "layer"))
        return encode(ExpertFailure(step=step, layer=layer, code=e.code, message=e.message))
    try:
        output, seconds = compute(store, msg.layer, msg.expert_ids, msg.counts, msg.hidden)
    except ValueError as e:
        WORK.labels("error").inc()
        return encode(ExpertFailure(step=msg.step, layer=msg.layer, code="bad_work", message=str(e)))
    except Exception as e:  # one work item's failure must not take the host, and the experts it serves, down
        WORK.labels("error").inc()
        _log.exception("work item failed")
        return encode(ExpertFailure(step=msg.step, layer=msg.layer, code="internal", message=repr(e)))
    return encode(ExpertResult(step=msg.step, layer=msg.layer, output=output, compute_s=seconds))


def answer_pending(store: ExpertStore, mailbox: Mailbox) -> None:
    """The mailbox's pending requests answered: its lane's, then its per-layer message's."""
    if mailbox.lane_pending():
        answer_lane(store, mailbox)
    if mailbox.pending():
        answer_mailbox(store, mailbox)


def answer_mailbox(store: ExpertStore, mailbox: Mailbox) -> None:
    """Answer the mailbox's pending request; the rows are computed where the worker wrote them."""
    try:
        request = mailbox.take()
        output, seconds = compute(store, request.layer, request.experts, request.counts, request.hidden)
    except ValueError as e:  # a request that does not describe its payload, or work the store refuses
        WORK.labels("error").inc()
        mailbox.fail("bad_work", str(e))
        return
    except Exception as e:  # the worker waits on this answer: a failure is one too
        WORK.labels("error").inc()
        _log.exception("mailbox request failed")
        mailbox.fail("internal", repr(e))
        return
    mailbox.reply(output, seconds)
    MAILBOX_WORK.inc()


def answer_lane(store: ExpertStore, mailbox: Mailbox) -> None:
    """Answer the lane's pending request: the routed pairs of the experts the owner table gives this host,
    computed from the rows where the device wrote them, and each row's weighted sum written for it to read."""
    try:
        request = mailbox.lane_take()
        start = time.perf_counter()
        pairs = store.answer_lane(request)
        if pairs:  # as over ZeroMQ and the mailbox, work items are the requests with work in them
            count_work(time.perf_counter() - start, pairs)
            LANE_WORK.inc()
        if pairs >= PREFETCH_ROWS:
            store.prefetch_next_layer(request.layer)
    except ValueError as e:  # shapes the lane cannot hold, ids out of range, or experts this host does not hold
        WORK.labels("error").inc()
        mailbox.lane_fail("bad_work", str(e))
        return
    except Exception as e:  # the device waits on this answer: a failure is one too (the worker reports it)
        WORK.labels("error").inc()
        _log.exception("lane request failed")
        mailbox.lane_fail("internal", repr(e))
        return
    mailbox.lane_reply(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve expert-host")
    parser.add_argument("--host-id", type=int, default=0, help="index of this expert host (0..expert_hosts-1)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if not 0 <= args.host_id < config.expert_hosts:
        parser.error(f"--host-id {args.host_id} must be >= 0 and below expert_hosts ({config.expert_hosts})")
    try:
        return serve(config, args.host_id)
    finally:
        leave_run_dir(config)
