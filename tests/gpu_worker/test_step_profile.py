"""The step profile: the accumulator's arithmetic on a clock the test moves, the table made from a window, the
engine's own decode steps profiled in process, and a whole system's profile read back through its stats."""

from __future__ import annotations

import pytest

from gpu_worker.scheduler import SamplingParams, Sequence
from gpu_worker.service import Engine
from gpu_worker.step_profile import StepProfile, section
from shared.bench_load import prompt_ids
from shared.bench_profile import profile_system
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.profile_table import ProfileWindow, format_table, rows
from shared.protocol import Heartbeat, decode, encode


class Clock:
    """A clock that moves only when told; counts the synchronizations asked for."""

    def __init__(self) -> None:
        self.now, self.syncs = 100.0, 0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sync(self) -> None:
        self.syncs += 1


def fake_step(profile: StepProfile, clock: Clock, layers: int = 2) -> None:
    """One step: 1 s before anything, schedule 2 s; per layer attention 3 s, moe 1 s around a 4 s wait, 0.5 s
    of the layer outside both; 1 s at the end. 21 s with two layers."""
    with profile.step():
        clock.advance(1)
        with section("schedule"):
            clock.advance(2)
        for _ in range(layers):
            with section("layer"):
                with section("attention"):
                    clock.advance(3)
                with section("moe"):
                    with section("cold_wait"):
                        clock.advance(4)
                    clock.advance(1)
                clock.advance(0.5)
        clock.advance(1)


def by_path(window: ProfileWindow) -> dict:
    return {r.path: r for r in rows(window)}


def test_sections_nest_and_sum_over_a_window():
    clock = Clock()
    profile = StepProfile(2, sync=clock.sync, clock=clock)
    fake_step(profile, clock)
    assert profile.latest is None and profile.windows == 0  # the window is not full yet
    fake_step(profile, clock)
    w = profile.latest
    assert (w.index, w.steps, w.step_s) == (1, 2, pytest.approx(42))
    assert [(p, n) for p, _, n in w.sections] == [("schedule", 2), ("layer/attention", 4), ("layer/moe/cold_wait", 4),
                                                 ("layer/moe", 4), ("layer", 4)]
    assert dict((p, s) for p, s, _ in w.sections) == pytest.approx(
        {"schedule": 4, "layer/attention": 12, "layer/moe/cold_wait": 16, "layer/moe": 20, "layer": 34})
    # a boundary of a step or section synchronizes once: 2 steps x (1 + 1 + 2 x (1 + 1 + 1 + 1)) x 2 boundaries
    assert clock.syncs == 2 * 2 * (2 + 2 * 4)


def test_rows_give_ms_per_step_per_layer_share_and_what_is_outside_the_sections():
    clock = Clock()
    profile = StepProfile(2, clock=clock)
    for _ in range(2):
        fake_step(profile, clock)
    table = by_path(profile.latest)
    assert list(table) == ["step", "schedule", "layer", "layer/attention", "layer/moe", "layer/moe/cold_wait",
                           "layer/moe/other", "layer/other", "other"]
    expected = {  # ms per step, ms per layer (two layers a step)
        "step": (21e3, None), "schedule": (2e3, None), "layer": (17e3, 8.5e3), "layer/attention": (6e3, 3e3),
        "layer/moe": (10e3, 5e3), "layer/moe/cold_wait": (8e3, 4e3), "layer/moe/other": (2e3, 1e3),
        "layer/other": (1e3, 0.5e3), "other": (2e3, None)}
    for path, (ms, per_layer) in expected.items():
        row = table[path]
        assert row.ms_per_step == pytest.approx(ms), path
        assert row.ms_per_layer == (None if per_layer is None else pytest.approx(per_layer)), path
        assert row.share == pytest.approx(ms / 21e3), path
    assert [table[p].depth for p in ("step", "schedule", "layer/moe", "layer/moe/other")] == [0, 1, 2, 3]
    text = format_table(profile.latest)
    assert "      cold_wait" in text and text.count("\n") == len(table)  # a header and one line per row


def test_windows_follow_each_other_and_discarded_or_failed_steps_are_left_out():
    clock = Clock()
    profile = StepProfile(1, clock=clock)
    with profile.step() as step:  # a step that is not a decode step
        with section("schedule"):
            clock.advance(5)
        step.discard()
    assert profile.latest is None
    with pytest.raises(RuntimeError), profile.step(), section("layer"):
        clock.advance(5)
        raise RuntimeError("a failed step")
    assert profile.latest is None
    with section("layer"):  # outside a step: nothing is recorded, whatever the time
        clock.advance(5)
    fake_step(profile, clock, layers=1)
    fake_step(profile, clock, layers=3)
    assert profile.windows == 2
    assert profile.latest.index == 2 and profile.latest.step_s == pytest.approx(4 + 3 * 8.5)
    assert by_path(profile.latest)["layer"].ms_per_layer == pytest.approx(8.5e3)


def test_an_inactive_profile_hands_out_one_object_that_does_nothing():
    profile = StepProfile(0)
    assert not profile.on
    step = profile.step()
    with step as entered, section("layer") as inner:
        entered.discard()
        assert section("moe") is step is inner is entered  # no allocation per section while off
    assert profile.latest is None and profile.windows == 0
    with pytest.raises(ValueError):
        StepProfile(-1)


def test_a_window_travels_in_a_heartbeat_unchanged():
    clock = Clock()
    profile = StepProfile(1, clock=clock)
    fake_step(profile, clock)
    beat = Heartbeat(member_id="gpu-worker", role="gpu_worker", incarnation="i", pid=1, host="h", metrics_port=0,
                     placement_version=1, model="m", load={"running": 0, "profile": profile.latest.to_dict()})
    received = ProfileWindow.from_dict(decode(encode(beat)).load["profile"])
    assert received == profile.latest


# --- real steps -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.gguf"
    make_model(path, arch="qwen2moe", preset="tiny", dtype="f32", seed=1)  # qwen2moe: it has a shared expert
    return path


def test_the_engine_profiles_its_decode_steps_only(tiny):
    model = GGUFModel(tiny)
    cfg = model.config
    engine = Engine(Config(model=str(tiny), device="cpu", expert_hosts=0, profile_steps=3), model, None)
    engine.apply(round_robin_placement(cfg, cfg.n_experts, 0))
    engine.scheduler.add(Sequence("r", [5, 6, 7, 8], SamplingParams(max_tokens=8)))
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
    assert steps == 8  # the prompt's step, then 7 decode steps: two windows of 3, the prompt's step left out
    assert engine.profile.windows == 2
    w = engine.profile.latest
    entries = {p: n for p, _, n in w.sections}
    assert entries["layer"] == entries["layer/moe"] == entries["layer/shared_expert"] == 3 * cfg.n_layers
    assert {p: n for p, n in entries.items() if "/" not in p} == {
        "schedule": 3, "prepare": 3, "layer": 3 * cfg.n_layers, "lm_head": 3, "sampling": 3, "postprocess": 3}
    table = rows(w)
    assert all(r.ms_per_step >= 0 for r in table)
    named = sum(r.ms_per_step for r in table if r.depth == 1 and r.name != "other")
    assert named <= table[0].ms_per_step and named > 0.8 * table[0].ms_per_step  # the sections are most of it
    assert engine.load()["profile"] == w.to_dict()


@pytest.mark.slow
def test_a_running_systems_profile_covers_its_decode_steps_and_the_crossings(tiny):
    """Two hot experts per layer, the rest on two expert hosts: every layer sends to a host and waits for it."""
    prompts = [prompt_ids(list(range(3, 200)), 8, v) for v in range(32)]
    result = profile_system(str(tiny), ["--expert-hosts", "2", "--hot-experts", "2"], 4, 2, prompts, 180.0)
    w = ProfileWindow.from_dict(result["window"])
    layers = GGUFModel(tiny).config.n_layers
    assert w.steps == 4 and result["concurrency"] == 2
    entries = {p: n for p, _, n in w.sections}
    assert entries["layer"] == 4 * layers
    # two tokens, top-2 of 8 experts, 6 of them cold on two hosts: a layer crosses to one host or both
    assert 0 < entries["layer/moe/cold_send"] == entries["layer/moe/cold_wait"] <= 4 * layers * 2
    table = {r.path: r for r in rows(w)}
    assert table["layer/moe/cold_wait"].ms_per_step > 0 and table["layer/moe/cold_send"].ms_per_step > 0
    step_ms = table["step"].ms_per_step
    # the named sections make up most of the step, and the step is most of the time between two tokens
    assert sum(r.ms_per_step for r in table.values() if r.depth == 1 and r.name != "other") > 0.8 * step_ms
    print(f"profiled step {step_ms:.2f} ms, {1e3 / result['decode_tok_s']:.2f} ms between tokens")
    assert 0.25 < step_ms * result["decode_tok_s"] / 1e3 < 1.5
    assert result["table"] == format_table(w)
