"""Host memory as the kernel reports it: free memory from /proc/meminfo (what expert hosts size their pools
from), each process's peak resident set, and the machine's used memory sampled while a system runs (what
the benchmark reports against the model's size)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.config import parse_bytes_or_percent

_KB_LINE = re.compile(r"^(\w+):\s+(\d+) kB$", re.M)


@dataclass(frozen=True)
class MemInfo:
    total: int
    available: int

    @property
    def used(self) -> int:
        """What the machine cannot give back without swapping: tmpfs files (a model in /dev/shm) count."""
        return self.total - self.available


def parse_meminfo(text: str) -> MemInfo:
    """MemTotal and MemAvailable (bytes) out of /proc/meminfo's text."""
    values = {m.group(1): int(m.group(2)) * 1024 for m in _KB_LINE.finditer(text)}
    try:
        return MemInfo(values["MemTotal"], values["MemAvailable"])
    except KeyError as e:
        raise ValueError(f"/proc/meminfo has no {e.args[0]} line") from None


def read_meminfo(path: str = "/proc/meminfo") -> MemInfo:
    return parse_meminfo(Path(path).read_text())


# (directory under the cgroup root, limit file, usage file, memory.stat's reclaimable page cache line)
_CGROUP_V2 = ("", "memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(limit, available) of this process's memory cgroup, v2 or v1: the lowest limit of its own and its
    ancestors', and the least room any of them has left, each its limit less its working set (usage less
    reclaimable page cache), since an ancestor's usage counts every cgroup under it; None where there is no limit
    or none can be read."""
    for line in Path(proc_cgroup).read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            under, limit_file, usage_file, inactive_line = _CGROUP_V2
        elif "memory" in controllers.split(","):
            under, limit_file, usage_file, inactive_line = _CGROUP_V1
        else:
            continue
        base = Path(root, under)
        own = base / path.lstrip("/")
        # deepest first; a container without its own cgroup namespace sees the host's path, which its mount of
        # the hierarchy does not have: its cgroup is then the mount's root
        found = [d for d in (own, *own.parents) if d.is_relative_to(base) and (d / limit_file).is_file()]
        try:
            limited = [(limit, d) for d in found if (limit := _limit((d / limit_file).read_text())) < _NO_LIMIT]
            rooms = [limit - _working_set(d, usage_file, inactive_line) for limit, d in limited]
        except (OSError, ValueError):
            continue  # not a memory hierarchy this process can read
        if limited:
            return min(limit for limit, _ in limited), min(rooms)
    return None


def _working_set(cgroup: Path, usage_file: str, inactive_line: str) -> int:
    stat = dict(entry.split() for entry in (cgroup / "memory.stat").read_text().splitlines())
    return int((cgroup / usage_file).read_text()) - int(stat.get(inactive_line, 0))


def _limit(text: str) -> int:
    text = text.strip()
    return _NO_LIMIT if text == "max" else min(int(text), _NO_LIMIT)


def host_memory() -> MemInfo:
    """What this process may take: the machine's memory, capped by its memory cgroup's limit where it has one
    (a container, or a systemd unit's MemoryMax), which /proc/meminfo does not show."""
    mem = read_meminfo()
    cgroup = cgroup_memory()
    if cgroup is None:
        return mem
    limit, available = cgroup
    return MemInfo(min(mem.total, limit), max(0, min(mem.available, available)))


class HostMemoryError(ValueError):
    """What a process was asked to hold does not fit in the RAM free; the message says what would."""


def safety_floor(spec: str, mem: MemInfo) -> int:
    """Bytes of RAM to leave free (host_memory_floor): a size ('2GiB') or a percentage of MemTotal ('10%')."""
    absolute, share = parse_bytes_or_percent(spec)
    return max(absolute, int(share * mem.total))


def room_above_floor(floor_spec: str) -> tuple[int, int]:
    """(bytes of RAM this process may still take, leaving host_memory_floor free; the floor in bytes). What is free
    is measured now, so memory this process has already written (a KV cache's zeros) is no longer counted in it."""
    mem = host_memory()
    floor = safety_floor(floor_spec, mem)
    return mem.available - floor, floor


def size_text(n: int) -> str:
    """A size for a message: GB (10**9 bytes, as sizes are written in settings), MB below a tenth of one."""
    n = max(0, n)
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def parse_status(text: str) -> dict[str, int]:
    """/proc/PID/status's memory lines (VmHWM: the peak resident set; RssAnon, RssFile, RssShmem: what is
    resident now, by kind of page), in bytes."""
    return {m.group(1): int(m.group(2)) * 1024 for m in _KB_LINE.finditer(text)}


def descendants(root: int, proc: Path = Path("/proc")) -> list[int]:
    """Every live process under `root` (children, grandchildren, ...), from each process's parent pid."""
    parents: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone since the listing
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])  # the name in parentheses may hold spaces
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in sorted(parents.get(todo.pop(), [])):
            found.append(child)
            todo.append(child)
    return found


def process_memory(pids: list[int], proc: Path = Path("/proc")) -> list[dict[str, int | str]]:
    """Per process: its role (the module it runs, from its command line), peak and current resident set."""
    out = []
    for pid in pids:
        try:
            status = parse_status((proc / str(pid) / "status").read_text())
            argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        role = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else Path(argv[0]).name
        out.append({"pid": pid, "role": role, "peak_rss": status.get("VmHWM", 0),
                    **{k.lower(): status.get(k, 0) for k in ("RssAnon", "RssFile", "RssShmem")}})
    return out


class UsedMemoryPeak:
    """Samples the machine's used memory in a thread from when it starts until `stop()`: the peak above the
    level at start is what a system started meanwhile took, every copy and cache of its own counted once,
    whatever process holds it (the sum of processes' resident sets counts a shared page in each)."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.baseline = self.peak = read_meminfo().used
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="used-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, read_meminfo().used)

    def stop(self) -> int:
        """Bytes of the peak above the baseline."""
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, read_meminfo().used)
        return self.peak - self.baseline
