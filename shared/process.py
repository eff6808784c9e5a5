"""What every role process does the same way: logging, threads, stop signals, and its control link
to the coordinator (heartbeats that double as join, placements that come back)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import torch
import zmq

from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.metrics import start_metrics_server
from shared.model_config import ModelError
from shared.placement import Placement
from shared.protocol import Heartbeat, ProtocolError, Superseded, Welcome, decode, encode

# sysexits' EX_CONFIG: the exit status of a process another one, started under the same member id, took over from.
# A restart would only take the id back and stop the other in turn, so the units (RestartPreventExitStatus) and
# `tierserve up` leave it stopped.
SUPERSEDED_EXIT_STATUS = 78


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
    torch.set_num_threads(config.threads_for(role, role != "coordinator" and worker_device(config).type == "cuda"))
    return logging.getLogger(member_id)


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a live process of another user that took the pid over counts).
    Not a pid at all (0 or less would signal a process group; a huge number, read from a corrupt file, overflows
    the call) is no process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    return True


# struct flock as 64-bit Linux lays it out: type, whence, start, length (0: to the end, however the file grows),
# pid (0, as open file description locks require), padding
_FLOCK = struct.Struct("hhqqi4x")


def hold_while_open(fd: int) -> None:
    """Mark the file open at `fd` as in use until this open file is closed in every process that has it, however
    they end: `remove_files_of_dead_processes` leaves it alone whatever pid it records. An open file description
    lock, not flock: a mailbox's worker flocks the mailbox to keep other workers out, and the two kinds never
    conflict. Waits out a sweep that has the file locked this moment (it unlinks the file if it looked abandoned)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def remove_files_of_dead_processes(directory: str, prefix: str, owner_of: Callable[[str], int | None]) -> list[str]:
    """Remove this user's files in `directory` whose names begin with `prefix` and whose process is gone: a
    process killed outright cannot remove its own. `owner_of(path)` is the pid of the process a file belongs to,
    0 for one that names none (it cannot be alive), or None to keep the file. A file its owner holds
    (`hold_while_open`) is kept whatever the pid: that is the owner's in the owner's PID namespace, and a live owner
    in another container sharing `directory` may record one that no process has here. The paths removed."""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue  # another user's are theirs to remove (/dev/shm is sticky)
            owner = owner_of(path)
            if owner is not None and (owner == 0 or not pid_alive(owner)) and _unlink_unless_held(path):
                removed.append(path)
        except OSError:
            continue  # gone meanwhile (another process cleaned it first), or not ours to remove
    return removed


def _unlink_unless_held(path: str) -> bool:
    """Unlink `path` unless its owner holds it; whether it did. The lock is kept until the name is gone, so an owner
    that made the file a moment ago, and is about to take its own, finds it already unlinked."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
        except BlockingIOError:
            return False
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            return False  # another file took the name since it was opened: a restarted owner's, renamed into place
        os.unlink(path)
        return True
    finally:
        os.close(fd)


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
        this one's member id over stops this one, with SUPERSEDED_EXIT_STATUS."""
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
EPHEMERAL_MARKER = ".ephemeral"


def leave_run_dir(config: Config, *endpoints: str) -> None:
    """Remove this process's socket files; if `tierserve up` died and left a private run dir, the last
    process out removes it too."""
    for endpoint in endpoints:
        remove_ipc_file(endpoint)
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


def listened_on(endpoint: str) -> bool:
    """Whether a process accepts connections on an ipc:// endpoint's socket file (a live one, or one stopped)."""
    if not endpoint.startswith("ipc://"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a stopped listener whose backlog is full never accepts
        try:
            probe.connect(endpoint[len("ipc://"):])
        except OSError:  # refused (nothing listens), no such file, or that timeout
            return False
    return True


def remove_ipc_file(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint[len("ipc://"):])
        except FileNotFoundError:
            pass
