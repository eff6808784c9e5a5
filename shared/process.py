"""What every role process does the same way: logging, threads, stop signals, its control link to the
coordinator (heartbeats that double as join, placements that come back), and its exit."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

import torch
import zmq

from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.metrics import start_metrics_server
from shared.model_config import ModelError
from shared.placement import Placement
from shared.protocol import Heartbeat, ProtocolError, Refused, Superseded, Welcome, decode, encode
from shared.run_files import EPHEMERAL_MARKER, SUPERSEDED_EXIT_STATUS


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (a measurement made with some process's count), then
    back to what they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_device(config: Config) -> torch.device:
    """Where the gpu_worker computes: what every process of the machine can tell alike (the threads depend on it)."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def worker_dtype(config: Config, device: torch.device) -> torch.dtype:
    """The gpu_worker's dtype on `device`: of its trunk, and of the float experts it holds."""
    if config.dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, config.dtype)


def setup_process(member_id: str, role: str, config: Config) -> logging.Logger:
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s {member_id}[%(process)d] %(levelname)s %(message)s")
    os.makedirs(config.run_dir, mode=0o700, exist_ok=True)  # whichever process starts first makes it
    log = logging.getLogger(member_id)
    threads = config.threads_for(role, role != "coordinator" and worker_device(config).type == "cuda")
    if config.asked_threads(role) > threads:
        log.warning("threads / host_threads ask for %d torch threads: using %d, the CPUs this process may run on",
                    config.asked_threads(role), threads)
    torch.set_num_threads(threads)
    return log


def exit_now(status: int) -> NoReturn:
    """End a role process whose main returned: its sockets are closed, its files removed and its last line logged,
    so only the interpreter's teardown is left, which with torch loaded took about half a second. A stopping
    system waits that out three times over (the coordinator, then the worker, then the hosts), and so does every
    restart. A main that raised ends as usual instead, with its traceback."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a pipe no one reads: the status still counts
            stream.flush()
    os._exit(status)


def open_model(config: Config, log: logging.Logger) -> GGUFModel | None:
    """The configured model, or None after logging why it cannot be served (the process then exits 1)."""
    try:
        return GGUFModel(config.model)
    except ModelError as e:
        log.error("cannot start: %s", e)
        return None


def open_metrics(config: Config, log: logging.Logger, role: str, host: int = 0) -> int | None:
    """This process's /metrics port, or None after logging why it cannot be served (the process then exits 1)."""
    try:
        return start_metrics_server(config.metrics_host, config.metrics_port_for(role, host))
    except OSError as e:
        log.error("cannot start: %s", e)
        return None


class StopFlag:
    """Set by SIGTERM or SIGINT, or by `stop`: the process drains, then exits with `exit_status`."""

    def __init__(self) -> None:
        self.stopping = False
        self.exit_status = 0
        self.since = 0.0  # time.monotonic() of the first stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.stop(self.exit_status)

    def stop(self, exit_status: int) -> None:
        if not self.stopping:
            self.since = time.monotonic()
        self.stopping, self.exit_status = True, exit_status

    def stopped_for(self, seconds: float) -> bool:
        """Whether the process has been stopping for at least `seconds`."""
        return self.stopping and time.monotonic() - self.since >= seconds


class ControlLink:
    """A DEALER to the coordinator's control socket. It has no name of its own (the coordinator answers each
    connection): named by member id, a second process started under the id took the name over, and the first
    heartbeated on unheard, never to learn of it."""

    def __init__(self, ctx: zmq.Context, config: Config, member_id: str, role: str, metrics_port: int,
                 model: str, stop: StopFlag) -> None:
        self.config, self.member_id, self.role, self.metrics_port = config, member_id, role, metrics_port
        self.model = model  # the identity of the model file this process serves
        self.stop = stop
        self.incarnation = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.superseded: Superseded | None = None  # the coordinator's word that another process took the id over
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.socket.connect(config.control_endpoint)
        self._next_beat = 0.0

    def heartbeat_if_due(self, placement_version: int, load: dict | None = None) -> None:
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.config.heartbeat_interval_s
        msg = Heartbeat(member_id=self.member_id, role=self.role, incarnation=self.incarnation, pid=os.getpid(),
                        host=self.host, metrics_port=self.metrics_port, placement_version=placement_version,
                        model=self.model, load=load or {})
        try:
            self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # coordinator away; the next beat will try again

    def read_placement(self) -> Placement | None:
        """The newest placement waiting on the socket, if any (non-blocking). Word that another process took
        this one's member id over, or that this one is no member of the coordinator's system, stops this one, with
        SUPERSEDED_EXIT_STATUS."""
        newest = None
        log = logging.getLogger(self.role)
        while self.socket.poll(0):
            try:
                msg = decode(self.socket.recv_multipart())
            except ProtocolError as e:
                log.warning("bad control message: %s", e.message)
                continue
            if isinstance(msg, Welcome):
                newest = Placement.from_dict(msg.placement)
            elif isinstance(msg, Refused) and not self.stop.stopping:
                log.error("the coordinator refuses this process: %s. Give every role the same configuration",
                          msg.reason)
                self.stop.stop(SUPERSEDED_EXIT_STATUS)
            elif isinstance(msg, Superseded) and self.superseded is None:
                self.superseded = msg
                log.error("%s was started twice: the coordinator now serves it with pid %d on %s; this process "
                          "(pid %d on %s) stops. Start each member id once", msg.member_id, msg.pid, msg.host,
                          os.getpid(), self.host)
                self.stop.stop(SUPERSEDED_EXIT_STATUS)
        return newest

    def wait_for_placement(self, placement_version: int = 0) -> Placement | None:
        while not self.stop.stopping:
            self.heartbeat_if_due(placement_version)
            if self.socket.poll(100):
                placement = self.read_placement()
                if placement is not None:
                    return placement
        return None


_PARENT = os.getppid()


def leave_run_dir(config: Config) -> None:
    """If `tierserve up` died and left a private run dir, the last process out removes it. A role's main calls
    this however it ends, once its serve has removed its own socket files."""
    run_dir = config.run_dir
    if os.getppid() == _PARENT or not os.path.exists(os.path.join(run_dir, EPHEMERAL_MARKER)):
        return
    try:
        if set(os.listdir(run_dir)) <= {EPHEMERAL_MARKER, "config.toml"}:
            for name in (EPHEMERAL_MARKER, "config.toml"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(run_dir, name))
            os.rmdir(run_dir)
    except OSError:
        pass  # another process got there first or is still inside
