"""`tierserve up`: run the whole system as child processes for a desktop run or a test.

Starts a coordinator, a gpu_worker and N expert hosts, each its own OS process talking
over ipc:// sockets in a private run directory, prints the client endpoint once the
system answers ready, restarts a child that dies (waiting longer each time while it keeps
failing soon after its start), and on SIGTERM / Ctrl-C drains and stops them in order
(coordinator, worker, hosts) leaving nothing behind. Children get SIGTERM if this process
dies (PR_SET_PDEATHSIG), so even `kill -9` leaves no orphans.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shared.cli_client import seconds_argument
from shared.client import Client, ServerError
from shared.config import Config, add_config_arguments, config_from_args
from shared.memory_use import descendants, process_memory
from shared.run_files import (
    EPHEMERAL_MARKER,
    SUPERSEDED_EXIT_STATUS,
    die_with_parent,
    hold_while_open,
    is_held,
    listened_on,
    remove_ipc_file,
    remove_stale_mailboxes,
)

RUN_DIR_PREFIX = "tierserve-"  # of the run dirs `tierserve up` makes for itself in the temporary directory
_HELD_MARKERS: list[int] = []  # fds of this process's run dir markers, open (and so held) for as long as it lives


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_tcp_port() -> int:
    """A TCP port free now, from below the ephemeral range: a port the kernel picked for a bind to port 0 and
    then got back is the next one it hands out, so a sibling's metrics server (port 0) took the coordinator's
    client port between this pick and the coordinator's bind."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(10_000, 30_000) if p not in ephemeral] or list(range(1024, 65536))
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free TCP port found for the client endpoint; set client_endpoint to a free port")


# A child that exits is started again at once; one that keeps exiting within STABLE_UPTIME_S of its start (e.g. a
# host whose model file is gone) waits before each restart, from RESTART_FIRST_DELAY_S doubling up to
# RESTART_MAX_DELAY_S, as systemd's RestartSec with RestartSteps would: restarted as fast as it failed (ten times
# in 15 s, for ever), such a host filled the log and kept a core busy importing torch.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_UPTIME_S = 30.0
SIGNAL_GAP_S = 0.5  # between two stop signals passed on to a child


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    last_delay_s: float | None = None  # before its last restart; None: not restarted since it last ran a while
    restart_at: float | None = None  # it exited and is started again then
    superseded: bool = False  # it exited because another process took its member id over: it is not started again

    def start(self) -> None:
        # a session of its own: a terminal's Ctrl-C (SIGINT to the whole process group) reaches the launcher
        # alone, which stops the children in order; signalled together, the coordinator took the launcher's
        # SIGTERM as a second signal and cancelled what it was draining, and the hosts left at once
        self.process = subprocess.Popen(self.argv, preexec_fn=die_with_parent, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart_delay(self, uptime_s: float) -> float:
        """The wait before starting the child again, now that it exited `uptime_s` after its start."""
        if uptime_s >= STABLE_UPTIME_S:
            self.last_delay_s = None
        self.last_delay_s = 0.0 if self.last_delay_s is None else \
            min(max(RESTART_FIRST_DELAY_S, 2 * self.last_delay_s), RESTART_MAX_DELAY_S)
        return self.last_delay_s


def prepare_run(config: Config) -> tuple[Config, Path, bool]:
    """Fill in a private run dir and a free client port where the config leaves them open. A run dir of the user's
    is made private (0700) if it is new; one that exists keeps its mode (made 0700, /tmp would be closed to every
    other user), and is refused if another user may write to it, since they could replace its sockets: ValueError."""
    ephemeral = not config.run_dir_chosen
    if ephemeral:
        for abandoned in remove_abandoned_run_dirs(Path(tempfile.gettempdir())):
            print(f"tierserve: removed {abandoned}: the tierserve up that made it is gone", file=sys.stderr)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)) if ephemeral else Path(config.run_dir)
    if not ephemeral:
        try:
            run_dir.mkdir(mode=0o700, parents=True)
            os.chmod(run_dir, 0o700)  # whatever the umask
        except FileExistsError:
            st = run_dir.stat()
            if not stat.S_ISDIR(st.st_mode):
                raise ValueError(f"run_dir {run_dir} is not a directory") from None
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise ValueError(f"run_dir {run_dir} is another user's or others may write to it (mode "
                                 f"{stat.S_IMODE(st.st_mode):o}): give tierserve a directory of its own") from None
    endpoint = config.client_endpoint
    if endpoint.endswith(":0"):
        endpoint = f"{endpoint[:-2]}:{free_tcp_port()}"
    try:
        config = dataclasses.replace(config, run_dir=str(run_dir), client_endpoint=endpoint)
    except ValueError:  # e.g. a TMPDIR too long for the socket files' paths: the dir made for them is left empty
        if ephemeral:
            run_dir.rmdir()
        raise
    if ephemeral:  # held before the pid is written: a sweep that finds a pid finds it held while this process lives
        fd = os.open(run_dir / EPHEMERAL_MARKER, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        hold_while_open(fd)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD_MARKERS.append(fd)
    return config, run_dir, ephemeral


def remove_abandoned_run_dirs(parent: Path) -> list[Path]:
    """Remove this user's run dirs in `parent` that a `tierserve up` made for itself and died without removing
    (killed outright while its children were still starting: none had yet a handler to leave the run dir by),
    those holding nothing but the marker and the config, whose marker names a process and is held by none. (A live
    `up` holds its marker: in another container sharing `parent`, its pid may name no process here.) The paths
    removed."""
    removed = []
    for marker in parent.glob(f"{RUN_DIR_PREFIX}*/{EPHEMERAL_MARKER}"):
        run_dir = marker.parent
        try:
            pid = int(marker.read_text() or 0)  # none: an older version's marker, or one whose pid is being written
            if run_dir.stat().st_uid != os.getuid() or pid <= 0 or is_held(str(marker)) or \
                    {p.name for p in run_dir.iterdir()} - {EPHEMERAL_MARKER, "config.toml"}:
                continue
            shutil.rmtree(run_dir)
        except (OSError, ValueError):
            continue  # removed meanwhile, not ours to read, or a marker of an older version (no pid): kept
        removed.append(run_dir)
    return removed


def children_for(config: Config, config_path: Path) -> list[Child]:
    base = [sys.executable, "-m"]
    kids = [Child("coordinator", [*base, "coordinator", "--config", str(config_path)]),
            Child("gpu_worker", [*base, "gpu_worker", "--config", str(config_path)])]
    kids += [Child(f"expert-host-{i}", [*base, "expert_host", "--config", str(config_path), "--host-id", str(i)])
             for i in range(config.expert_hosts)]
    return kids


def wait_ready(config: Config, kids: list[Child], timeout_s: float, stopping: Callable[[], bool]) -> bool:
    """Whether the system answered ready; False once a child exits, `stopping()` (a stop signal came) or the
    timeout passes. Only this system's coordinator counts: another system serving on the same client endpoint
    answered ready while this one's coordinator was failing to bind it."""
    deadline = time.monotonic() + timeout_s
    coordinator_pid = next(k.process.pid for k in kids if k.name == "coordinator")
    with Client(config.client_connect_endpoint, timeout_s=1.0) as client:
        while time.monotonic() < deadline and not stopping():
            for kid in kids:
                if not kid.alive():
                    print(f"tierserve: {kid.name} exited with {kid.process.returncode} during start-up",
                          file=sys.stderr)
                    return False
            try:
                health = client.health()
                if health.status == "ready" and any(m.get("member_id") == "coordinator" and
                                                    m.get("pid") == coordinator_pid for m in health.members):
                    return True
            except (TimeoutError, ServerError):  # not answering yet, or its connection dropped: ask again
                pass
            time.sleep(0.2)
    if not stopping():
        # a conversion cut short by the stop that follows is thrown away: every later `up` would start it again
        # the cache is looked for only in expert_cache_dir where it is set: one converted beside the model is not used
        cache_dir = f" --cache-dir {config.expert_cache_dir}" if config.expert_cache_dir else ""
        print(f"tierserve: not ready after {timeout_s:g} s. A first start of a quantized model converts its expert "
              f"cache: `tierserve convert-experts MODEL{cache_dir}` does that ahead, or give --ready-timeout more "
              "time", file=sys.stderr)
    return False


def restart_exited(kids: list[Child], stopping: Callable[[], bool]) -> None:
    """One look at the children: one that exited is started again once its restart delay is over, unless another
    process took its member id over. The delay is waited out by later looks, so a stop signal is acted on at once
    meanwhile."""
    for kid in kids:
        if stopping():
            return
        now = time.monotonic()
        if kid.superseded:
            continue
        if kid.restart_at is None and not kid.alive():
            if kid.process.returncode == SUPERSEDED_EXIT_STATUS:
                kid.superseded = True
                print(f"tierserve: {kid.name} exited with {SUPERSEDED_EXIT_STATUS}: another process took over its "
                      "member id; not restarting it", file=sys.stderr)
                continue
            uptime_s = now - kid.started_at
            delay_s = kid.restart_delay(uptime_s)
            kid.restart_at = now + delay_s
            print(f"tierserve: {kid.name} exited with {kid.process.returncode} after {uptime_s:.1f} s; restarting "
                  f"{f'in {delay_s:g} s' if delay_s else 'now'}", file=sys.stderr)
        if kid.restart_at is not None and now >= kid.restart_at:
            kid.restart_at = None
            kid.start()


def stop_in_order(kids: list[Child], drain_timeout_s: float, signals: Callable[[], int] = lambda: 0) -> None:
    """Coordinator first (it drains requests), then the worker, then the hosts it was using. signals: how many
    stop signals up has had; one more while a group is waited for (a second Ctrl-C) is passed on to it, so the
    coordinator stops draining as it does at its own second signal: the children, in sessions of their own, get
    none from the terminal."""
    groups = [[k for k in kids if k.name == "coordinator"], [k for k in kids if k.name == "gpu_worker"],
              [k for k in kids if k.name.startswith("expert-host")]]
    passed_on = min(signals(), 1)  # a quick second Ctrl-C, in before this began, is passed on too
    for group in groups:
        running = [kid for kid in group if kid.alive()]
        for kid in running:
            kid.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        deadline = sent_at + drain_timeout_s + 5
        while any(kid.alive() for kid in running) and time.monotonic() < deadline:
            # not at once after the last: a signal sent while the last is still pending merges with it
            if signals() > passed_on and time.monotonic() - sent_at >= SIGNAL_GAP_S:
                passed_on, sent_at = signals(), time.monotonic()
                for kid in running:
                    if kid.alive():
                        kid.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        for kid in running:
            if kid.alive():
                kid.process.kill()
            kid.process.wait()


def remove_leftovers(config: Config) -> None:
    """What children killed outright left behind, once every child has exited: their socket files (in a run dir of
    the user's, which outlives the run) and the mailboxes of dead hosts (up to 64 MiB of RAM each in /dev/shm).
    A socket file something still listens on is another system's, sharing the run dir: its processes could not
    connect again without it."""
    for endpoint in (config.control_endpoint, config.engine_endpoint, *config.expert_host_endpoints):
        if not listened_on(endpoint):
            remove_ipc_file(endpoint)
    for stale in remove_stale_mailboxes(config.expert_host_endpoints):
        print(f"tierserve: removed {stale}: its host is gone", file=sys.stderr)


def up(config: Config, ready_timeout_s: float = 300.0) -> int:
    if not config.model:
        print("tierserve up: --model is required", file=sys.stderr)
        return 2
    try:
        config, run_dir, ephemeral = prepare_run(config)
    except (ValueError, OSError) as e:
        print(f"tierserve up: {e}", file=sys.stderr)
        return 2
    if ephemeral:
        config_path = run_dir / "config.toml"
    else:  # a run dir of the user's: a fixed name could be a file of theirs, which this would replace, then remove
        fd, name = tempfile.mkstemp(".toml", "tierserve-up-", run_dir)
        os.close(fd)
        config_path = Path(name)
    config_path.write_text(config.to_toml())
    kids = children_for(config, config_path)
    stopping = False
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping, signals
        stopping = True
        signals += 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # its terminal closed: the children, in sessions of their own, are not told; unless started under nohup, which
    # asks for the system to outlive the terminal
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, on_signal)
    for kid in kids:
        kid.start()
    status = 0
    try:
        if not wait_ready(config, kids, ready_timeout_s, lambda: stopping):
            return 0 if stopping else 1
        print(f"tierserve ready: client endpoint {config.client_connect_endpoint}", flush=True)
        while not stopping:
            time.sleep(0.2)
            restart_exited(kids, lambda: stopping)
    finally:
        stop_in_order(kids, config.drain_timeout_s, lambda: signals)
        remove_leftovers(config)
        if ephemeral:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            config_path.unlink(missing_ok=True)
    return status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierserve up", description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--ready-timeout", type=seconds_argument, default=300.0, help="seconds to wait for the system")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return up(config_from_args(args), args.ready_timeout)


def up_arguments(model: str, *options: str, ready_timeout_s: float = 180.0) -> list[str]:
    """RunningSystem's `tierserve up` arguments: a free client port and metrics ports, then the caller's options,
    which may override them."""
    return ["--model", model, "--client-endpoint", "tcp://127.0.0.1:0", "--metrics-port", "0", "--ready-timeout",
            str(ready_timeout_s), *options]


class RunningSystem:
    """`tierserve up` as a child process, for the demo, benchmarks and tests: start, read the endpoint, stop."""

    def __init__(self, model: str, *options: str, ready_timeout_s: float = 180.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "up", *up_arguments(model, *options, ready_timeout_s=ready_timeout_s)],
            stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent, start_new_session=True,
        )  # its own process group, as in a terminal
        self.endpoint = ""
        for line in self.process.stdout:
            if "client endpoint" in line:
                self.endpoint = line.split("client endpoint", 1)[1].strip()
                break
        if not self.endpoint:
            code = self.process.wait()
            raise RuntimeError(f"tierserve up exited with {code} before it was ready")

    def memory(self) -> list[dict[str, int | str]]:
        """Peak and current resident set of `tierserve up` and every process under it."""
        return process_memory([self.process.pid, *descendants(self.process.pid)])

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM, then its exit status; past `timeout_s` (its three groups' drains may take up to
        drain_timeout_s + 5 each) its whole process group is killed rather than left running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        finally:
            self.process.stdout.close()

    def __enter__(self) -> RunningSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
