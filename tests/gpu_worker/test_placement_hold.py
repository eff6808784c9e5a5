"""A placement the worker cannot hold is refused, said in the log, instead of failing every step after it."""

from __future__ import annotations

import logging

from gpu_worker.service import hold
from shared.placement import round_robin_placement
from tests.gpu_worker.test_engine_keep_alive import tiny_engine


def test_a_placement_giving_experts_to_a_host_the_worker_has_no_socket_to_is_refused(tmp_path, caplog):
    """A coordinator started with more expert_hosts than the worker: each step that reached the extra host failed
    with an IndexError (internal_error to every request in it) while the system said it was ready."""
    engine = tiny_engine(tmp_path)  # expert_hosts = 0
    cfg = engine.model.config
    log = logging.getLogger("gpu_worker.test")
    with caplog.at_level(logging.ERROR, logger=log.name):
        assert not hold(engine, round_robin_placement(cfg, 2, 1, version=9), log)
    assert "it gives experts to expert host 0, and this worker was started with expert_hosts = 0" in caplog.text
    assert engine.placement_version == 0
    assert hold(engine, round_robin_placement(cfg, cfg.n_experts, 0, version=10), log)
    assert engine.placement_version == 10
