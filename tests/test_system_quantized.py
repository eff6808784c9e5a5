"""The whole system serving block-quantized GGUF files: experts converted once into the expert cache file,
mapped by every process, and computed in their served format (int4 from Q4_0, int8 from Q8_0, int4 gate and up
beside int8 down from Q4_K_M's Q6_K-down layers) on whichever path the placement gives them, against the oracle
whose routed experts run the same quantized kernels."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.client import Client
from shared.config import Config
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.quant import quantized_ffn
from shared.reference import ReferenceModel
from tests.test_decode_crossings import metrics, value

PROMPTS = [[1, 2, 3], list(range(40, 57))]
MAX_TOKENS = 8
# (expert hosts, hot experts per layer, more options); the small preset has 32 experts per layer.
PLACEMENTS = {
    "one-host": (1, 0, ()),
    "half-hot": (2, 16, ()),
    "streamed": (1, 0, ("--soft-slots", "16", "--cold-path", "stream")),
    "lanes": (2, 0, ("--decode-crossings", "true")),  # decode steps' pairs in one native call a host and layer
}
FORMATS = {"q4_0": "int4", "q8_0": "int8", "q4_k_m": "int4+int8"}  # q4_k_m: its last layer's format


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """Per GGUF type: the model file (its expert cache built next to it) and the oracle's greedy tokens."""
    out = {}
    for dtype, fmt in FORMATS.items():
        path = tmp_path_factory.mktemp(dtype) / f"small-{dtype}.gguf"
        make_model(path, preset="small", dtype=dtype, seed=5)
        model = GGUFModel(path)
        source = open_expert_source(model, Config())
        assert source.format(model.config.n_layers - 1) == fmt
        oracle = ReferenceModel(model, lambda layer, e, x, s=source: quantized_ffn(x, *s.weights(layer, e)))
        out[dtype] = path, [oracle.greedy(p, MAX_TOKENS) for p in PROMPTS]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("dtype", list(FORMATS))
def test_quantized_experts_serve_the_oracles_tokens(served, dtype, placement):
    path, expected = served[dtype]
    hosts, hot, extra = PLACEMENTS[placement]
    with RunningSystem(str(path), "--expert-hosts", str(hosts), "--hot-experts", str(hot), *extra) as system:
        with Client(system.endpoint) as client:
            for prompt, want in zip(PROMPTS, expected, strict=True):
                got = client.complete(token_ids=prompt, max_tokens=MAX_TOKENS).token_ids
                assert got == want, f"{dtype} {placement} prompt {prompt}"
            if placement == "lanes":  # every decode step's layer crossed through a lane
                lane_items = sum(value(page, "tierserve_expert_host_lane_work_total")
                                 for member, page in metrics(client).items() if member.startswith("expert-host"))
                assert lane_items >= len(PROMPTS) * (MAX_TOKENS - 1) * GGUFModel(path).config.n_layers
