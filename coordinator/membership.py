"""Who is in the system, whether they are alive, and whether together they can serve: pure logic, no sockets.

Every process sends a Heartbeat each heartbeat interval; it doubles as the join request. A member is alive
while heard from within the heartbeat timeout, counted in the coordinator's own running time; one reporting a
placement version other than the current one (0 after a start or restart) gets a Welcome carrying the placement.
Each process says which start of its member id it is (its incarnation): one heard from under a member id that another
holds takes it over, whether the holder died (a restart, which needs no wait for its timeout) or runs on (the id was
started twice). The one replaced is not the member any more: each of its heartbeats, for as long as they keep coming,
is answered that it must stop, and counts for nothing. A process on another model file than the coordinator's takes
no id over from a live one on the coordinator's: its heartbeats go unanswered until that one is lost (stopped for a
restart onto the new file, it is, within the heartbeat timeout), and it joins then.
The system is ready when the gpu worker and every expert host the placement uses are alive and have applied the
current placement. Only the gpu worker and the placement's expert hosts, each in its own role, are members: a
heartbeat under another id (another configuration's host, or a stray message) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.config import Config
from shared.expert_cache import hot_expert_nbytes
from shared.gguf_file import GGUFModel
from shared.placement import Placement, hot_experts_for_budget, round_robin_placement, versioned
from shared.process import worker_device, worker_dtype
from shared.protocol import Heartbeat

WORKER_ID = "gpu-worker"


def startup_placement(model: GGUFModel, config: Config) -> Placement:
    """The placement the coordinator starts with: `hot_experts` per layer on the worker (or as many as
    `gpu_expert_budget` holds), the rest dealt round-robin to the expert hosts."""
    cfg = model.config
    hot = config.hot_experts
    if hot < 0:
        nbytes = hot_expert_nbytes(model, worker_dtype(config, worker_device(config)))
        hot = hot_experts_for_budget(cfg, config.gpu_expert_budget, nbytes)
    return versioned(round_robin_placement(cfg, hot, config.expert_hosts), model.identity)


@dataclass
class Member:
    member_id: str
    role: str
    incarnation: str
    pid: int
    host: str
    metrics_port: int
    placement_version: int
    model: str  # the identity of the model file it serves
    last_seen: float
    first_seen: float  # when this process (incarnation) was first heard from
    load: dict[str, Any] = field(default_factory=dict)
    alive: bool = True


@dataclass(frozen=True)
class HeartbeatOutcome:
    welcome: bool = False  # send the current placement back
    joined: bool = False  # first heard of, or heard again after being lost or restarting
    restarted: bool = False  # a known, live member came back as a new process: whatever it held is gone
    superseded_by: Member | None = None  # the sender was replaced under its member id by this member: it must stop
    first_notice: bool = False  # the first heartbeat from the sender since it was replaced, or was refused
    refused: str = ""  # why the sender is not a member of this system (only first_notice is set beside it)
    deferred: str = ""  # why the sender is not let in yet: it is left unanswered (only first_notice beside it)


# How long a replaced process is remembered after it was last heard from. Far longer than the heartbeat timeout: a
# process found lost may only have been paused, and must not take its id back from its successor when it resumes.
REPLACED_KEPT_S = 3600.0


@dataclass
class Replaced:
    """A process that another took its member id over from, while it may still be running."""

    last_seen: float
    told: bool = False  # one of its heartbeats was answered that it must stop


def _heard(heard: dict[tuple[str, str], float], hb: Heartbeat, now: float) -> bool:
    """Record that hb's process was heard from now; whether it is the first time (within the timeout, which
    expire keeps `heard` to)."""
    key = hb.member_id, hb.incarnation
    first = key not in heard
    heard[key] = now
    return first


class Membership:
    def __init__(self, placement: Placement, timeout_s: float, model: str, interval_s: float, tick_s: float) -> None:
        self.placement = placement
        self.timeout_s = timeout_s
        self.interval_s = interval_s  # how often members send a heartbeat
        self.tick_s = tick_s  # how often the coordinator calls expire
        self.model = model  # the identity of the coordinator's model file, which every member must serve
        self.members: dict[str, Member] = {}
        # by (member id, incarnation), until silent for REPLACED_KEPT_S
        self.replaced: dict[tuple[str, str], Replaced] = {}
        # (member id, incarnation) of processes refused -> when last heard, until silent for the timeout: each is
        # named in the log once, not at every heartbeat
        self.refused: dict[tuple[str, str], float] = {}
        # likewise for processes whose heartbeats are left unanswered for now
        self.deferred: dict[tuple[str, str], float] = {}
        self.expired_at: float | None = None  # when expire last ran
        self.heard_at: float | None = None  # when the last heartbeat was read

    def heartbeat(self, hb: Heartbeat, now: float) -> HeartbeatOutcome:
        # After a stop, the loop may read a queued heartbeat before its late tick: that one counts the stop then
        self._credit_a_stop(now)
        self.heard_at = now
        roles = {WORKER_ID: "gpu_worker", **{host: "expert_host" for host in self.placement.hosts}}
        if roles.get(hb.member_id) != hb.role:
            first_notice = _heard(self.refused, hb, now)
            known = ", ".join(f"{member} ({role})" for member, role in roles.items())
            return HeartbeatOutcome(refused=f"{hb.member_id!r} as {hb.role!r} is not a member of this system: its "
                                            f"members are {known}", first_notice=first_notice)
        replaced = self.replaced.get((hb.member_id, hb.incarnation))
        if replaced is not None:
            first_notice = not replaced.told
            replaced.last_seen, replaced.told = now, True
            return HeartbeatOutcome(superseded_by=self.members[hb.member_id], first_notice=first_notice)
        old = self.members.get(hb.member_id)
        another_process = old is not None and old.incarnation != hb.incarnation
        if another_process and old.alive and old.model == self.model != hb.model:
            # taking over, it would stop a process that serves this system for one that cannot (it is sent no
            # placement), leaving the id with no process serving it. Not refused either: it may be the member
            # restarted onto a new model file, its predecessor not yet found lost, and a refused one stops for good.
            first_notice = _heard(self.deferred, hb, now)
            return HeartbeatOutcome(deferred=f"{hb.member_id} is served by pid {old.pid} on {old.host}, on this "
                                             f"system's model ({self.model}), and pid {hb.pid} on {hb.host} serves "
                                             f"another ({hb.model}): it is let in once the first is lost",
                                    first_notice=first_notice)
        if another_process:  # restarted, or started a second time; or found lost while it was only paused (SIGSTOP,
            # a long stall): what the old one sends from now on is not the member's, lest it take the id back
            self.replaced[old.member_id, old.incarnation] = Replaced(old.last_seen)
        restarted = another_process and old.alive
        joined = old is None or not old.alive or restarted
        first_seen = old.first_seen if old is not None and not another_process else now
        self.members[hb.member_id] = Member(hb.member_id, hb.role, hb.incarnation, hb.pid, hb.host, hb.metrics_port,
                                            hb.placement_version, hb.model, now, first_seen, dict(hb.load))
        # a member on another model file is sent no placement: its layers and experts are not this model's, and
        # applying one would crash it (`missing` says why the system waits)
        welcome = hb.placement_version != self.placement.version and hb.model == self.model
        return HeartbeatOutcome(welcome=welcome, joined=joined, restarted=restarted)

    def expire(self, now: float) -> list[Member]:
        """Mark members not heard from within the timeout as lost; returns those lost just now. Time in which the
        coordinator did not run (stopped, a frozen container) counts against no member (`_credit_a_stop`)."""
        self._credit_a_stop(now)
        self.expired_at = now
        lost = []
        for m in self.members.values():
            if m.alive and now - m.last_seen > self.timeout_s:
                m.alive = False
                lost.append(m)
        # kept, every restart would leave one behind for good; one silent for REPLACED_KEPT_S is surely gone
        self.replaced = {i: r for i, r in self.replaced.items() if now - r.last_seen <= REPLACED_KEPT_S}
        self.refused = {i: seen for i, seen in self.refused.items() if now - seen <= self.timeout_s}
        self.deferred = {i: seen for i, seen in self.deferred.items() if now - seen <= self.timeout_s}
        return lost

    def _credit_a_stop(self, now: float) -> None:
        """Called as a tick or a heartbeat read happens. Since the later of the tick's due time and the last
        heartbeat read, the loop has read nothing: for longer than a heartbeat interval, in which every member
        sends one, it did not run, and that time is credited. A loop that is merely slow reads the live members'
        heartbeats between its late ticks, and its time counts: credited whole, a member dead for good was found
        lost only after timeout / tick_s late ticks (30 s at 1 s apart). One blocked for longer than an interval at a
        time still looks stopped each time, and finds a dead member lost that much later."""
        if self.expired_at is None:
            return
        unwatched_s = now - max(self.expired_at + self.tick_s, self.heard_at or 0.0)
        if unwatched_s > self.interval_s:
            self._not_watched(unwatched_s, now)

    def _not_watched(self, unwatched_s: float, now: float) -> None:
        # The heartbeats members sent meanwhile are still unread in the control socket: without this, the first
        # tick after a SIGCONT found every live member lost and resumed or failed every request in flight. A tick
        # still counts its own period, so members are found lost even by a coordinator whose ticks are always late.
        # A replaced process's unread heartbeats likewise must not find it forgotten, and let it take its id back.
        for m in [*self.members.values(), *self.replaced.values()]:
            m.last_seen = min(m.last_seen + unwatched_s, now)

    def is_alive(self, member_id: str) -> bool:
        m = self.members.get(member_id)
        return m is not None and m.alive

    def required(self) -> list[str]:
        return [WORKER_ID, *(self.placement.hosts[h] for h in self.placement.hosts_in_use())]

    def missing(self) -> list[str]:
        """Required members that are not alive with the current placement, each with the reason."""
        out = []
        for member_id in self.required():
            m = self.members.get(member_id)
            if m is None:
                out.append(f"{member_id} has not joined")
            elif not m.alive:
                out.append(f"{member_id} is not responding")
            elif m.model != self.model:  # e.g. the config's model changed and only the coordinator was restarted
                out.append(f"{member_id} serves another model ({m.model}) than the coordinator ({self.model}): "
                           "restart whichever is on the old file")
            elif m.placement_version != self.placement.version:
                out.append(f"{member_id} is applying placement v{self.placement.version}")
        return out

    def ready(self) -> bool:
        return not self.missing()

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [
            {"member_id": m.member_id, "role": m.role, "pid": m.pid, "host": m.host, "incarnation": m.incarnation,
             "metrics_port": m.metrics_port, "alive": m.alive, "placement_version": m.placement_version,
             "model": m.model, "last_seen_s": round(now - m.last_seen, 3), "load": m.load}
            for m in sorted(self.members.values(), key=lambda m: m.member_id)
        ]
