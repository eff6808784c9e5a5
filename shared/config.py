"""The one configuration object of every tierserve process: loaded from a TOML file, overridden on the CLI.

Every role reads the same file, so `tierserve up` writes one and systemd units point at one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tempfile
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
# What ZeroMQ's bind and connect take: a TCP port (or * for any) after a host (not an IPv6 address, which needs a
# socket option tierserve does not set), and an ipc socket file's path, which a Unix socket address holds up to 107
# bytes of. libzmq reads the port with atoi and refuses a 0 not written "0" ("00"), as a bad one.
_TCP_ENDPOINT = re.compile(r"^tcp://[^\s/\[\]:]+:(\*|[0-9]{1,5})$")
IPC_PATH_BYTES = 107
# ZeroMQ's frame size limit is an int64, and the coordinator reads frames up to 16 times max_request_bytes (to answer
# them as too large): far above any request, and far below the overflow
MAX_REQUEST_BYTES = 1 << 40
HOST_MEMORY_KINDS = ("mapped", "pinned")
COLD_PATHS = ("auto", "cpu", "stream")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # any case; logging's aliases (WARN, NOTSET) are not
SOFT_POLICIES = ("decayed-lfu", "lru")


def parse_bytes(text: str | int) -> int:
    """'16GB', '512M', '4GiB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    try:
        number = float(m.group(1)) if m else None
    except ValueError:  # "1.5.3GB"
        number = None
    if number is None:
        raise ValueError(f"not a size: {text!r} (examples: 16GB, 512MiB, 1000000)")
    _, unit, suffix = m.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    base = 1024 if suffix and suffix.lower() == "ib" else 1000
    if not math.isfinite(number * base**power):  # 400 digits: int(inf) raised an OverflowError
        raise ValueError(f"not a size: {text!r} is too large")
    return int(number * base**power)


def bytes_argument(text: str) -> int:
    """An argparse type: a size (parse_bytes), its message as the option's error."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """An argparse type: a count of something that must be at least one."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def check_endpoint(endpoint: Any, what: str) -> str:
    """`endpoint`, if ZeroMQ can take it for a client endpoint (`what` names it in the error): a port past 65535 was
    taken modulo 65536 (a server listened, or a client connected, on a port nobody named), and a missing one ended
    in a traceback."""
    tcp = _TCP_ENDPOINT.match(endpoint) if isinstance(endpoint, str) else None
    port = tcp.group(1) if tcp else ""
    if not (port == "*" or port and (port == "0" or 0 < int(port) <= 65535) or
            isinstance(endpoint, str) and endpoint.startswith("ipc://") and len(endpoint) > len("ipc://")):
        raise ValueError(f"{what} must be tcp://HOST:PORT (HOST not an IPv6 address, PORT 0-65535 or *) or "
                         f"ipc://PATH, not {endpoint!r}")
    return endpoint


def parse_percent(text: str) -> float:
    """'10%' or '10' -> 10.0: a share in percent, 0..100."""
    try:
        percent = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"not a percentage: {text!r} (example: 10%)") from None
    if not 0 <= percent <= 100:  # NaN too
        raise ValueError(f"a percentage must be in 0..100, not {text!r}")
    return percent


def parse_bytes_or_percent(text: str | int) -> tuple[int, float]:
    """'2GiB' -> (2147483648, 0.0); '10%' -> (0, 0.1): an absolute size or a share of something."""
    if isinstance(text, str) and text.strip().endswith("%"):
        return 0, parse_percent(text) / 100
    return parse_bytes(text), 0.0


def default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return str(Path(base) / f"tierserve-{os.getuid()}")


WORKER_GPU_THREADS = 2  # torch threads of a worker that computes on a GPU: its CPU work is Python and copies


# The least value of each numeric setting: below it a process would fail later (a zero block size divides by zero,
# a negative thread count is refused by torch) or behave as no setting means
_LOWEST: dict[str, float] = {
    "expert_hosts": 0, "hot_experts": -1, "gpu_expert_budget": 0, "soft_slots": 0, "soft_staging": 0,
    "kv_cache_tokens": 1, "kv_block_size": 1, "max_batch_tokens": 1, "prefill_chunk": 1, "max_running": 1,
    "max_waiting": 0, "max_request_bytes": 1, "expert_timeout_s": 1e-3, "mailbox_bytes": 0, "drain_timeout_s": 0,
    "resume_timeout_s": 0, "decode_crossings_max_rows": 1, "metrics_port": 0, "threads": 0, "host_threads": 0,
    "profile_steps": 0,
}


@dataclass
class Config:
    model: str = ""
    run_dir: str = ""  # ipc sockets live here (mode 0700); default under $XDG_RUNTIME_DIR or /tmp
    client_endpoint: str = "tcp://127.0.0.1:5555"
    expert_hosts: int = 2
    hot_experts: int = -1  # experts per layer kept on the gpu_worker; -1: as many as gpu_expert_budget allows
    gpu_expert_budget: int = 0  # bytes of VRAM (or worker RAM without a GPU) for hot experts
    device: str = "auto"  # auto | cpu | cuda
    soft_slots: int = 0  # VRAM slots that cold experts are streamed into; 0: no streaming
    soft_policy: str = "decayed-lfu"  # which expert keeps a slot: decayed-lfu | lru
    # VRAM slots beside the soft tier's for cold experts streamed for one step only: those the cost model sends
    # over PCIe but the tier's policy does not keep (a prompt's many experts), computed in passes of this many
    soft_staging: int = 16
    cold_path: str = "auto"  # auto (cost model splits each layer) | cpu | stream
    dtype: str = "auto"  # trunk and hot experts: auto (float32 on the CPU, bfloat16 on a GPU) | float32 | bfloat16
    kv_cache_tokens: int = 16384
    kv_block_size: int = 16
    # A long prompt's chunk costs about one pass of the cold experts it uses over PCIe, whatever its length, so
    # prefill wants long chunks; a decode step waits for the prefill chunk batched with it.
    max_batch_tokens: int = 4096
    prefill_chunk: int = 4096
    max_running: int = 32
    max_waiting: int = 256  # requests queued beyond this are refused as overloaded
    max_request_bytes: int = 1 << 20
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0
    expert_timeout_s: float = 10.0
    data_plane: str = "auto"  # worker <-> hosts: auto (shared memory to hosts on ipc endpoints) | zmq | shm
    mailbox_bytes: int = 0  # payload bytes each way per mailbox; 0: max_batch_tokens x top-k rows of fp32, <= 64 MiB
    drain_timeout_s: float = 30.0
    # Requests in flight when the gpu worker or an expert host is lost wait this long for its successor and then
    # continue from the tokens they have streamed (a request at most twice); 0: they fail when it is lost.
    resume_timeout_s: float = 60.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400  # coordinator; gpu_worker +1, expert host i +2+i; 0 picks free ports
    threads: int = 0  # torch threads per process; 0: cores shared evenly among the processes
    # Where an expert host keeps its experts: mapped | pinned, or a comma-separated list giving host i the i-th
    # kind (the last kind for the hosts beyond the list).
    host_memory: str = "mapped"
    host_memory_floor: str = "2GiB"  # RAM an expert host or a CPU worker leaves free: a size or a % of MemTotal
    host_threads: int = 0  # torch threads of each expert host; 0: `threads` if set, else an even share of the cores
    # Each expert host binds its threads one per logical CPU, on CPUs no other host takes (host_cores). Off: on the
    # H200 machine's 16-vCPU VM, whose core layout the guest is not told, 8 threads bound in order by the OpenMP
    # runtime (OMP_PROC_BIND=close) were 13-15% faster than unbound in one run, 8 bound so by this setting's
    # mechanism 4-7% slower in another, and end to end it changed nothing that the order of two runs did not
    # (bench/cpu_kernels.md).
    pin_host_threads: bool = False
    # Where block-quantized experts, converted once into their serving format, are cached: "" is next to the
    # model if that directory is writable, else $XDG_CACHE_HOME/tierserve/experts.
    expert_cache_dir: str = ""
    # The gpu_worker times the sections of its decode steps in windows of this many steps (0: off); the last
    # window's per-section times are in its heartbeat load, so `tierserve stats` shows them. On a GPU it slows
    # every step.
    profile_steps: int = 0
    # On a GPU, decode steps run each layer's attention and router as one CUDA graph replay (captured the first
    # time a batch and context size needs it) instead of launching their kernels one by one.
    cuda_graphs: bool = True
    # Decode steps cross to the expert hosts from the device itself, through their shared-memory mailboxes'
    # lanes: each layer's cold experts all go to their hosts' CPUs (none is streamed), and a layer is one graph
    # replay with no Python between layers (gpu_worker/crossing.py). Needs hosts on this machine with mailboxes;
    # layers it cannot serve so take the usual path. On a CPU worker the same exchange runs without graphs. Not with
    # cold_path = "stream", which asks for the cold experts in VRAM. On by default: one q4_0 Qwen3-30B-A3B stream on
    # an H200 decoded 1.6-2.9x faster with it (bench/README.md).
    decode_crossings: bool = True
    # Decode steps of more rows than this take the usual path: every cold expert a batch routes to is computed on
    # the hosts' CPUs when it crosses, where the usual path streams some over PCIe. On the H200 with the q4_0
    # Qwen3-30B-A3B preset, crossing steps gained 1.6-1.7x at 1 and 4 concurrent streams and lost 2.6x at 16.
    decode_crossings_max_rows: int = 4
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        # whether run_dir was chosen: `up` makes a private one of its own otherwise, and its default path, given
        # explicitly, is a choice (roles started by hand share it)
        self.run_dir_chosen = bool(self.run_dir)
        if not self.run_dir:
            self.run_dir = default_run_dir()
        for key, hint in _HINTS.items():  # NaN passes every comparison below, and a timeout of inf never ends
            if hint is float and not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key} must be a finite number, not {getattr(self, key)}")
        self._check_endpoints()
        for key, low in _LOWEST.items():
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, not {getattr(self, key)}")
        if self.max_request_bytes > MAX_REQUEST_BYTES:
            raise ValueError(f"max_request_bytes must be <= {MAX_REQUEST_BYTES} (1 TiB), not {self.max_request_bytes}")
        if self.metrics_port > 65535:
            raise ValueError(f"metrics_port must be a TCP port (<= 65535), not {self.metrics_port}")
        # the other roles serve on the ports above it, the last expert host (or a worker without hosts) highest
        last_host = self.expert_hosts - 1
        last_port = self.metrics_port_for("expert_host", last_host) if self.expert_hosts else \
            self.metrics_port_for("gpu_worker")
        if last_port > 65535:
            whose = f"expert host {last_host}" if self.expert_hosts else "the gpu worker"
            raise ValueError(f"metrics_port {self.metrics_port} leaves {whose} no TCP port ({last_port}): the gpu "
                             f"worker serves its metrics at metrics_port + 1 and expert host i at metrics_port + 2 + i")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be above heartbeat_interval_s "
                             f"({self.heartbeat_interval_s}), which must be above 0: a member is lost when no "
                             f"heartbeat came for heartbeat_timeout_s")
        if self.max_running > self.max_batch_tokens:
            raise ValueError(f"max_running ({self.max_running}) must not be above max_batch_tokens "
                             f"({self.max_batch_tokens}): each step decodes one token of every running request")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if self.data_plane not in ("auto", "zmq", "shm"):
            raise ValueError(f"data_plane must be auto, zmq or shm, not {self.data_plane!r}")
        if self.cold_path not in COLD_PATHS:
            raise ValueError(f"cold_path must be one of {', '.join(COLD_PATHS)}, not {self.cold_path!r}")
        if self.soft_policy not in SOFT_POLICIES:
            raise ValueError(f"soft_policy must be one of {', '.join(SOFT_POLICIES)}, not {self.soft_policy!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        for kind in self.host_memory.split(","):
            if kind.strip() not in HOST_MEMORY_KINDS:
                raise ValueError(f"host_memory must be one of {', '.join(HOST_MEMORY_KINDS)} (or a comma-separated "
                                 f"list of them, one per expert host), not {self.host_memory!r}")
        try:
            parse_bytes_or_percent(self.host_memory_floor)
        except ValueError as e:
            raise ValueError(f"host_memory_floor: {e}") from None

    def _check_endpoints(self) -> None:
        """Refuse endpoints ZeroMQ would (check_endpoint); a run dir too long for a socket file's path ended in a
        traceback."""
        endpoint = check_endpoint(self.client_endpoint, "client_endpoint")
        longest = [endpoint] if endpoint.startswith("ipc://") else []
        longest += [self.control_endpoint, self.engine_endpoint, *self.expert_host_endpoints[-1:]]
        for ipc in longest:
            if len(os.fsencode(ipc.removeprefix("ipc://"))) > IPC_PATH_BYTES:
                what = "client_endpoint" if ipc == endpoint else f"run_dir {self.run_dir}"
                raise ValueError(f"{what} is too long for a socket file: {ipc.removeprefix('ipc://')} is over "
                                 f"{IPC_PATH_BYTES} bytes, the most a Unix socket's path holds")

    def ipc(self, name: str) -> str:
        return f"ipc://{self.run_dir}/{name}.sock"

    @property
    def control_endpoint(self) -> str:
        return self.ipc("control")

    @property
    def engine_endpoint(self) -> str:
        return self.ipc("engine")

    @property
    def client_connect_endpoint(self) -> str:
        """Where a client on this machine connects: client_endpoint, with a bind on every interface ("*"), which
        no socket can connect to, taken as this machine's loopback."""
        wildcard = "tcp://*:"
        if self.client_endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + self.client_endpoint[len(wildcard):]
        return self.client_endpoint

    @property
    def kv_cache_blocks(self) -> int:
        """The worker's KV cache in whole blocks: kv_cache_tokens rounded down, one block at the least."""
        return max(1, self.kv_cache_tokens // self.kv_block_size)

    def expert_host_endpoint(self, host: int) -> str:
        return self.ipc(f"expert-host-{host}")

    @property
    def expert_host_endpoints(self) -> list[str]:
        return [self.expert_host_endpoint(host) for host in range(self.expert_hosts)]

    def threads_for(self, role: str, worker_on_gpu: bool = False) -> int:
        """torch threads of a process of this role ("expert_host", "gpu_worker", "coordinator"): asked_threads if
        set, up to the CPUs this process may run on; else the coordinator (tokenizing, sockets) takes one of those
        CPUs and the worker and every expert host share the rest, so together they never ask for more threads than
        there are. A worker that computes on a GPU needs few: it keeps WORKER_GPU_THREADS and the expert hosts, whose
        CPU kernels are bound by how many cores read their weights, share the others evenly; a worker on the CPU, or
        with no expert host, shares them with the hosts as one of them."""
        cpus = len(os.sched_getaffinity(0))
        asked = self.asked_threads(role)
        if asked:
            return min(asked, cpus)
        if role == "coordinator":
            return 1
        rest = cpus - 1
        worker = min(WORKER_GPU_THREADS, max(1, rest - self.expert_hosts)) if worker_on_gpu and self.expert_hosts \
            else None
        share = max(1, (rest - worker) // self.expert_hosts) if worker else max(1, rest // (1 + self.expert_hosts))
        return share if role == "expert_host" else worker or share

    def asked_threads(self, role: str) -> int:
        """The torch threads the settings name for a process of this role (0: none). threads_for holds them to the
        CPUs the process may run on: more are no faster, and host_threads 100000 took every thread a host could
        start."""
        return self.host_threads or self.threads if role == "expert_host" else self.threads

    def host_cores(self, host: int, threads: int) -> list[int]:
        """The logical CPUs expert host `host` binds its `threads` threads to: with every host taking as many, the
        last expert_hosts x threads of the CPUs this process may run on, host 0's first, so that the hosts share
        none and leave the first ones to the coordinator and worker (which float). Hyperthreads of one core count
        as two CPUs. Empty (nothing bound) with pin_host_threads off or more hosts' threads than CPUs."""
        cores = sorted(os.sched_getaffinity(0))
        spare = len(cores) - self.expert_hosts * threads
        if not self.pin_host_threads or threads < 1 or not 0 <= host < self.expert_hosts or spare < 0:
            return []
        return cores[spare + host * threads:spare + (host + 1) * threads]

    def host_memory_for(self, host: int) -> str:
        """The memory kind expert host `host` keeps its experts in."""
        kinds = [kind.strip() for kind in self.host_memory.split(",")]
        return kinds[min(host, len(kinds) - 1)]

    def shm_data_plane(self, host: int) -> bool:
        """Whether activations to this host go through a shared-memory mailbox: it must be on this machine,
        which an ipc endpoint guarantees and "shm" asserts."""
        return self.data_plane == "shm" or (self.data_plane == "auto" and
                                             self.expert_host_endpoint(host).startswith("ipc://"))

    def metrics_port_for(self, role: str, host: int = 0) -> int:
        if self.metrics_port == 0:
            return 0
        return self.metrics_port + {"coordinator": 0, "gpu_worker": 1, "expert_host": 2 + host}[role]

    def to_toml(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{f.name} = {value}")
            else:
                lines.append(f"{f.name} = {_toml_string(str(value))}")
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string: quotes and backslashes escaped, and control characters, which TOML does not allow
    raw (a path holding a newline)."""
    return '"' + "".join(f"\\{c}" if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
                         for c in value) + '"'


_HINTS = typing.get_type_hints(Config)
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}
_FIELDS = {f.name for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    hint = _HINTS[name]
    if name in ("gpu_expert_budget", "max_request_bytes", "mailbox_bytes") and isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as e:
            raise ValueError(f"config {name}: {e}") from None
    if name == "host_memory_floor" and type(value) is int:
        value = str(value)  # a number of bytes, which the flag gives as a string (a bool is no size: refused below)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            # anything else is an error: a mistyped "ture" read as false would silently turn a feature off
            return _BOOL_WORDS[str(value).lower()]
        if hint is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError  # true is no count of anything, and 2.5 no whole one
        if hint is float and isinstance(value, bool):
            raise ValueError  # nor a number of seconds
        if hint is str and not isinstance(value, str):
            raise ValueError  # model = 5 is a mistake, not a file named "5"
        return hint(value)
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"config {name}: {value!r} is not a valid {hint.__name__}") from None


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Read a TOML file (unknown keys are an error) and apply overrides whose value is not None."""
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8 text
                raise ValueError(f"{path}: not valid TOML: {e}") from None
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown config key(s): {', '.join(unknown)}")
        values.update(data)
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise ValueError(f"unknown config key {key!r}")
        if value is not None:
            values[key] = value
    return Config(**{k: _coerce(k, v) for k, v in values.items()})


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE plus one --flag per config field (dashes for underscores)."""
    parser.add_argument("--config", help="TOML configuration file (deploy/tierserve.example.toml has every key)")
    settings = parser.add_argument_group("settings", "each overrides the --config file's key of the same name")
    for f in sorted(dataclasses.fields(Config), key=lambda f: f.name):
        # the empty string of model, run_dir and expert_cache_dir means "none" or "chosen at start", not a value
        settings.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                              help=f"default: {f.default}" if f.default != "" else None)


def args_config(args: argparse.Namespace) -> Config:
    """The configuration a command's --config and flags give: OSError or ValueError naming what is wrong."""
    return load_config(args.config, **{name: getattr(args, name, None) for name in _FIELDS})


def config_from_args(args: argparse.Namespace) -> Config:
    """args_config's, where a bad file or value exits with its message alone."""
    try:
        return args_config(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tierserve: {e}") from None
