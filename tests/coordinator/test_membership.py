"""Liveness, readiness and welcome decisions of the membership table, and the placement the coordinator starts with."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.membership import REPLACED_KEPT_S, HeartbeatOutcome, Membership, startup_placement
from gpu_worker.experts import HotExperts
from shared.config import Config
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.model_config import ModelConfig
from shared.placement import round_robin_placement
from shared.process import worker_device, worker_dtype
from shared.protocol import Heartbeat

CFG = ModelConfig(arch="qwen3moe", n_layers=2, hidden=8, n_heads=2, n_kv_heads=1, head_dim=4, n_experts=4,
                  n_experts_used=2, expert_ffn=4, vocab_size=16, context_length=32, rope_base=1e4, norm_eps=1e-6)


MODEL = "1000 bytes, 0123456789abcdef"


def beat(member_id: str, version: int, pid: int = 100, load: dict | None = None, model: str = MODEL,
         incarnation: str | None = None, host: str = "node-a") -> Heartbeat:
    """A heartbeat; unless `incarnation` says otherwise, each pid is one process start."""
    role = "gpu_worker" if member_id == "gpu-worker" else "expert_host"
    return Heartbeat(member_id=member_id, role=role, incarnation=incarnation or f"pid {pid}", pid=pid, host=host,
                     metrics_port=9000, placement_version=version, model=model, load=load or {})


@pytest.fixture
def members() -> Membership:
    return Membership(round_robin_placement(CFG, hot_per_layer=2, n_hosts=2, version=3), timeout_s=2.0, model=MODEL,
                      interval_s=0.5, tick_s=0.1)


def test_a_new_or_restarted_process_is_welcomed_until_it_reports_the_placement(members):
    first = members.heartbeat(beat("gpu-worker", 0), now=0.0)
    assert (first.welcome, first.joined, first.restarted) == (True, True, False)
    again = members.heartbeat(beat("gpu-worker", 0), now=0.5)  # still applying: welcomed again, not joined again
    assert (again.welcome, again.joined) == (True, False)
    applied = members.heartbeat(beat("gpu-worker", 3), now=1.0)
    assert (applied.welcome, applied.joined) == (False, False)
    restarted = members.heartbeat(beat("gpu-worker", 0, pid=200), now=1.5)
    assert (restarted.welcome, restarted.joined, restarted.restarted) == (True, True, True)


def test_a_process_restarted_under_the_same_pid_is_known_by_its_incarnation(members):
    """In a container a role restarts as the same pid (1, or its init's child)."""
    members.heartbeat(beat("gpu-worker", 0, pid=1, incarnation="a"), now=0.0)
    assert not members.heartbeat(beat("gpu-worker", 0, pid=1, incarnation="a"), now=0.5).restarted  # still applying
    members.heartbeat(beat("gpu-worker", 3, pid=1, incarnation="a"), now=1.0)
    again = members.heartbeat(beat("gpu-worker", 0, pid=1, incarnation="b"), now=1.5)
    assert (again.welcome, again.joined, again.restarted) == (True, True, True)


def test_a_second_process_under_a_member_id_takes_it_over_and_the_first_is_told_to_stop(members):
    """Started twice, both run: the first heartbeated on unheard, for ever. The later one is the member now (as a
    restarted one is, at once); the first's heartbeats are each answered that it must stop and count for nothing,
    its placement and liveness included."""
    members.heartbeat(beat("gpu-worker", 3, pid=100), now=0.0)
    took = members.heartbeat(beat("gpu-worker", 0, pid=200, host="node-b"), now=1.0)
    assert (took.welcome, took.joined, took.restarted, took.superseded_by) == (True, True, True, None)
    told = members.heartbeat(beat("gpu-worker", 3, pid=100), now=1.2)
    assert (told.welcome, told.joined, told.restarted, told.first_notice) == (False, False, False, True)
    assert (told.superseded_by.pid, told.superseded_by.host) == (200, "node-b")
    assert members.missing()[0] == "gpu-worker is applying placement v3"
    again = members.heartbeat(beat("gpu-worker", 3, pid=100), now=1.7)
    assert again.superseded_by is members.members["gpu-worker"] and not again.first_notice
    assert not members.heartbeat(beat("gpu-worker", 3, pid=200, host="node-b"), now=2.0).restarted
    assert "gpu-worker" not in " ".join(members.missing())
    for now in (2.5, 3.0, 3.5, 4.0, 4.5):  # the first runs on; the second falls silent after 2.0
        assert members.heartbeat(beat("gpu-worker", 3, pid=100), now=now).superseded_by is not None
        members.expire(now)
    assert not members.is_alive("gpu-worker") and members.members["gpu-worker"].pid == 200


def test_a_second_process_on_another_model_file_takes_no_id_over_from_a_live_member(members):
    """It took the id over and the first was told to stop, though the second, on another file, is sent no
    placement: the id was left with no process serving it. Its heartbeats go unanswered (not refused: it may be the
    member restarted onto a new file before its predecessor was found lost), and once the first is gone it joins,
    as a restart does."""
    members.heartbeat(beat("expert-host-1", 3, pid=100), now=0.0)
    other = beat("expert-host-1", 0, pid=200, host="node-b", model="9 bytes, fedcba9876543210")
    deferred = members.heartbeat(other, now=0.5)
    assert deferred == HeartbeatOutcome(
        deferred=f"expert-host-1 is served by pid 100 on node-a, on this system's model ({MODEL}), and pid 200 on "
                 "node-b serves another (9 bytes, fedcba9876543210): it is let in once the first is lost",
        first_notice=True)
    assert not members.heartbeat(other, now=0.7).first_notice
    kept = members.heartbeat(beat("expert-host-1", 3, pid=100), now=1.0)
    assert kept.superseded_by is None and members.members["expert-host-1"].pid == 100
    members.expire(3.5)  # the first is gone
    joined = members.heartbeat(other, now=3.6)
    assert (joined.refused, joined.joined, joined.welcome) == ("", True, False)


def test_a_replaced_process_is_forgotten_once_silent_for_an_hour(members):
    """A quick restart leaves its predecessor's incarnation behind: kept, every restart would add one for good."""
    members.heartbeat(beat("expert-host-0", 3, pid=100), now=0.0)
    members.heartbeat(beat("expert-host-0", 0, pid=200), now=0.5)
    members.expire(now=REPLACED_KEPT_S)
    assert list(members.replaced) == [("expert-host-0", "pid 100")]
    members.expire(now=REPLACED_KEPT_S + 0.1)
    assert members.replaced == {}


@pytest.mark.parametrize("member_id, role", [("expert-host-2", "expert_host"), ("gpu-worker", "expert_host"),
                                             ("expert-host-0", "gpu_worker"), ("", "expert_host")])
def test_a_heartbeat_of_no_member_of_this_system_is_refused_by_name(members, member_id, role):
    """The placement has two hosts: a third (another configuration's), or an id in the wrong role, was listed as a
    member (in health, for ever) and welcomed with the placement."""
    hb = dataclasses.replace(beat("gpu-worker", 0), member_id=member_id, role=role)
    outcome = members.heartbeat(hb, now=0.0)
    assert outcome.refused == (f"{member_id!r} as {role!r} is not a member of this system: its members are gpu-worker "
                               "(gpu_worker), expert-host-0 (expert_host), expert-host-1 (expert_host)")
    assert not (outcome.welcome or outcome.joined) and members.members == {}
    assert outcome.first_notice and not members.heartbeat(hb, now=0.5).first_notice  # named in the log once
    members.expire(now=4.0)  # silent past the timeout: forgotten
    assert members.refused == {}


def test_a_replaced_incarnation_under_another_member_id_is_that_ids_own(members):
    """Looked up by incarnation alone, a replaced process's incarnation sent under another id raised KeyError (a
    traceback for every such message)."""
    members.heartbeat(beat("expert-host-0", 3, incarnation="a"), now=0.0)
    members.heartbeat(beat("expert-host-0", 3, incarnation="b"), now=0.1)
    outcome = members.heartbeat(beat("expert-host-1", 0, incarnation="a"), now=0.2)
    assert (outcome.joined, outcome.superseded_by) == (True, None)
    assert members.heartbeat(beat("expert-host-0", 3, incarnation="a"), now=0.3).superseded_by.incarnation == "b"


def test_a_process_found_lost_while_paused_does_not_take_its_id_back_from_its_successor(members):
    """Stopped (SIGSTOP) past the timeout, it was lost, and another process took its id; when it runs again its
    heartbeats are answered that it must stop: handed the id back, it stopped the successor, which nothing restarts."""
    members.heartbeat(beat("expert-host-0", 3, pid=100), now=0.0)
    assert [m.member_id for m in members.expire(now=2.5)] == ["expert-host-0"]
    assert members.heartbeat(beat("expert-host-0", 0, pid=200), now=3.0).joined
    members.heartbeat(beat("expert-host-0", 3, pid=200), now=3.5)
    for now in (3.7, 4.0, 4.5):
        members.expire(now)
    resumed = members.heartbeat(beat("expert-host-0", 3, pid=100), now=60.0)
    assert resumed.superseded_by is not None and resumed.superseded_by.pid == 200
    assert members.members["expert-host-0"].pid == 200


def test_a_replaced_process_heard_after_the_coordinator_was_stopped_is_still_told_to_stop(members):
    """The coordinator stopped (SIGSTOP) past the timeout: the replaced process's heartbeats sent meanwhile are
    still unread, and must not find it forgotten and hand it its member id back."""
    members.heartbeat(beat("gpu-worker", 3, pid=100), now=0.0)
    members.heartbeat(beat("gpu-worker", 0, pid=200), now=0.4)
    assert members.expire(now=0.5) == []
    assert members.expire(now=10.5) == []  # stopped for 10 s after the tick at 0.5
    assert members.heartbeat(beat("gpu-worker", 3, pid=100), now=10.55).superseded_by.pid == 200


def test_members_not_heard_from_within_the_timeout_are_lost_once(members):
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=1.0)
    assert members.expire(now=2.0) == []
    lost = members.expire(now=2.5)
    assert [m.member_id for m in lost] == ["gpu-worker"]
    assert members.expire(now=2.6) == []
    assert not members.is_alive("gpu-worker") and members.is_alive("expert-host-0")
    back = members.heartbeat(beat("gpu-worker", 3), now=3.0)
    assert back.joined and not back.restarted and members.is_alive("gpu-worker")


def test_time_the_coordinator_did_not_run_counts_against_no_member(members):
    """Stopped (SIGSTOP, a frozen container) past the timeout, the coordinator's first tick found every member
    lost while the heartbeats they had sent meanwhile were still unread in its socket. A member that is really gone
    is still found lost, a timeout of the coordinator's own running time after it was last heard from."""
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=0.4)
    assert members.expire(now=0.5) == []
    assert members.expire(now=10.5) == []  # stopped for 10 s after the tick at 0.5
    members.heartbeat(beat("expert-host-0", 3), now=10.55)  # the host's queued heartbeats are read; not the worker's
    ticks = [round(10.6 + 0.1 * i, 1) for i in range(20)]
    lost_at = {m.member_id: now for now in ticks for m in members.expire(now)}
    assert lost_at == {"gpu-worker": 12.0}  # silent 0.5 s before the stop, a tick's period for it, 1.5 s after
    assert members.is_alive("expert-host-0")


def test_a_heartbeat_read_after_a_stop_before_the_late_tick_does_not_make_the_stop_count(members):
    """Resumed after a stop, the loop read one member's queued heartbeat before its late tick: the tick took the
    loop for one that had been running, and found every other member lost."""
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=0.4)
    assert members.expire(now=0.5) == []
    members.heartbeat(beat("expert-host-0", 3), now=10.45)  # stopped for 10 s after the tick at 0.5
    ticks = [round(10.5 + 0.1 * i, 1) for i in range(20)]
    lost_at = {m.member_id: now for now in ticks for m in members.expire(now)}
    assert lost_at == {"gpu-worker": 11.9}  # still found lost: 2 s of the coordinator's own running time
    assert members.is_alive("expert-host-0")


def test_a_heartbeat_read_between_the_last_tick_and_a_stop_does_not_make_the_stop_count(members):
    """A heartbeat read after the last tick before the stop meant "heard since the last tick": the late tick
    after the stop took the loop for one that had been running, and found every member lost (the paused
    coordinator test's failures in tests/coordinator/test_end_to_end.py)."""
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=0.4)
    assert members.expire(now=0.5) == []
    members.heartbeat(beat("expert-host-0", 3), now=0.55)  # then stopped for 10 s
    assert members.expire(now=10.55) == []
    assert members.is_alive("gpu-worker") and members.is_alive("expert-host-0")


def test_a_slow_coordinator_still_finds_a_dead_member_lost_within_its_timeout(members):
    """Ticks 1 s apart, late every time, while a live host's heartbeats are read between them: the time counts.
    Credited as a stop, it let the dead worker be found lost after 20 ticks, 20 s."""
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    lost_at = {}
    for second in range(1, 8):
        members.heartbeat(beat("expert-host-0", 3), now=second - 0.5)
        lost_at.update({m.member_id: second for m in members.expire(now=float(second))})
    assert lost_at == {"gpu-worker": 3}  # a timeout of 2 s


def test_ready_needs_the_worker_and_every_host_in_use_alive_with_the_current_placement(members):
    assert members.missing() == ["gpu-worker has not joined", "expert-host-0 has not joined",
                                 "expert-host-1 has not joined"]
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=0.0)
    members.heartbeat(beat("expert-host-1", 0), now=0.0)
    assert members.missing() == ["expert-host-1 is applying placement v3"] and not members.ready()
    members.heartbeat(beat("expert-host-1", 3), now=1.0)
    assert members.ready()
    members.expire(now=2.5)
    assert members.missing() == ["gpu-worker is not responding", "expert-host-0 is not responding"]


def test_hosts_the_placement_does_not_use_are_not_needed():
    members = Membership(round_robin_placement(CFG, hot_per_layer=4, n_hosts=2), timeout_s=1.0, model=MODEL,
                         interval_s=0.25, tick_s=0.1)
    assert members.required() == ["gpu-worker"]
    members.heartbeat(beat("gpu-worker", 1), now=0.0)
    assert members.ready()


def test_snapshot_lists_each_member_for_health(members):
    members.heartbeat(beat("expert-host-1", 3, pid=7, load={"queue": 2}), now=10.0)
    members.heartbeat(beat("gpu-worker", 0, pid=8), now=10.5)
    snap = members.snapshot(now=11.0)
    assert [m["member_id"] for m in snap] == ["expert-host-1", "gpu-worker"]
    assert snap[0] == {"member_id": "expert-host-1", "role": "expert_host", "pid": 7, "host": "node-a",
                       "incarnation": "pid 7", "metrics_port": 9000, "alive": True, "placement_version": 3,
                       "model": MODEL, "last_seen_s": 1.0,
                       "load": {"queue": 2}}


def test_startup_placement_takes_hot_experts_or_fills_the_budget(tiny_model):
    model = GGUFModel(tiny_model)
    cfg = model.config
    one = model.expert_nbytes(0)
    assert one == 3 * cfg.hidden * cfg.expert_ffn * 4  # gate, up and down of one expert in f32
    fixed = startup_placement(model, Config(model=str(tiny_model), hot_experts=3, expert_hosts=2))
    assert [len(fixed.hot(layer)) for layer in range(cfg.n_layers)] == [3] * cfg.n_layers
    assert fixed.hosts_in_use() == [0, 1] and 1 <= fixed.version < 2**31
    again = startup_placement(model, Config(model=str(tiny_model), hot_experts=3, expert_hosts=2))
    assert again.version == fixed.version, "a coordinator restarted as it was does not make members load it again"
    budget = 2 * one * cfg.n_layers + one  # room for 2 per layer, not 3
    by_budget = startup_placement(model, Config(model=str(tiny_model), gpu_expert_budget=budget, expert_hosts=1,
                                                device="cpu"))  # a float32 worker: it holds the f32 experts as stored
    assert by_budget.count_hot() == 2 * cfg.n_layers
    everything = startup_placement(model, Config(model=str(tiny_model), gpu_expert_budget=10**12, expert_hosts=0))
    assert everything.count_hot() == cfg.n_experts * cfg.n_layers and everything.hosts_in_use() == []


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "auto"), ("cpu", "bfloat16")])
def test_the_hot_experts_a_budget_places_fit_it_as_the_worker_holds_them(tmp_path, device, dtype):
    """A float expert is held in the worker's dtype, not the file's: a bf16 file's experts on a float32 worker
    take twice their stored bytes, which a budget counted in stored bytes let through at twice its size."""
    path = tmp_path / "tiny-bf16.gguf"
    make_model(path, preset="tiny", dtype="bf16", seed=0)
    model = GGUFModel(path)
    cfg = model.config
    config = Config(model=str(path), device=device, dtype=dtype, expert_hosts=1,
                    gpu_expert_budget=2 * cfg.expert_params * 4 * cfg.n_layers)  # 2 float32 experts a layer
    placement = startup_placement(model, config)
    hot = HotExperts(ExpertSource(model, None), worker_device(config), worker_dtype(config, worker_device(config)))
    hot.apply(placement)
    assert hot.nbytes <= config.gpu_expert_budget
    # and as many as fit: a bf16 worker holds twice as many in the same bytes
    assert placement.count_hot() == cfg.n_layers * (2 if dtype == "auto" else 4)


def test_a_restarted_coordinator_with_another_placement_welcomes_members_again(tiny_model):
    """Its version comes from what it says: members still holding the last start's are sent the new one."""
    model = GGUFModel(tiny_model)
    old = startup_placement(model, Config(model=str(tiny_model), hot_experts=3, expert_hosts=2))
    new = startup_placement(model, Config(model=str(tiny_model), hot_experts=4, expert_hosts=2))
    assert new.version != old.version
    members = Membership(new, timeout_s=2.0, model=model.identity, interval_s=0.5, tick_s=0.1)
    assert members.heartbeat(beat("gpu-worker", old.version, model=model.identity), now=0.0).welcome


def test_a_member_serving_another_model_file_keeps_the_system_from_being_ready(members):
    members.heartbeat(beat("gpu-worker", 3), now=0.0)
    members.heartbeat(beat("expert-host-0", 3), now=0.0)
    members.heartbeat(beat("expert-host-1", 3, model="9 bytes, fedcba9876543210"), now=0.0)
    assert members.missing() == [f"expert-host-1 serves another model (9 bytes, fedcba9876543210) than the "
                                 f"coordinator ({MODEL}): restart whichever is on the old file"]


def test_a_member_serving_another_model_file_is_sent_no_placement(members):
    """The placement's layers and experts are the coordinator's model's: applied by a member on another file, it
    crashed the member. Restarted on the coordinator's file, the member is welcomed."""
    other = beat("expert-host-1", 0, model="9 bytes, fedcba9876543210")
    first = members.heartbeat(other, now=0.0)
    assert (first.welcome, first.joined) == (False, True)
    assert not members.heartbeat(other, now=0.5).welcome
    assert "expert-host-1 serves another model" in members.missing()[-1]
    restarted = members.heartbeat(beat("expert-host-1", 0, pid=200), now=1.0)
    assert (restarted.welcome, restarted.joined, restarted.restarted) == (True, True, True)
