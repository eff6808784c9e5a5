"""A placement whose hot experts do not fit in the GPU's free memory is refused by name, before anything of it is
loaded, and the worker holds one that fits (run on a CUDA machine: `pytest -m gpu tests/gpu`)."""

from __future__ import annotations

import logging

import pytest
import torch

from gpu_worker.service import Engine, hold
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_hot_experts_beyond_the_gpus_free_memory_are_refused_by_name(tmp_path, caplog):
    """It died of CUDA's out-of-memory error, a traceback, part way through loading the layers."""
    path = tmp_path / "small.gguf"
    make_model(path, preset="small", dtype="f32", seed=3)
    engine = Engine(Config(model=str(path), device="cuda", dtype="bfloat16", expert_hosts=0), GGUFModel(path), None)
    cfg = engine.model.config
    placement = round_robin_placement(cfg, cfg.n_experts, 0, version=5)
    need = engine.hot.added_nbytes(placement)
    assert need >= 32 << 20  # well above the allocator's 2 MB rounding
    log = logging.getLogger("gpu_worker.test")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free - need // 2, dtype=torch.uint8, device="cuda")
    try:
        with caplog.at_level(logging.ERROR, logger=log.name):
            assert not hold(engine, placement, log)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert f"cannot hold placement v5: its hot experts need {need / 1e6:.1f} MB more of GPU memory" in caplog.text
    assert engine.placement_version == 0 and engine.hot.nbytes == 0
    assert hold(engine, placement, log)
    assert engine.placement_version == 5 and engine.hot.nbytes == need
