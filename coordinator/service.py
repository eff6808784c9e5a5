"""The coordinator process: three ROUTER sockets on one asyncio loop, the decisions in the pure modules.

- client API (tcp, ROUTER_MANDATORY: a send to a client that left raises, and its requests are cancelled);
- engine (ipc, the gpu_worker's DEALER "gpu-worker"): EngineGenerate / EngineCancel out, tokens back;
- control (ipc, every process's DEALER): heartbeats in, Welcome with the placement out, Superseded to a process
  that another took its member id over from, Refused to one that is no member of this system. Replies go to the
  connection the heartbeat came on, so two processes under one member id are both answered.

Every send is non-blocking, so each message is handled to the end before the next is read. Only a large generate
waits, for its prompt to be tokenized on a thread: meanwhile the engine and control sockets are still read, and the
client socket's next message waits its turn.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from coordinator.admission import (
    Admission,
    Limits,
    Rejected,
    check_state,
    check_values,
    frames_size,
    parse_request,
    recover_request_id,
)
from coordinator.membership import WORKER_ID, Member, Membership, startup_placement
from coordinator.streams import RequestStream, StreamTable
from shared.client import run
from shared.config import Config, add_config_arguments, config_from_args
from shared.gguf_file import GGUFModel
from shared.metrics import start_metrics_server
from shared.model_config import ModelError
from shared.process import leave_run_dir, setup_process
from shared.protocol import (
    Cancel,
    EngineCancel,
    EngineError,
    EngineFinished,
    EngineStarted,
    EngineToken,
    ErrorEvent,
    Generate,
    Health,
    HealthReply,
    Heartbeat,
    Message,
    ProtocolError,
    Refused,
    Stats,
    StatsReply,
    Superseded,
    Welcome,
    decode,
    encode,
)
from shared.run_files import identity_at, listened_on, remove_if_same
from shared.tokenizer import Tokenizer, TokenizerError

OUTCOMES = ("completed", "cancelled", "error", "rejected")
REQUESTS = Counter("tierserve_requests_total", "Client requests by outcome", ["outcome"])
for _outcome in OUTCOMES:
    REQUESTS.labels(_outcome)
GENERATED = Counter("tierserve_generated_tokens_total", "Tokens generated for clients")
PROMPT = Counter("tierserve_prompt_tokens_total", "Prompt tokens of admitted requests")
TTFT = Histogram("tierserve_time_to_first_token_seconds", "From a request's arrival to its first token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
ITL = Histogram("tierserve_inter_token_latency_seconds", "Between two tokens of one request",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
RESUMED = Counter("tierserve_requests_resumed_total",
                  "Times requests the worker had started were set to continue from their streamed tokens after the "
                  "gpu worker or an expert host was lost (a request resumed twice counts twice; one the system is "
                  "not back for in resume_timeout_s then fails, counted as an error too)")
RUNNING = Gauge("tierserve_running_requests", "Requests in the engine")
WAITING = Gauge("tierserve_waiting_requests", "Admitted requests waiting for a place in the engine")

# What a worker ends a request with that a successor process can serve: it waits for one (ended_by_engine)
RESUMABLE_ENGINE_ERRORS = ("expert_host_unavailable", "unavailable", "shutting_down")
TICK_S = 0.1  # how often liveness, readiness and the drain are looked at
FLUSH_S = 0.05  # before closing with linger 0: time for the last events to leave
# How often a request is resumed after the loss of the gpu worker or an expert host that it was running on: one
# running at a further loss may be what takes the process down, and fails.
MAX_RESUMES = 2
OVERSIZED_FRAME_FACTOR = 16  # frames up to this many times max_request_bytes get a too_large answer
# A generate this large (some 10 ms or more to tokenize) is tokenized on a thread, and the event loop streams on
# meanwhile; a smaller one costs less inline than the thread's round trip.
TOKENIZE_ON_A_THREAD_BYTES = 16 << 10
# Messages a socket's reader takes ahead of their handling (stamped as they arrive) while one is handled that waits,
# a prompt tokenized on a thread; past this they wait in ZeroMQ's queue, and count from when they are read.
INBOX_MESSAGES = 256
WORKER = WORKER_ID.encode()
log = logging.getLogger("coordinator")


class Coordinator:
    def __init__(self, config: Config, model: GGUFModel) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_metadata(model.metadata)
        self.placement = startup_placement(model, config)
        self.membership = Membership(self.placement, config.heartbeat_timeout_s, model.identity,
                                     config.heartbeat_interval_s, TICK_S)
        self.admission = Admission(self.tokenizer, Limits(model.config.context_length, config.kv_cache_tokens,
                                                          config.kv_block_size))
        self.incarnation = secrets.token_hex(8)
        self.table = StreamTable(secrets.token_hex(4))
        self.stop_token_ids = sorted(self.tokenizer.eos_token_ids)
        self.ready = False
        self.lost_at: float | None = None  # a process was lost with requests in flight: they wait from then
        self.lost_reason = ""
        self.dispatch_after = 0.0
        self.engine_unreachable = False  # the last send to the engine failed: told once, not at every tick's retry
        # member id -> the incarnation that ended requests, whose successor they wait for until dispatch_after
        # ("": a failure no successor ends, waited out)
        self.awaited: dict[str, str] = {}
        self.admitting = 0  # generates whose prompts are being tokenized on a thread
        self.draining = False
        self.drain_deadline = 0.0
        self.metrics_port = 0
        self.started = time.monotonic()
        self.done = asyncio.Event()  # set when the drain is over
        # Binding would take the run dir's socket files from a coordinator serving there, cutting its members off
        served = [e for e in (config.control_endpoint, config.engine_endpoint) if listened_on(e)]
        if served:
            raise OSError(f"another coordinator serves run_dir {config.run_dir} (something accepts connections on "
                          f"{served[0]}): stop it, or give this one a run_dir of its own")
        # an ipc client endpoint too: bound over, the other's clients would reach this one, and whichever stopped
        # first would remove the socket file the other listens on (TCP refuses a second bind by itself)
        if listened_on(config.client_endpoint):
            raise OSError(f"something already accepts connections on client_endpoint {config.client_endpoint} "
                          f"(another coordinator?): stop it, or give this one a client_endpoint of its own")
        self.ctx = zmq.asyncio.Context()
        self.sockets: list[zmq.asyncio.Socket] = []
        # the socket files this process made by binding, by (device, inode): removed on exit only if still these,
        # not a file something else has since made at the same path
        self.socket_files: dict[str, tuple[int, int] | None] = {}
        try:
            self._bind_sockets(config)
        except BaseException:
            self.close()
            raise

    def _bind_sockets(self, config: Config) -> None:
        self.client = self._router(config.client_endpoint, {
            zmq.ROUTER_MANDATORY: 1,
            # a client whose machine vanished without closing its connection is found by ZMTP heartbeats
            zmq.HEARTBEAT_IVL: 2_000, zmq.HEARTBEAT_TIMEOUT: 6_000,
            # a frame this far past max_request_bytes is not read at all: ZeroMQ drops its connection rather than
            # hold it whole in memory to refuse it (two 800 MB requests took the coordinator to 1.9 GB). Per frame
            # only: ZeroMQ holds a message's frames until its last has come, and no option bounds their sum, so a
            # client that splits one request into many frames is held whole before it is refused as too large
            zmq.MAXMSGSIZE: OVERSIZED_FRAME_FACTOR * config.max_request_bytes}, hwm=100_000)
        self.engine = self._router(config.engine_endpoint, {zmq.ROUTER_MANDATORY: 1, zmq.ROUTER_HANDOVER: 1},
                                   hwm=100_000)
        self.control = self._router(config.control_endpoint, {}, hwm=1_000)

    def _router(self, endpoint: str, options: dict[int, int], hwm: int) -> zmq.asyncio.Socket:
        """A bound ROUTER socket; options are set before the bind, since its connections take the listener's."""
        socket = self.ctx.socket(zmq.ROUTER)
        self.sockets.append(socket)
        for option, value in options.items():
            socket.setsockopt(option, value)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        socket.bind(endpoint)
        if endpoint.startswith("ipc://"):
            path = endpoint.removeprefix("ipc://")
            self.socket_files[path] = identity_at(path)
        return socket

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)
        tasks = [asyncio.create_task(self._receive(self.client, self.on_client)),
                 asyncio.create_task(self._receive(self.engine, self.on_engine)),
                 asyncio.create_task(self._receive(self.control, self.on_control)),
                 asyncio.create_task(self._ticks())]
        try:
            await self.done.wait()
            await asyncio.sleep(FLUSH_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for path, identity in self.socket_files.items():
            remove_if_same(path, identity)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()

    async def _receive(self, socket: zmq.asyncio.Socket,
                       handle: Callable[[bytes, list, float], Coroutine[Any, Any, None] | None]) -> None:
        """Handle the socket's messages one after another, even those that wait, each with the time it was read: a
        reader stamps them as they come, so a request behind one whose prompt is tokenized on a thread has its
        time to first token counted from its arrival, not from the end of that wait."""
        inbox: asyncio.Queue[tuple[list, float]] = asyncio.Queue(INBOX_MESSAGES)

        async def read() -> None:
            try:
                while True:
                    frames = await socket.recv_multipart(copy=False)
                    await inbox.put((frames, time.monotonic()))
            except Exception:  # nothing more is read from this socket: say so rather than fall silent
                log.exception("reading a socket failed")
                raise

        reader = asyncio.create_task(read())
        try:
            while True:
                frames, arrived = await inbox.get()
                try:
                    handled = handle(frames[0].bytes, frames[1:], arrived)
                    if handled is not None:
                        await handled
                except Exception:  # one message that trips a bug must not take the server down
                    log.exception("error handling a message")
        finally:
            reader.cancel()

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.monotonic())
            except Exception:  # a bug must not stop liveness, the resume timeout and the drain for good
                log.exception("error in a tick")

    # --- client API ------------------------------------------------------------------------------------

    async def on_client(self, client: bytes, frames: list, arrived: float) -> None:
        # A request counts its times from its arrival; the rest is decided on the state now, which the engine's and
        # the members' messages handled meanwhile (while a prompt was tokenized) may have moved past the arrival.
        now = time.monotonic()
        try:
            msg = parse_request(frames, self.config.max_request_bytes)
            if isinstance(msg, Generate):
                await self.admit(client, msg, arrived, on_a_thread=frames_size(frames) >= TOKENIZE_ON_A_THREAD_BYTES)
            elif isinstance(msg, Cancel):
                self.cancel(client, msg.request_id, now)
            elif isinstance(msg, Health):
                self.send_client(client, HealthReply(status=self.status, members=self.members(now)))
            elif isinstance(msg, Stats):
                self.send_client(client, StatsReply(stats=self.stats(now)))
        except Rejected as r:
            if r.code != "unknown_request":  # a cancel that came too late: its request was counted when it ended
                REQUESTS.labels("rejected").inc()
            self.send_client(client, ErrorEvent(request_id=r.request_id, code=r.code, message=r.message))
        except Exception as e:  # a bug a message trips: its sender still gets an answer, and the server goes on
            log.exception("error handling a client message")
            request_id = recover_request_id(frames)
            stream = self.table.find(client, request_id) if request_id is not None else None
            if stream is not None:  # admitted before the fault: ended, or it runs on and its id stays taken
                self.fail(stream, "internal_error", repr(e))
            else:
                REQUESTS.labels("rejected").inc()
                self.send_client(client, ErrorEvent(request_id=request_id, code="internal_error", message=repr(e)))

    async def admit(self, client: bytes, msg: Generate, arrived: float, on_a_thread: bool) -> None:
        check_values(msg)  # a request's own fault first: refused as busy or not ready, it would be sent again as it is
        self.check_admissible(client, msg, time.monotonic())
        if on_a_thread:
            self.admitting += 1  # a drain waits for it, as for the requests in the table
            try:
                prompt_ids = await asyncio.to_thread(self.admission.prompt_ids, msg)
            except asyncio.CancelledError:  # the drain's deadline passed: the request being admitted gets an answer
                self.send_client(client, ErrorEvent(request_id=msg.request_id, code="shutting_down",
                                                    message="the server is shutting down"))
                raise
            finally:
                self.admitting -= 1
            # no client message was handled meanwhile, but the server may have begun draining or lost a process
            self.check_admissible(client, msg, time.monotonic())
        else:
            prompt_ids = self.admission.prompt_ids(msg)
        self.table.add(RequestStream(self.table.next_id(), client, msg, prompt_ids,
                                     self.tokenizer.detokenizer(skip_special=True, context=prompt_ids),
                                     self.stop_token_ids, arrived))
        PROMPT.inc(len(prompt_ids))
        self.dispatch()

    def check_admissible(self, client: bytes, msg: Generate, now: float) -> None:
        # a request the engine has room for now does not wait: only those that would queue count against max_waiting
        room = self.config.max_running - self.table.num_running if self.ready and now >= self.dispatch_after else 0
        check_state(msg, draining=self.draining, missing=self.membership.missing(),
                    duplicate=self.table.find(client, msg.request_id) is not None,
                    waiting=self.table.num_waiting - room, max_waiting=self.config.max_waiting)

    def cancel(self, client: bytes, request_id: str, now: float) -> None:
        stream = self.table.find(client, request_id)
        if stream is None:
            raise Rejected("unknown_request", f"no request {request_id!r} is in flight on this connection",
                           request_id)
        self.end(stream, "cancelled", stream.final("cancelled", now))

    def send_client(self, client: bytes, msg: Message) -> bool:
        """False when the client is gone (its requests are then cancelled) or is not reading its replies."""
        try:
            self.client.send_multipart([client, *encode(msg)], flags=zmq.NOBLOCK, copy=False).result()
            return True
        except zmq.ZMQError as e:
            self.client_gone(client, e)
            return False

    def client_gone(self, client: bytes, error: zmq.ZMQError) -> None:
        streams = self.table.of_client(client)
        if streams:
            log.info("client %s unreachable (%s): cancelling its %d requests", client.hex(), error.strerror,
                     len(streams))
        for stream in streams:
            self.end(stream, "cancelled")

    # --- engine ----------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Let waiting requests into the engine while it has room and the system is ready."""
        if self.ready and time.monotonic() >= self.dispatch_after:
            started = self.table.start_next(self.config.max_running)
            now = time.monotonic()
            for i, stream in enumerate(started):
                stream.sent_at = now
                if not self.send_engine(stream.engine_request()):
                    # The worker heartbeats, but its engine connection is not there (yet): right after this
                    # coordinator restarts, the control socket may reconnect first. The requests wait for it
                    # (a tick retries), and fail with the rest if the worker is lost.
                    self.table.requeue(started[i:])
                    break
        RUNNING.set(self.table.num_running)
        WAITING.set(self.table.num_waiting)

    def send_engine(self, msg: Message, quiet: bool = False) -> bool:
        try:
            self.engine.send_multipart([WORKER, *encode(msg)], flags=zmq.NOBLOCK, copy=False).result()
        except zmq.ZMQError as e:
            if not quiet and not self.engine_unreachable:
                log.warning("cannot reach the gpu worker: %s", e.strerror)
                self.engine_unreachable = True
            return False
        if self.engine_unreachable:
            log.info("the gpu worker is reachable again")
            self.engine_unreachable = False
        return True

    def on_engine(self, identity: bytes, frames: list, now: float) -> None:
        if identity != WORKER:
            log.warning("dropping a message from %r on the engine socket", identity)
            return
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("dropping a bad engine message: %s", e.message)
            return
        if not isinstance(msg, (EngineStarted, EngineToken, EngineError, EngineFinished)):
            log.warning("dropping unexpected %s on the engine socket", msg.KIND)
            return
        stream = self.table.get(msg.request_id)
        if stream is None:
            # A request already ended here (cancelled, stopped, failed) or sent by an earlier coordinator:
            # nobody waits for it, so the engine should stop spending KV cache on it.
            if isinstance(msg, EngineToken) and msg.finish_reason is None:
                self.send_engine(EngineCancel(request_id=msg.request_id))
            return
        try:
            if isinstance(msg, (EngineStarted, EngineToken)):  # a token says so too, should the start's word be lost
                stream.engine_started = True
            if isinstance(msg, EngineToken):
                self.on_token(stream, msg, now)
            elif isinstance(msg, EngineError) and msg.code in RESUMABLE_ENGINE_ERRORS:
                self.ended_by_engine(stream, msg, now)
            elif isinstance(msg, EngineError):
                self.fail(stream, msg.code, msg.message, in_engine=False)
            elif isinstance(msg, EngineFinished):
                self.end(stream, msg.finish_reason, stream.final(msg.finish_reason, now), in_engine=False)
        except Exception as e:  # a bug this message trips: its client is told, rather than left waiting for ever
            log.exception("error handling %s for request %s", msg.KIND, stream.request_id)
            self.fail(stream, "internal_error", repr(e))

    def on_token(self, stream: RequestStream, token: EngineToken, now: float) -> None:
        previous = stream.last_token_at
        events = stream.on_token(token, now)
        GENERATED.inc()
        if previous is None:
            TTFT.observe(now - stream.arrived)
        else:
            ITL.observe(now - previous)
        if not stream.finished:
            self.send_client(stream.client, events[0])
        elif self.send_client(stream.client, events[0]):
            self.end(stream, stream.finish_reason, events[1], in_engine=token.finish_reason is None)

    def end(self, stream: RequestStream, reason: str, final: Message | None = None, in_engine: bool = True) -> None:
        """Forget a stream, telling the engine to drop it if it may still hold it, and its client why."""
        if self.table.get(stream.internal_id) is not stream:  # already ended, e.g. by client_gone meanwhile
            return
        if in_engine and self.table.is_running(stream):
            self.send_engine(EngineCancel(request_id=stream.internal_id))
        self.table.remove(stream)
        REQUESTS.labels(reason if reason in ("cancelled", "error") else "completed").inc()
        if final is not None:
            self.send_client(stream.client, final)
        self.dispatch()

    def fail(self, stream: RequestStream, code: str, message: str, in_engine: bool = True) -> None:
        self.end(stream, "error", ErrorEvent(request_id=stream.request_id, code=code, message=message), in_engine)

    def fail_all(self, message: str, in_engine: bool = False) -> None:
        streams = list(self.table.streams.values())
        if streams:
            log.warning("%s: failing %d requests", message, len(streams))
        for stream in streams:
            self.fail(stream, "unavailable", message, in_engine=in_engine)

    # --- control plane ---------------------------------------------------------------------------------

    def on_control(self, identity: bytes, frames: list, now: float) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("dropping a bad control message: %s", e.message)
            return
        if not isinstance(msg, Heartbeat):
            log.warning("dropping unexpected %s on the control socket", msg.KIND)
            return
        outcome = self.membership.heartbeat(msg, now)
        if outcome.refused:
            if outcome.first_notice:
                log.warning("refusing the heartbeats of pid %d on %s: %s", msg.pid, msg.host, outcome.refused)
            self.reply_control(identity, Refused(reason=outcome.refused))
            return
        if outcome.deferred:
            if outcome.first_notice:
                log.warning("%s", outcome.deferred)
            return
        if outcome.superseded_by is not None:
            self.supersede(identity, msg, outcome.superseded_by, outcome.first_notice)
            return
        failed_incarnation = self.awaited.get(msg.member_id)
        if failed_incarnation is not None and failed_incarnation != msg.incarnation:
            del self.awaited[msg.member_id]
            if not self.awaited:  # every process that ended requests has a successor: no need to wait out the timer
                self.dispatch_after = 0.0
        if outcome.joined:
            log.info("%s joined (pid %d, metrics :%d, placement v%d)", msg.member_id, msg.pid, msg.metrics_port,
                     msg.placement_version)
            if msg.model != self.membership.model:
                log.warning("%s serves another model (%s) than the coordinator (%s): it is sent no placement until "
                            "whichever is on the old file is restarted", msg.member_id, msg.model,
                            self.membership.model)
        if outcome.restarted and msg.member_id == WORKER_ID:
            self.update_ready()
            self.worker_lost("the gpu worker restarted", now)
        if outcome.welcome:
            self.reply_control(identity, Welcome(placement=self.placement.to_dict()))
        self.update_ready()

    def supersede(self, identity: bytes, hb: Heartbeat, current: Member, first_notice: bool) -> None:
        """Tell a process that another took its member id over that it must stop."""
        if first_notice:
            log.warning("%s was started twice: pid %d on %s took it over from pid %d on %s, which still runs and is "
                        "told to stop", hb.member_id, current.pid, current.host, hb.pid, hb.host)
        self.reply_control(identity, Superseded(member_id=hb.member_id, pid=current.pid, host=current.host))

    def reply_control(self, identity: bytes, msg: Message) -> None:
        # Without ROUTER_MANDATORY a reply that cannot go out is dropped; the next heartbeat gets another.
        self.control.send_multipart([identity, *encode(msg)], flags=zmq.NOBLOCK, copy=False)

    def update_ready(self) -> None:
        ready = self.membership.ready()
        if ready != self.ready:
            self.ready = ready
            if ready:
                log.info("ready: placement v%d, %d hot experts", self.placement.version, self.placement.count_hot())
            else:
                log.warning("not ready: %s", "; ".join(self.membership.missing()))
        self.dispatch()

    def worker_lost(self, reason: str, now: float) -> None:
        """The worker is gone with the KV cache of every request it held: they, and the requests still waiting
        here, wait for its successor. Those it had started count as resumed; those still in its queue do not."""
        if self.config.resume_timeout_s <= 0:
            self.fail_all(reason)
            return
        running = self.table.running_streams()
        for stream in running:  # a worker that was only slow, not gone, would run them on for nobody
            self.send_engine(EngineCancel(request_id=stream.internal_id), quiet=True)
        resumed = self.resume(running, "unavailable", reason)
        if self.table:
            log.warning("%s: %d requests it held resume when it is back, %d more wait for it", reason, resumed,
                        self.table.num_waiting - resumed)
            self.waiting_since(now, reason)

    def host_lost(self, reason: str, now: float) -> None:
        """An expert host the system needs is gone: the requests queued here wait for its successor from now on
        (or fail, with resume_timeout_s = 0), as those running do once the worker reports their work failed.
        Nothing else started their wait where those running ended otherwise (cancelled, failed): they waited for
        good, and a drain cancelled them at its end rather than failing them at once."""
        waiting = self.table.waiting_streams()
        if not waiting:
            return
        if self.config.resume_timeout_s <= 0:
            for stream in waiting:
                self.fail(stream, "unavailable", f"{reason}, and resume_timeout_s is 0", in_engine=False)
        else:
            self.waiting_since(now, reason)

    def ended_by_engine(self, stream: RequestStream, error: EngineError, now: float) -> None:
        """The worker ended the request because an expert host stopped answering or its own stop outlasted
        drain_timeout_s, or refused it because it is stopping (to be restarted, or the coordinator would be
        stopping first). Nothing is sent to the worker until the process the error names has a successor, or has
        had the time to be found missing by its heartbeats, so that requests do not go straight back to the same
        failure; a successor that joined after the request was sent is there already. A refusal does not count as
        a resume: the worker had not started the request."""
        if self.config.resume_timeout_s <= 0:
            self.fail(stream, error.code, error.message, in_engine=False)
            return
        failed = self.membership.members.get(error.member_id)
        if failed is None or failed.first_seen <= stream.sent_at:  # else its successor joined after the request
            if now >= self.dispatch_after:
                self.awaited.clear()
            self.dispatch_after = now + self.config.heartbeat_timeout_s + self.config.heartbeat_interval_s
            if failed is None:
                self.awaited[""] = ""  # no successor ends this wait
            else:
                self.awaited[failed.member_id] = failed.incarnation
        if self.resume([stream], error.code, error.message):
            self.waiting_since(now, error.message)

    def resume(self, streams: list[RequestStream], code: str, reason: str) -> int:
        """Streams whose state in the engine is lost continue from their streamed tokens once the system is ready
        again. The resume of one the worker had started counts: one started after MAX_RESUMES already fails
        instead."""
        kept = []
        for stream in streams:
            if stream.engine_started and stream.resumes >= MAX_RESUMES:
                self.fail(stream, code, f"{reason}; the request was resumed {MAX_RESUMES} times already",
                          in_engine=False)
            else:
                kept.append(stream)
        # a failure's send may have found a client gone, and client_gone ended that client's other streams
        kept = [s for s in kept if self.table.get(s.internal_id) is s]
        RESUMED.inc(sum(stream.engine_started for stream in kept))
        self.table.resume(kept)
        self.dispatch()
        return len(kept)

    def waiting_since(self, now: float, reason: str) -> None:
        """Requests wait for a lost process's successor from the first loss on, for up to resume_timeout_s."""
        if self.lost_at is None:
            self.lost_at, self.lost_reason = now, reason

    def tick(self, now: float) -> None:
        for member in self.membership.expire(now):
            log.warning("%s lost (no heartbeat for %.1f s)", member.member_id, self.config.heartbeat_timeout_s)
            self.update_ready()
            if member.member_id == WORKER_ID:
                self.worker_lost("the gpu worker stopped responding", now)
            elif not self.ready:
                self.host_lost(f"{member.member_id} stopped responding", now)
        self.update_ready()
        if self.lost_at is not None:
            if (self.ready and now >= self.dispatch_after) or not self.table:
                self.lost_at = None
            elif not self.ready and (self.draining or now - self.lost_at >= self.config.resume_timeout_s):
                why = "the server is shutting down" if self.draining else \
                    f"the system was not ready again within {self.config.resume_timeout_s:g} s"
                self.lost_at = None
                # a live worker may still hold running requests, e.g. queued behind the step a lost host failed
                self.fail_all(f"{self.lost_reason}, and {why}", in_engine=self.membership.is_alive(WORKER_ID))
        if self.draining and ((not self.table and not self.admitting) or now >= self.drain_deadline):
            for stream in list(self.table.streams.values()):
                self.end(stream, "cancelled", stream.final("cancelled", now))
            self.done.set()

    # --- status ----------------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        now = time.monotonic()
        if self.draining:  # a second signal: stop waiting
            self.drain_deadline = now
            return
        self.draining = True
        self.drain_deadline = now + self.config.drain_timeout_s
        log.info("draining: %d requests in flight, waiting up to %.0f s", len(self.table),
                 self.config.drain_timeout_s)

    @property
    def status(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "starting"

    def members(self, now: float) -> list[dict]:
        me = {"member_id": "coordinator", "role": "coordinator", "pid": os.getpid(), "host": socket.gethostname(),
              "incarnation": self.incarnation, "metrics_port": self.metrics_port, "alive": True,
              "placement_version": self.placement.version, "model": self.membership.model,
              "last_seen_s": 0.0,
              "load": {"running": self.table.num_running, "waiting": self.table.num_waiting}}
        return [me, *self.membership.snapshot(now)]

    def stats(self, now: float) -> dict:
        def count(name: str, **labels: str) -> int:
            return int(REGISTRY.get_sample_value(name, labels) or 0)

        return {
            "status": self.status, "model": self.config.model, "run_dir": self.config.run_dir,
            "uptime_s": round(now - self.started, 3),
            "running": self.table.num_running, "waiting": self.table.num_waiting,
            "requests": {o: count("tierserve_requests_total", outcome=o) for o in OUTCOMES},
            "resumed": count("tierserve_requests_resumed_total"),
            "prompt_tokens": count("tierserve_prompt_tokens_total"),
            "generated_tokens": count("tierserve_generated_tokens_total"),
            "placement": {"version": self.placement.version, "hot_experts": self.placement.count_hot(),
                          "hosts": list(self.placement.hosts)},
            "members": {m.member_id: m.load for m in self.membership.members.values()},
        }


def serve(config: Config) -> int:
    setup_process("coordinator", "coordinator", config)
    try:
        model = GGUFModel(config.model)
        coordinator = Coordinator(config, model)
    except (ModelError, TokenizerError, OSError, ValueError, zmq.ZMQError) as e:
        log.error("cannot start: %s", e)
        return 1
    try:
        coordinator.metrics_port = start_metrics_server(config.metrics_host, config.metrics_port_for("coordinator"))
        log.info("serving %s: clients at %s, metrics on :%d, placement v%d (%d hot experts, %d hosts)",
                 config.model, config.client_endpoint, coordinator.metrics_port, coordinator.placement.version,
                 coordinator.placement.count_hot(), len(coordinator.placement.hosts_in_use()))
        run(coordinator.run())
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        coordinator.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve coordinator", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    try:
        return serve(config)
    finally:
        leave_run_dir(config)
