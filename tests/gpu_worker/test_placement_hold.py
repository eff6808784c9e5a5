"""A placement the worker cannot hold is refused, said in the log, instead of failing every step after it."""

from __future__ import annotations

import logging

import pytest
import torch

from gpu_worker.experts import HotExperts
from gpu_worker.service import hold
from shared.config import Config
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
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


@pytest.mark.parametrize(("dtype", "worker_dtype"), [("f32", torch.float32), ("f16", torch.bfloat16), ("q8_0", None)])
def test_the_ram_a_placement_adds_is_what_the_hot_experts_then_hold(tmp_path, dtype, worker_dtype):
    """Float experts are copied in the worker's dtype (stacked in bf16), quantized ones on a CPU are views of the
    expert cache file: no RAM of the worker's. Replacing a layer's set frees the old one first."""
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype=dtype, seed=3)
    model = GGUFModel(path)
    cfg = model.config
    hot = HotExperts(open_expert_source(model, Config(model=str(path), expert_cache_dir=str(tmp_path))),
                     torch.device("cpu"), worker_dtype or torch.float32)
    placement = round_robin_placement(cfg, 3, 1)
    added = hot.added_nbytes(placement)
    hot.apply(placement)
    assert added == hot.nbytes
    assert (added == 0) == (dtype == "q8_0")
    fewer = round_robin_placement(cfg, 2, 1)
    assert hot.added_nbytes(fewer) == 0 and hot.added_nbytes(round_robin_placement(cfg, 4, 1)) == added // 3
