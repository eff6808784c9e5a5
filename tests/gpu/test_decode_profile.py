"""The decode-step profile of a GPU worker: with the device synchronized at every section boundary, the named
sections account for the step, and the crossings to the expert hosts show up where they happen."""

from __future__ import annotations

import pytest
import torch

from shared.bench_load import prompt_ids
from shared.bench_profile import profile_system
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.profile_table import ProfileWindow, rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "small.gguf"
    make_model(path, arch="qwen3moe", preset="small", dtype="f32", seed=7, routing_skew=1.0)
    return path


@pytest.mark.parametrize("crossings", ["false", "true"])
def test_a_gpu_workers_decode_profile_accounts_for_its_steps(small, crossings):
    """8 of 32 experts per layer on the GPU, the rest on two expert hosts; two requests decoding together. Without
    decode crossings each layer's sends to the hosts and waits on them are sections; with them a layer is one
    graph replay (whole_layer), its crossings inside it."""
    prompts = [prompt_ids(list(range(3, 4000, 7)), 16, v) for v in range(32)]
    result = profile_system(str(small), ["--device", "cuda", "--expert-hosts", "2", "--hot-experts", "8",
                                         "--decode-crossings", crossings], 8, 2, prompts, 600.0)
    print(result["table"])
    w = ProfileWindow.from_dict(result["window"])
    n_layers = GGUFModel(small).config.n_layers
    entries = {p: n for p, _, n in w.sections}
    assert w.steps == 8 and entries["layer"] == 8 * n_layers
    if crossings == "false":
        assert entries["layer/attention"] == entries["layer/moe"] == 8 * n_layers
        assert 0 < entries["layer/moe/cold_send"] == entries["layer/moe/cold_wait"] <= 8 * n_layers * 2
    else:  # the first steps may take the usual path while the lanes open
        assert 0 < entries["layer/whole_layer"] == 8 * n_layers - entries.get("layer/moe", 0)
    table = {r.path: r for r in rows(w)}
    step_ms = table["step"].ms_per_step
    assert all(r.ms_per_step >= 0 for r in table.values())
    assert sum(r.ms_per_step for r in table.values() if r.depth == 1 and r.name != "other") > 0.8 * step_ms
    assert 0.25 < step_ms * result["decode_tok_s"] / 1e3 < 1.5  # the step is most of the time between tokens
