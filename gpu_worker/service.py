"""The gpu_worker's busy loop: take requests from the coordinator, step the model, stream tokens back."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Callable

import torch
import zmq
from prometheus_client import Counter, Gauge, Histogram

from gpu_worker.cold_path import ColdPlanner, measure_matmul_flops
from gpu_worker.crossing import DeviceCrossings
from gpu_worker.experts import HotExperts, MoEDispatch
from gpu_worker.grouped import warm_up_quantized
from gpu_worker.kv_blocks import KVBlockAllocator
from gpu_worker.model import Chunk, Trunk, kv_cache_shape
from gpu_worker.remote import KEEP_ALIVE_S, ExpertHostError, RemoteExperts
from gpu_worker.sampler import Sampler
from gpu_worker.scheduler import SamplingParams, Scheduler, Sequence
from gpu_worker.soft_pool import SoftPool, slot_nbytes
from gpu_worker.step_profile import StepProfile, section
from shared.config import Config, add_config_arguments, config_from_args
from shared.expert_cache import CacheError, ConversionStopped
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.memory_use import HostMemoryError, room_above_floor, size_text
from shared.model_config import ModelError
from shared.placement import Placement, expert_host_id
from shared.process import (
    ControlLink,
    StopFlag,
    leave_run_dir,
    open_metrics,
    open_model,
    setup_process,
    worker_device,
    worker_dtype,
)
from shared.protocol import (
    EngineCancel,
    EngineError,
    EngineFinished,
    EngineGenerate,
    EngineStarted,
    EngineToken,
    Message,
    ProtocolError,
    decode,
    encode,
)
from shared.run_files import remove_stale_mailboxes

MEMBER_ID = "gpu-worker"

STEPS = Counter("tierserve_worker_steps_total", "Model steps run")
BATCH_TOKENS = Histogram("tierserve_worker_batch_tokens", "Tokens in one model step",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
BATCH_SEQS = Gauge("tierserve_worker_batch_size", "Sequences in the last model step (0 once the worker is idle)")
RUNNING = Gauge("tierserve_worker_running_requests", "Requests holding KV cache")
WAITING = Gauge("tierserve_worker_waiting_requests", "Requests waiting for KV cache")
KV_USED = Gauge("tierserve_worker_kv_cache_used_ratio", "Fraction of KV cache blocks in use")
DISPATCH = Counter("tierserve_worker_expert_dispatch_total",
                   "Routed (token, expert) pairs by path: hot, soft_hit, streamed, staged, cpu", ["path"])
STEP_SECONDS = Histogram("tierserve_worker_step_seconds", "Wall time of one model step",
                         buckets=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0))
SOFT_HIT_RATE = Gauge("tierserve_worker_soft_tier_hit_rate",
                      "Cold expert lookups found in a VRAM slot, since start (0 without soft slots)")
# the lookups themselves, so that a window's hit rate (a benchmark phase's, a dashboard's) is a ratio of increases
SOFT_LOOKUPS = Counter("tierserve_worker_soft_tier_lookups_total",
                       "Cold expert lookups in the VRAM slots, by result: hit or miss", ["result"])
STREAMED_BYTES = Counter("tierserve_worker_streamed_bytes", "Expert bytes streamed into VRAM slots (soft and staging)")
HOT_BYTES = Gauge("tierserve_worker_hot_expert_bytes", "Bytes of the hot experts' weights the worker holds (not its "
                  "soft and staging slots)")
# The cold planner's constants as the last step planned with them (measured at start-up, the CPU's and the round
# trip refitted from the hosts' timings): why it split the cold experts between PCIe and the hosts' CPUs as it did.
# A worker without soft slots has no planner and exports them, as the soft tier's hit rate, as 0.
COST_PCIE = Gauge("tierserve_worker_cost_pcie_bytes_per_second",
                  "Cold planner: PCIe bandwidth it plans with (0: no planner, no soft slots)")
COST_CPU_READ = Gauge("tierserve_worker_cost_cpu_read_bytes_per_second",
                      "Cold planner: expert bytes a host's CPU reads per second, by served format", ["format"])
COST_CPU_FLOPS = Gauge("tierserve_worker_cost_cpu_flops", "Cold planner: a host's CPU expert compute, flop/s")
COST_ROUND_TRIP = Gauge("tierserve_worker_cost_round_trip_seconds",
                        "Cold planner: one crossing to a host and back, beyond its compute")
# a path's counter, looked up once: a decode step counts every layer's paths, and labels() takes microseconds
_dispatched = functools.cache(DISPATCH.labels)


class FailedAfterSampling(Exception):
    """A step failed once its tokens were recorded (in what follows them: retiring the step's host buffers, its
    metrics, its profile), or while recording them, after finishing some requests. Its samples are real and
    already in their sequences, some of which it finished: the caller still sends them. The failure is the
    exception's cause."""

    def __init__(self, sampled: list[tuple[Sequence, object]], finished: list[Sequence]) -> None:
        super().__init__("the step failed after sampling")
        self.sampled, self.finished = sampled, finished


class Engine:
    """Model, cache, scheduler and sampler for one placement; no sockets of its own but the data plane."""

    def __init__(self, config: Config, model: GGUFModel, remote: RemoteExperts | None,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        """stopping: asked while the expert cache converts (ConversionStopped)."""
        self.config, self.model, self.remote = config, model, remote
        self.device = worker_device(config)
        dtype = worker_dtype(config, self.device)
        num_blocks = config.kv_cache_blocks
        cuda = self.device.type == "cuda"
        if not cuda:
            check_trunk_and_kv_cache_fit(config, model, dtype)
        # crossings from the device need a decode step's static rows; a CPU worker runs them without capture. A
        # lane needs a mailbox (a host on this machine).
        lane_hosts = frozenset(h for h in range(config.expert_hosts) if config.shm_data_plane(h))
        crossing = config.decode_crossings and config.cold_path != "stream" and remote is not None and lane_hosts
        self.crossings = DeviceCrossings(remote, self.device, config.expert_timeout_s, lane_hosts,
                                         config.decode_crossings_max_rows) \
            if crossing and (config.cuda_graphs or not cuda) else None
        self.trunk = Trunk(model, self.device, dtype, num_blocks, config.kv_block_size,
                           decode_graphs=(config.cuda_graphs and cuda) or self.crossings is not None)
        if self.crossings is not None:
            layers = list(range(model.config.n_layers))
            self.crossings.on_change = lambda: self.trunk.graphs.drop_layers(layers)  # type: ignore[union-attr]
        self.scheduler = Scheduler(KVBlockAllocator(num_blocks, config.kv_block_size),
                                   max_batch_tokens=config.max_batch_tokens, max_running=config.max_running,
                                   prefill_chunk=config.prefill_chunk, max_context=model.config.context_length)
        self.sampler = Sampler()
        self.experts = open_expert_source(model, config, stopping)
        self.hot = HotExperts(self.experts, self.device, dtype)
        if config.soft_slots > 0 and not cuda:
            check_soft_slots_fit(config, slot_nbytes(self.experts, dtype))
        self.pool = SoftPool(self.experts, self.device, dtype, config.soft_slots, config.soft_policy,
                             config.soft_staging) if config.soft_slots > 0 else None
        self._lookups_counted = {"hit": 0, "miss": 0}  # of the pool's tallies, what SOFT_LOOKUPS has been given
        self._streamed_counted = 0  # of the pool's bytes streamed, what STREAMED_BYTES has been given
        self.planner = ColdPlanner(self.experts, config.cold_path, self.pool.measure_bandwidth(),
                                   measure_matmul_flops(self.device, dtype), dtype,
                                   config.threads_for("expert_host", self.device.type == "cuda")
                                   ) if self.pool else None
        if self.device.type == "cuda":
            quantized = {self.experts.layout(layer) for layer in range(model.config.n_layers)
                         if self.experts.format(layer) != "float"}  # e.g. int4 layers and int4+int8 ones (Q6_K down)
            for layout in quantized:
                warm_up_quantized(layout, model.config.n_experts, self.device)
        self.moe: MoEDispatch | None = None
        self.placement_version = 0
        # Called before each layer with cold work (a layer whose experts are all hot in stacks is done in
        # microseconds and skips it) and between layers of a new hot set: a step whose cold experts come
        # off a disk (the first prompt on a cold page cache), or 16 GB of hot experts loaded for a placement, can
        # take many heartbeat timeouts, and the worker must not be declared dead then.
        self.keep_alive: Callable[[], None] = lambda: None
        # Told of each sequence the scheduler admits, before its prompt runs: the coordinator counts a request lost
        # with the worker as resumed only once it has started (EngineStarted), where it may be what crashed it.
        self.on_admitted: Callable[[Sequence], None] = lambda seq: None
        # Code the step calls marks its sections with step_profile.section, the MoE dispatch's included.
        self.profile = StepProfile(config.profile_steps, self._sync_device if self.device.type == "cuda" else None)
        self.update_gauges()  # the cost model's start-up figures, before the first step (0 B/s until then)

    def _sync_device(self) -> None:
        # a crossing layer's device may wait on a host that died: settle answers it with poison past the timeout
        if self.crossings is not None:
            self.crossings.settle()
        torch.cuda.synchronize(self.device)

    def apply(self, placement: Placement) -> None:
        changed = self.hot.apply(placement, self.keep_alive)
        self.moe = MoEDispatch(placement, self.hot, self.remote, self.pool, self.planner,
                               lambda path, n: _dispatched(path).inc(n), lambda: self.keep_alive(), self.crossings)
        if self.crossings is not None:  # a crossing layer's graph posts to the hosts this placement gave it
            changed = list(range(placement.n_layers))
        if self.trunk.graphs is not None:
            self.trunk.graphs.drop_layers(changed)  # they captured the hot stacks this placement replaced
            self.trunk.graphs.drop_moe()  # they read the replaced MoE's buffers
        self.placement_version = placement.version
        HOT_BYTES.set(self.hot.nbytes)

    def step(self) -> tuple[list[tuple[Sequence, object]], list[Sequence]]:
        """Run one batch; returns (sequence, sample) for every sampled token and the finished sequences. A sample
        that is not `valid` (non-finite logits) has ended its sequence with an error, and is not among them.
        Raises FailedAfterSampling for a failure once the tokens are recorded, with both; or once recording them
        has finished some sequences and then failed, with those and their samples."""
        recorded: list[tuple[list[tuple[Sequence, object]], list[Sequence]]] = []
        try:
            self._step(recorded)
        except Exception as e:
            if recorded:
                raise FailedAfterSampling(*recorded[0]) from e
            raise
        return recorded[0]

    def _step(self, recorded: list) -> None:
        """step's work; appends (sampled, finished) to `recorded` once the tokens are in their sequences, so that
        step knows what a later failure would lose."""
        with self.profile.step() as profiled:
            with section("schedule"):
                batch = self.scheduler.schedule()
            if batch is None or batch.num_tokens > len(batch.chunks):
                profiled.discard()  # the profile is of decode steps: one token per sequence
            if batch is None:
                recorded.append(([], []))
                return
            for seq in batch.admitted:
                self.on_admitted(seq)
            start = time.perf_counter()
            if self.remote is not None:
                self.remote.begin_step()
            if self.planner is not None:
                self.planner.begin_step()
            chunks = [Chunk(c.token_ids, c.start, c.seq.block_table) for c in batch.chunks]
            self.moe.begin_step()
            try:
                logits = self.trunk.forward(chunks, self.moe)
            except BaseException:
                self.moe.abandon_step()
                raise
            self.moe.end_step()
            with section("sampling"):
                sampling = [(i, c.seq) for i, c in enumerate(batch.chunks) if c.samples]
                results = self.sampler.sample(logits[[i for i, _ in sampling]], [s for _, s in sampling]) \
                    if sampling else []
            with section("postprocess"):
                sampled = [(seq, r) for (_, seq), r in zip(sampling, results, strict=True)]
                finished: list[Sequence] = []
                try:
                    self.scheduler.postprocess(
                        batch, {seq.request_id: r.token_id if r.valid else None for seq, r in sampled}, finished)
                except Exception:
                    # those it finished before it failed are no longer running: their last tokens go out with the
                    # failure, and the caller fails the rest
                    if finished:
                        done = {id(seq) for seq in finished}
                        recorded.append(([(seq, r) for seq, r in sampled if id(seq) in done], finished))
                    raise
                # after the tokens: were that bookkeeping to fail, these would still be running, and the caller
                # fails them with the rest rather than leaving them unanswered
                for seq, r in sampled:
                    if not r.valid:  # ended here; the caller tells its client why
                        self._end(seq)
                recorded.append((sampled, finished))
            if self.remote is not None:
                self.remote.close_retired()  # the device is done with the step
            STEPS.inc()
            BATCH_TOKENS.observe(batch.num_tokens)
            BATCH_SEQS.set(len(batch.chunks))
            STEP_SECONDS.observe(time.perf_counter() - start)
            self.update_gauges()

    def fail_all_running(self) -> list[Sequence]:
        """After a lost expert host: the running batch's state is unusable, end every admitted request."""
        return self._fail(list(self.scheduler.running))

    def fail_all(self) -> list[Sequence]:
        """A stop that outlasted drain_timeout_s: every request held, waiting or running, ends unfinished."""
        return self._fail([*self.scheduler.waiting, *self.scheduler.running])

    def _fail(self, seqs: list[Sequence]) -> list[Sequence]:
        for seq in seqs:
            self._end(seq)
        try:
            self.update_gauges()
        except Exception:  # the caller answers these requests: a fault in the metrics must not lose them
            logging.getLogger(MEMBER_ID).exception("updating the worker's gauges failed")
        return seqs

    def _end(self, seq: Sequence) -> None:
        """End a request with an error, which the caller sends. Freeing its KV blocks may fail (a bookkeeping fault,
        which then fails again each time): it leaves the scheduler all the same, and the caller still answers it and
        the requests after it."""
        try:
            self.scheduler.cancel(seq.request_id, reason="error")
        except Exception:
            logging.getLogger(MEMBER_ID).exception("ending request %s failed; its KV blocks may be lost",
                                                   seq.request_id)

    def update_gauges(self) -> None:
        if not self.scheduler.has_work():  # else the last step's batch stayed on the dashboard while idle
            BATCH_SEQS.set(0)
        RUNNING.set(self.scheduler.num_running)
        WAITING.set(self.scheduler.num_waiting)
        KV_USED.set(self.scheduler.kv_blocks_used / self.scheduler.kv_blocks_total)
        if self.pool is not None:
            tier = self.pool.tier
            SOFT_HIT_RATE.set(tier.hit_rate)
            for result, tally in (("hit", tier.hits), ("miss", tier.misses)):
                SOFT_LOOKUPS.labels(result).inc(tally - self._lookups_counted[result])
                self._lookups_counted[result] = tally
            STREAMED_BYTES.inc(self.pool.bytes_streamed - self._streamed_counted)
            self._streamed_counted = self.pool.bytes_streamed
        if self.planner is not None:
            cost = self.planner.constants
            COST_PCIE.set(cost.pcie_bw)
            for fmt, rate in cost.cpu_read_bw.items():
                COST_CPU_READ.labels(fmt).set(rate)
            COST_CPU_FLOPS.set(cost.cpu_flops)
            COST_ROUND_TRIP.set(cost.round_trip_s)

    def load(self) -> dict:
        """What the heartbeat reports, and the coordinator's stats show: with profiling on, the last window."""
        load = {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "kv_used": self.scheduler.kv_blocks_used / self.scheduler.kv_blocks_total}
        if self.profile.latest is not None:
            load["profile"] = self.profile.latest.to_dict()
        return load


def check_trunk_and_kv_cache_fit(config: Config, model: GGUFModel, dtype: torch.dtype) -> None:
    """A worker on the CPU keeps its dense trunk (in its dtype) and its KV cache in RAM: refuse the two where they
    do not fit in what is free, less host_memory_floor, rather than die allocating them or be OOM-killed writing
    the cache's zeros. (The trunk went uncounted: a large vocabulary's took the worker below the floor, and the
    refusal came later, naming its hot experts.)"""
    shape = kv_cache_shape(model.config, config.kv_cache_blocks, config.kv_block_size)
    kv = math.prod(shape) * dtype.itemsize
    trunk = model.dense_elements() * dtype.itemsize
    room, floor = room_above_floor(config.host_memory_floor)
    if kv + trunk <= room:
        return
    available = f"{size_text(room)} is available after the {size_text(floor)} host_memory_floor"
    if trunk >= room:
        raise HostMemoryError(f"the model's dense trunk needs {size_text(trunk)} of RAM in {dtype}; {available}: "
                              f"lower host_memory_floor, or free memory")
    per_token = kv // shape[2]
    fit = (room - trunk) // per_token // config.kv_block_size * config.kv_block_size
    raise HostMemoryError(f"the KV cache needs {size_text(kv)} of RAM for kv_cache_tokens = {config.kv_cache_tokens} "
                          f"({per_token:,} bytes a token), beside the dense trunk's {size_text(trunk)}; {available}: "
                          f"at most {fit:,} tokens fit; lower kv_cache_tokens")


def check_soft_slots_fit(config: Config, slot_bytes: int) -> None:
    """A worker on the CPU keeps its soft slots in RAM, filled as experts stream in: refuse slots that would not
    fit in what is free, less host_memory_floor (they were allocated unchecked and grew below it)."""
    slots = config.soft_slots + config.soft_staging
    need = slots * slot_bytes
    room, floor = room_above_floor(config.host_memory_floor)
    if need <= room:
        return
    raise HostMemoryError(f"its {slots} soft slots (soft_slots + soft_staging) need {size_text(need)} "
                          f"of RAM on the CPU; {size_text(room)} is available after the {size_text(floor)} "
                          f"host_memory_floor: lower soft_slots and soft_staging, or host_memory_floor")


class DeviceMemoryError(ValueError):
    """What the worker was asked to hold does not fit in the GPU's free memory; the message says what would."""


def check_hot_experts_fit(engine: Engine, placement: Placement) -> None:
    """Refuse a placement whose hot experts do not fit, rather than die allocating them: on a GPU in its free memory
    (what the driver has free and what torch's allocator keeps cached), on the CPU, whose worker copies its hot
    float experts into RAM, in what is free less host_memory_floor, lest it be OOM-killed. The KV cache is already
    allocated and written by now, so what is free no longer counts it."""
    need = engine.hot.added_nbytes(placement)
    if need == 0:  # nothing to add: nothing to lower (a start below the floor is refused earlier)
        return
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        room = free + torch.cuda.memory_reserved(engine.device) - torch.cuda.memory_allocated(engine.device)
        if need > room:
            raise DeviceMemoryError(f"its hot experts need {size_text(need)} more of GPU memory "
                                    f"({placement.count_hot()} experts); {size_text(room)} is free on "
                                    f"{engine.device}: lower gpu_expert_budget or hot_experts (the coordinator's)")
        return
    room, floor = room_above_floor(engine.config.host_memory_floor)
    if need > room:
        raise HostMemoryError(f"its hot experts need {size_text(need)} of RAM ({placement.count_hot()} experts); "
                              f"{size_text(room)} is available after the {size_text(floor)} host_memory_floor; lower "
                              f"gpu_expert_budget or hot_experts (the coordinator's), or host_memory_floor")


def to_sequence(msg: EngineGenerate) -> Sequence:
    params = SamplingParams(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                            top_k=msg.top_k, seed=msg.seed, logprobs=msg.logprobs,
                            stop_token_ids=frozenset(msg.stop_token_ids), output_offset=msg.output_offset)
    return Sequence(msg.request_id, list(msg.prompt_token_ids), params)


def serve(config: Config) -> int:
    log = setup_process(MEMBER_ID, "gpu_worker", config)
    if config.device == "cuda" and not torch.cuda.is_available():  # else torch's assertion, deep in the model's set-up
        log.error("cannot start: device = cuda, and torch finds no CUDA device here (torch %s, built for CUDA %s): "
                  "set device = auto or cpu, or install a torch with CUDA", torch.__version__, torch.version.cuda)
        return 1
    stop = StopFlag()
    metrics_port = open_metrics(config, log, "gpu_worker")
    model = open_model(config, log)
    if metrics_port is None or model is None:
        return 1
    ctx = zmq.Context()
    engine_socket = ctx.socket(zmq.DEALER)
    engine_socket.setsockopt(zmq.ROUTING_ID, MEMBER_ID.encode())
    engine_socket.setsockopt(zmq.LINGER, 0)
    control = ControlLink(ctx, config, MEMBER_ID, "gpu_worker", metrics_port, model.identity, stop)
    remote = RemoteExperts(ctx, config.expert_host_endpoints, config.expert_timeout_s) if config.expert_hosts \
        else None

    def send(msg: Message) -> None:
        frames = encode(msg)
        while control.superseded is None:
            try:
                engine_socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                # Nothing takes it: the coordinator is away, or a worker started later under this id took the engine
                # connection over, and nothing this one sends is read again. Blocked here it fell silent for good;
                # heartbeating, it hears that it was superseded. (A placement read here comes again with the reply to
                # the next heartbeat, which still reports the one held.) A stop past its drain waits for no one.
                if stop.stopped_for(config.drain_timeout_s):
                    return
                engine_socket.poll(int(KEEP_ALIVE_S * 1000), zmq.POLLOUT)
                engine.keep_alive()
                control.read_placement()

    try:
        try:
            engine = Engine(config, model, remote, lambda: stop.stopping)
        except (HostMemoryError, ModelError, OSError) as e:  # e.g. no room for the KV cache or the expert cache
            log.error("cannot start: %s", e)
            return 1
        except torch.OutOfMemoryError as e:
            log.error("cannot start: the GPU ran out of memory for the dense trunk, the KV cache or the soft slots "
                      "(%s); lower kv_cache_tokens or soft_slots", str(e).splitlines()[0])
            return 1
        except ConversionStopped as e:
            log.info("told to stop while converting the expert cache (%s): it converts at the next start", e)
            return stop.exit_status
        log.info("model %s on %s, metrics on :%d", config.model, engine.device, metrics_port)
        if engine.planner is not None:
            log.info("cold path %s; cost model at start-up: %s", config.cold_path,
                     engine.planner.live.current.describe())
        if engine.profile.on:
            log.info("profiling decode steps in windows of %d (tierserve stats shows the last)", config.profile_steps)
        placement = control.wait_for_placement()
        if placement is None:
            return stop.exit_status
        # Only now, as the member: the coordinator hands the engine connection to the newest under this identity, and
        # a second worker that connected as it started took it from a running one (for the minutes a large model
        # loads, or for good if it then failed to start) while that one still heartbeated and looked ready.
        engine_socket.connect(config.engine_endpoint)
        engine.keep_alive = lambda: control.heartbeat_if_due(engine.placement_version, engine.load())
        if remote is not None:
            remote.keep_alive = engine.keep_alive
        engine.on_admitted = lambda seq: send(EngineStarted(request_id=seq.request_id))
        if not hold(engine, placement, log):
            return 1
        log.info("placement v%d: %d hot experts (%.1f MB)", placement.version, placement.count_hot(),
                 engine.hot.nbytes / 1e6)
        while True:
            control.heartbeat_if_due(engine.placement_version, engine.load())
            placement = control.read_placement()
            if placement is not None and placement.version != engine.placement_version:
                if not hold(engine, placement, log):
                    return 1
                log.info("placement v%d applied", placement.version)
            busy = engine.scheduler.has_work()
            if busy and control.superseded is None and stop.stopped_for(config.drain_timeout_s):
                unfinished = engine.fail_all()
                log.warning("stopping: drain_timeout_s (%g s) is over, %d requests end unfinished",
                            config.drain_timeout_s, len(unfinished))
                for seq in unfinished:  # resumed on a successor (counted as resumed if it had started: EngineStarted)
                    code = "unavailable" if seq.num_computed else "shutting_down"
                    send(EngineError(request_id=seq.request_id, code=code, member_id=MEMBER_ID,
                                     message="the worker stopped before the request finished (drain_timeout_s)"))
                busy = False
            # a superseded worker's requests were resumed on its successor: what it generates would reach no one
            if stop.stopping and (not busy or control.superseded is not None):
                break
            if engine_socket.poll(0 if busy else 50):
                while engine_socket.poll(0):
                    handle_engine_message(engine, engine_socket.recv_multipart(copy=False), send, stop, log)
            if not engine.scheduler.has_work():
                continue
            try:
                sampled, _ = engine.step()
            except FailedAfterSampling as e:  # its tokens first: they were sampled, and some ended their requests
                send_samples(e.sampled, send, log)
                fail_running(engine, e.__cause__, send, log)
                continue
            except Exception as e:
                fail_running(engine, e, send, log)
                continue
            send_samples(sampled, send, log)
    finally:
        if remote is not None:
            remote.close()
        engine_socket.close(linger=0)
        control.socket.close(linger=0)
        ctx.term()
        # a host killed outright could not remove its own
        for stale in remove_stale_mailboxes(config.expert_host_endpoints):
            log.info("removed %s: its host is gone", stale)
        log.info("stopped")
    return stop.exit_status


def send_samples(sampled: list[tuple[Sequence, object]], send: Callable[[Message], None], log: logging.Logger
                 ) -> None:
    """Each sampled token to its client, with the finish reason where it ended the request; an error for a request
    ended by non-finite logits."""
    for seq, r in sampled:
        if not r.valid:
            log.error("request %s ended: non-finite logits", seq.request_id)
            send(EngineError(request_id=seq.request_id, code="internal_error",
                             message="the model's logits were not finite (NaN or inf): a weight in the model "
                                     "file, or an activation, is out of range"))
            continue
        send(EngineToken(request_id=seq.request_id, token_id=r.token_id, logprob=r.logprob,
                         top_logprobs=[list(p) for p in r.top_logprobs],
                         finish_reason=seq.finish_reason if seq.is_finished else None))


def fail_running(engine: Engine, error: BaseException, send: Callable[[Message], None], log: logging.Logger) -> None:
    """After a failed step: every running request ends with an error naming why. A lost expert host names it; a bug
    costs the batch in flight, not every request the worker holds."""
    if isinstance(error, ExpertHostError):
        log.error("%s; failing the running requests", error)
        for seq in engine.fail_all_running():
            send(EngineError(request_id=seq.request_id, code="expert_host_unavailable", message=str(error),
                             member_id=expert_host_id(error.host) if error.host >= 0 else ""))
        return
    log.error("model step failed; failing the running requests", exc_info=error)
    for seq in engine.fail_all_running():
        send(EngineError(request_id=seq.request_id, code="internal_error", message=repr(error)))


def hold(engine: Engine, placement: Placement, log: logging.Logger) -> bool:
    """Apply the placement; False, said in the log, when its experts cannot be held: a damaged expert cache, hosts
    this worker has no socket to (a coordinator started with more expert_hosts than this worker), or hot experts
    beyond the GPU's free memory, or on the CPU the RAM free."""
    beyond = [h for h in placement.hosts_in_use() if h >= engine.config.expert_hosts]
    if beyond:
        log.error("cannot hold placement v%d: it gives experts to expert host %d, and this worker was started with "
                  "expert_hosts = %d; start every role with the same configuration", placement.version, beyond[0],
                  engine.config.expert_hosts)
        return False
    try:
        check_hot_experts_fit(engine, placement)
        engine.apply(placement)
    except (CacheError, HostMemoryError, DeviceMemoryError) as e:
        log.error("cannot hold placement v%d: %s", placement.version, e)
        return False
    except torch.OutOfMemoryError as e:  # fragmentation, or another process's allocations since the check
        log.error("cannot hold placement v%d: the GPU ran out of memory loading its hot experts (%s); lower "
                  "gpu_expert_budget or hot_experts (the coordinator's)", placement.version, str(e).splitlines()[0])
        return False
    return True


def handle_engine_message(engine: Engine, frames: list, send: Callable[[Message], None], stop: StopFlag,
                          log: logging.Logger) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as e:
        log.warning("dropping bad engine message: %s", e.message)
        return
    if isinstance(msg, EngineGenerate):
        if stop.stopping:
            send(EngineError(request_id=msg.request_id, code="shutting_down", message="the worker is shutting down",
                             member_id=MEMBER_ID))
            return
        seq = to_sequence(msg)
        if (refusal := engine.scheduler.never_fits(seq)) is not None:
            send(EngineError(request_id=msg.request_id, code=refusal.code, message=refusal.message))
            return
        engine.scheduler.add(seq)
        engine.update_gauges()
    elif isinstance(msg, EngineCancel):
        seq = engine.scheduler.cancel(msg.request_id)
        if seq is not None:
            engine.update_gauges()
            send(EngineFinished(request_id=msg.request_id, finish_reason="cancelled"))
    else:
        log.warning("dropping unexpected %s on the engine socket", msg.KIND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve gpu-worker")
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    try:
        return serve(config)
    finally:
        leave_run_dir(config)
