"""Where the time of a model step goes: named sections, nested, summed over windows of decode steps.

The engine opens a step (`StepProfile.step`); code it calls marks sections with `section(name)`, nested in
whatever section is open around it: the trunk marks each layer and, inside it, attention, router and MoE; the
data plane its sends to and waits on the expert hosts. Sections are ambient, as torch.profiler's
record_function is, so the MoE dispatch and the data plane mark theirs without a profiler handed to them.
While no step is being profiled, `section` returns one shared object whose enter and exit do nothing.

Times are wall clock (time.perf_counter) at section boundaries. On a CUDA device the profile synchronizes the
device at every boundary, so a section's time includes the kernels it launched; that removes the overlap of
Python launching kernels with the GPU running earlier ones, so a profiled step is slower than an unprofiled one.

Every `window` kept steps are summed into a `ProfileWindow` (shared/profile_table.py: what travels in the
worker's heartbeat, and the table made from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.profile_table import ProfileWindow


class _Nothing:
    """The section or step given while nothing is profiled."""

    __slots__ = ()

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def discard(self) -> None:
        return None


_NOTHING = _Nothing()
_active: _StepTimes | None = None  # the step being profiled, if any


def section(name: str) -> _Section | _Nothing:
    """A context manager timing `name` within the section open around it, in the step being profiled."""
    return _NOTHING if _active is None else _Section(_active, name)


class StepProfile:
    """Profiles model steps in windows of `window` decode steps (0: off); `latest` is the last full window."""

    def __init__(self, window: int, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 0:
            raise ValueError(f"a profile window is a number of steps >= 0, not {window}")
        self.window, self.sync, self.clock = window, sync or (lambda: None), clock
        self.latest: ProfileWindow | None = None
        self.windows = 0  # full windows so far
        self._clear()

    def _clear(self) -> None:
        self._steps, self._step_s = 0, 0.0
        self._seconds: dict[str, float] = {}
        self._entries: dict[str, int] = {}

    @property
    def on(self) -> bool:
        return self.window > 0

    def step(self) -> _StepTimes | _Nothing:
        """A context manager around one model step; `discard()` on what it gives leaves the step out."""
        return _StepTimes(self) if self.on else _NOTHING

    def record(self, times: _StepTimes, seconds: float) -> None:
        """Add a finished step; every `window` steps, the sums become `latest`."""
        self._steps += 1
        self._step_s += seconds
        for path, s in times.seconds.items():
            self._seconds[path] = self._seconds.get(path, 0.0) + s
            self._entries[path] = self._entries.get(path, 0) + times.entries[path]
        if self._steps == self.window:
            self.windows += 1
            self.latest = ProfileWindow(self.windows, self._steps, self._step_s,
                                        [(p, s, self._entries[p]) for p, s in self._seconds.items()])
            self._clear()


class _StepTimes:
    """The sections of one step in progress: open ones on a stack, closed ones summed by path."""

    def __init__(self, profile: StepProfile) -> None:
        self.profile = profile
        self.open: list[str] = []
        self.seconds: dict[str, float] = {}
        self.entries: dict[str, int] = {}
        self.kept = True

    def discard(self) -> None:
        self.kept = False

    def __enter__(self) -> _StepTimes:
        global _active
        self.profile.sync()
        self.start = self.profile.clock()
        _active = self
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        global _active
        _active = None
        self.profile.sync()
        seconds = self.profile.clock() - self.start
        if self.kept and exc_type is None:
            self.profile.record(self, seconds)


class _Section:
    def __init__(self, step: _StepTimes, name: str) -> None:
        self.step, self.path = step, f"{step.open[-1]}/{name}" if step.open else name

    def __enter__(self) -> None:
        step = self.step
        step.profile.sync()  # what was launched before belongs to the section around this one
        step.open.append(self.path)
        self.start = step.profile.clock()

    def __exit__(self, *exc: object) -> None:
        step = self.step
        step.profile.sync()
        seconds = step.profile.clock() - self.start
        step.open.pop()
        step.seconds[self.path] = step.seconds.get(self.path, 0.0) + seconds
        step.entries[self.path] = step.entries.get(self.path, 0) + 1
