"""What a running system keeps on the machine's file systems, and its removal once the process behind it is gone:
the socket files of ipc endpoints, the run dir's marker, and files in /dev/shm that name their process by pid (the
hosts' mailboxes and host-memory segments).

Nothing here loads torch: `tierserve up` starts its children, and cleans up after them, with this alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import signal
import socket
import struct
from collections.abc import Callable, Sequence

# sysexits' EX_CONFIG: the exit status of a process another one, started under the same member id, took over from
# (a restart would only take the id back and stop the other in turn), or that the coordinator refuses as no member of
# its system (a restart on the same configuration would be refused again). The units (RestartPreventExitStatus) and
# `tierserve up` leave it stopped.
SUPERSEDED_EXIT_STATUS = 78
EPHEMERAL_MARKER = ".ephemeral"  # in a run dir `tierserve up` made for itself, and removes
MAILBOX_PREFIX = "/dev/shm/tierserve-mailbox-"
MAILBOX_MAGIC = b"TSMBOX02"  # a mailbox's first bytes (shared.mailbox lays the rest out)
MAILBOX_OWNER_AT = 24  # u32: the pid of the host that made the mailbox
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `signum` when its parent ends, however it ends (prctl PR_SET_PDEATHSIG):
    a child killed with it leaves nothing running."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


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


def identity_at(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None where there is none: which file a path names now."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def remove_if_same(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the file at `path` if it is still the one `identity` names: another process that has since made its
    own file there (a successor's socket file, bound over this one's; its mailbox, renamed over) keeps it."""
    if identity is not None and identity_at(path) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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


def is_held(path: str) -> bool:
    """Whether a process holds the file at `path` (`hold_while_open`), in this PID namespace or another."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return not _read_locked(fd)
    finally:
        os.close(fd)


def _read_locked(fd: int) -> bool:
    """Take a read lock on the open file at `fd`, kept until it is closed; False where its owner holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
    except BlockingIOError:
        return False
    return True


def _unlink_unless_held(path: str) -> bool:
    """Unlink `path` unless its owner holds it; whether it did. The lock is kept until the name is gone, so an owner
    that made the file a moment ago, and is about to take its own, finds it already unlinked."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not _read_locked(fd):
            return False
        if not os.path.samestat(os.fstat(fd), os.stat(path)):
            return False  # another file took the name since it was opened: a restarted owner's, renamed into place
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def mailbox_path(endpoint: str) -> str:
    """Where the host behind a data endpoint keeps its worker's mailbox; ipc endpoints live in the run dir,
    so the name is private to one run and a restarted host finds (and replaces) its predecessor's."""
    return f"{MAILBOX_PREFIX}{hashlib.sha256(endpoint.encode()).hexdigest()[:20]}"


def remove_stale_mailboxes(endpoints: Sequence[str] | None = None) -> list[str]:
    """Remove the mailboxes (and half-made ones) of hosts that are gone: a later system on another run directory
    has other names. A host holds its mailbox from the moment it makes it, and one held is kept whatever the pid in
    its header (or a half-made one's name) says. With `endpoints`, only those hosts' (a system's own, as it stops).
    The paths removed."""
    directory, prefix = os.path.split(MAILBOX_PREFIX)
    prefixes = [prefix] if endpoints is None else [os.path.basename(mailbox_path(e)) for e in endpoints]
    return [path for name in prefixes for path in remove_files_of_dead_processes(
        directory, name, lambda path: _tmp_owner(path) if path.endswith(".tmp") else _owner(path))]


def _tmp_owner(path: str) -> int | None:
    pid = path.rsplit(".", 2)[-2]
    return int(pid) if pid.isdigit() else None


def _owner(path: str) -> int | None:
    """The pid in a mailbox's header (0: made before mailboxes carried their host's pid); None where it is not one
    this user can read."""
    try:
        with open(path, "rb") as f:
            head = f.read(MAILBOX_OWNER_AT + 4)
    except OSError:
        return None
    if len(head) < MAILBOX_OWNER_AT + 4 or head[:8] != MAILBOX_MAGIC:
        return None
    return struct.unpack_from("<I", head, MAILBOX_OWNER_AT)[0]
