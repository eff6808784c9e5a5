"""Quantized experts (int4 from Q4_0, int8 from Q8_0) on a bf16 CUDA worker against the fp32 oracle on the same
quantized weights (run on a CUDA machine: `pytest -m gpu tests/gpu`).

Hot experts are stacks of expert-cache regions in VRAM and soft slots hold streamed regions; both are computed by
the int8 / int4 kernels (Triton's and the CUDA decode kernel), the fused decode kernels up to DECODE_MAX_ROWS rows
per expert and dequantize + grouped GEMM above. The oracle runs its routed experts in fp32 on the dequantized
served weights (shared.quant.dequantize_matrix), so what is measured is the worker's arithmetic, not the
quantization.

Stated tolerances:
- every MoE call, against fp32 from the same hidden states and routing: the worst row's relative L2 error below
  2e-2: the kernels' own bound of 1e-2 (tests/gpu/test_quant_kernels.py) plus the bf16 rounding of the weighted
  sum of four experts in the dispatch;
- logits of a batched prefill then batched decode steps: relative L2 error below 5e-2, the float model's bf16 bound
  in test_gpu_paths (the bf16 trunk dominates it);
- the whole system: the served greedy tokens' log-probabilities within 0.15 nats of the oracle's, as in
  test_gpu_paths (a bf16 worker may pick other tokens than the fp32 oracle, so tokens are not compared).
The same checks on the CPU's bf16 path (torch's int8 / int4 kernels) measure MoE row errors of 6-7e-3, logit errors
of 1.5-3.4e-2 (int8 / int4) and logprob gaps of 0.03 nats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpu_worker.model import Chunk, MoEFn
from gpu_worker.service import Engine
from shared.bench_metrics import scrape_tiers, worker_metrics_url
from shared.client import Client
from shared.config import Config
from shared.expert_math import ExpertWeights
from shared.expert_source import ExpertSource, open_expert_source
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.quant import dequantize_matrix
from shared.reference import ReferenceModel, expert_ffn
from tests.quant_stacks import worst_row_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = torch.device("cuda")
FORMATS = {"q4_0": "int4", "q8_0": "int8", "q4_k_m": "int4+int8"}  # q4_k_m: its last layer's format
# Three sequences prefilled together (192 tokens x top-4 over 32 experts: some expert gets more rows than the decode
# kernels take), then decoded together one token each per step (at most 3 rows per expert).
SEQUENCES, PROMPT_LEN, DECODE_STEPS = 3, 64, 12
MOE_TOLERANCE, LOGIT_TOLERANCE, LOGPROB_TOLERANCE = 2e-2, 5e-2, 0.15
# (hot experts per layer of the small preset's 32, soft slots); slots take at least the 32 experts one layer can use
# in a step, so with LRU no expert is refused a slot (this worker has no expert host to fall back on), and fewer
# than the model's 128, so slots are evicted and refilled.
ENGINE_PLACEMENTS = {"all-hot": (32, 0), "all-streamed": (0, 48), "half-hot-half-streamed": (16, 48)}
# (options, the dispatch paths the worker's metrics must show taken); streamed experts the soft tier's policy
# refuses a slot go through the staging slots.
SYSTEM_PLACEMENTS = {
    # decode's per-layer crossings (the lanes are hot-lanes')
    "half-hot-one-host": (("--expert-hosts", "1", "--hot-experts", "16", "--decode-crossings", "false"),
                          ("hot", "cpu")),
    "streamed": (("--expert-hosts", "1", "--hot-experts", "0", "--soft-slots", "24", "--cold-path", "stream"),
                 ("streamed", "soft_hit")),
    # the experts the policy refuses a slot stay on the host (no staging slots): hot share, slots and host in a
    # layer of one decode step
    "hot-slots-host": (("--expert-hosts", "1", "--hot-experts", "8", "--soft-slots", "4", "--soft-staging", "0",
                        "--soft-policy", "decayed-lfu", "--cold-path", "stream"), ("hot", "streamed", "cpu")),
    # decode steps cross from the device through two hosts' lanes, each answered in one native call from bf16 rows
    "hot-lanes": (("--expert-hosts", "2", "--hot-experts", "8", "--decode-crossings", "true"), ("hot", "cpu")),
}


@dataclass
class Served:
    path: Path
    source: ExpertSource
    dense: list[ExpertWeights]  # per layer: fp32 stacks of every expert's gate, up and down, decoded from the cache
    oracle: ReferenceModel
    sequences: list[list[int]]
    logits: torch.Tensor  # the oracle's (SEQUENCES, DECODE_STEPS + 1, vocab) at the positions the worker returns


def dequantized(source: ExpertSource, layer: int) -> ExpertWeights:
    experts = [source.weights(layer, e) for e in range(source.model.config.n_experts)]
    return tuple(torch.stack([dequantize_matrix(w[i]) for w in experts]) for i in range(3))  # type: ignore[return-value]


def build(directory: Path, dtype: str) -> Served:
    path = directory / f"small-{dtype}.gguf"
    make_model(path, preset="small", dtype=dtype, seed=7, routing_skew=1.0)
    model = GGUFModel(path)
    source = open_expert_source(model, Config())  # builds the expert cache next to the model, for the systems too
    assert source.format(model.config.n_layers - 1) == FORMATS[dtype]
    dense = [dequantized(source, layer) for layer in range(model.config.n_layers)]
    oracle = ReferenceModel(model, lambda layer, e, x: expert_ffn(x, *(m[e] for m in dense[layer])))
    generator = torch.Generator().manual_seed(3)
    sequences = torch.randint(model.config.vocab_size, (SEQUENCES, PROMPT_LEN + DECODE_STEPS), generator=generator)
    logits = torch.stack([oracle.forward(seq)[PROMPT_LEN - 1:] for seq in sequences.tolist()])
    return Served(path, source, dense, oracle, sequences.tolist(), logits)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """served(dtype): the model of that GGUF type, made and checked by the oracle once per module."""
    return functools.cache(lambda dtype: build(tmp_path_factory.mktemp(dtype), dtype))


@pytest.fixture(scope="module")
def keep_alive() -> list[Engine]:
    """Engines stay alive for the module: a soft pool registers its map of the expert cache for DMA and never
    unregisters it, so the map must not be unmapped (and its addresses reused by the next engine's) meanwhile."""
    return []


class CheckedMoE:
    """The worker's MoE function; each call is also computed in fp32 from the same hidden states and routing on
    the dequantized served weights, recording (most rows any expert got, worst row's relative error)."""

    def __init__(self, moe: MoEFn, dense: list[ExpertWeights], decode_waits: bool = True) -> None:
        self.moe, self.dense, self.decode_waits = moe, dense, decode_waits
        self.calls: list[tuple[int, float]] = []
        self.hot_shares = 0  # calls whose hot share a decode graph's front computed

    def on_device(self, layer: int, rows: int, padded_rows: int) -> object:
        """The worker's hot share for layers with cold experts too (a decode graph's front computes it), so the
        share's result comes through __call__ and is checked with the rest; whole layers stay with __call__."""
        part = self.moe.on_device(layer, rows, padded_rows)  # type: ignore[attr-defined]
        return part if part is not None and not part.whole else None

    def __call__(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 hot: torch.Tensor | None = None, graph: object = None) -> torch.Tensor:
        from gpu_worker.quant_kernels import DECODE_MAX_ROWS

        if hot is not None:
            self.hot_shares += 1
        if self.decode_waits or h.shape[0] > DECODE_MAX_ROWS:
            out = self.moe(layer, h, weights, expert_ids, hot, graph)
        else:  # a decode step of an all-hot layer: any wait on the device raises
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = self.moe(layer, h, weights, expert_ids, hot, graph)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        want = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e in expert_ids.unique().tolist():
            token, k = (expert_ids == e).nonzero(as_tuple=True)
            y = expert_ffn(h[token].float(), *(m[e] for m in self.dense[layer]))
            want.index_add_(0, token, y * weights[token, k, None].float())
        self.calls.append((int(expert_ids.flatten().bincount().max()), worst_row_error(out, want)))
        return out


def run_engine(engine: Engine, moe: MoEFn, sequences: list[list[int]]) -> torch.Tensor:
    """All sequences prefilled in one step, then decoded together one token each per step; the logits of every
    step, (sequences, DECODE_STEPS + 1, vocab)."""
    blocks = -(-(PROMPT_LEN + DECODE_STEPS) // engine.config.kv_block_size)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(len(sequences))]
    steps = [engine.trunk.forward([Chunk(seq[:PROMPT_LEN], 0, table) for seq, table in zip(sequences, tables,
                                                                                           strict=True)], moe)]
    for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        steps.append(engine.trunk.forward([Chunk(seq[pos:pos + 1], pos, table)
                                           for seq, table in zip(sequences, tables, strict=True)], moe))
    return torch.stack(steps, dim=1).cpu()


@pytest.mark.parametrize("placement", list(ENGINE_PLACEMENTS))
@pytest.mark.parametrize("dtype", list(FORMATS))
def test_bf16_worker_with_quantized_experts_matches_the_oracle(served, keep_alive, dtype, placement):
    from gpu_worker.quant_kernels import DECODE_MAX_ROWS  # needs triton, which CUDA builds of torch bring

    s = served(dtype)
    cfg = s.source.model.config
    hot, slots = ENGINE_PLACEMENTS[placement]
    config = Config(model=str(s.path), device=DEVICE.type, dtype="bfloat16", soft_slots=slots, soft_policy="lru",
                    cold_path="stream")
    engine = Engine(config, GGUFModel(s.path), remote=None)  # every cold expert is streamed: no host is needed
    keep_alive.append(engine)
    engine.apply(round_robin_placement(cfg, hot, 0 if hot == cfg.n_experts else 1))
    moe = CheckedMoE(engine.moe, [tuple(m.to(DEVICE) for m in layer) for layer in s.dense],
                     decode_waits=hot < cfg.n_experts)
    got = run_engine(engine, moe, s.sequences)

    decode = [err for rows, err in moe.calls if rows <= DECODE_MAX_ROWS]
    prefill = [err for rows, err in moe.calls if rows > DECODE_MAX_ROWS]
    assert decode and prefill, "both kernel regimes must have run"
    relative = ((got - s.logits).norm() / s.logits.norm()).item()
    print(f"{dtype} {placement}: worst MoE row error {max(decode):.2e} decode, {max(prefill):.2e} prefill; "
          f"relative logit error {relative:.2e}")
    assert max(decode + prefill) < MOE_TOLERANCE
    assert relative < LOGIT_TOLERANCE
    # with cold experts beside the hot ones, decode graphs compute the hot share (kernels from device counts), and
    # the slots' experts in graphs of their own
    assert (moe.hot_shares > 0) == (0 < hot < cfg.n_experts)
    assert any(b.moe_graphs for b in engine.trunk.graphs.batches.values()) == (slots > 0)
    if slots:
        tier = engine.pool.tier
        print(f"soft tier: {tier.hits} hits, {tier.misses} misses, {tier.evictions} evictions")
        assert tier.hits > 0 and tier.evictions > 0, "slots must be both reused and refilled"


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_all_hot_quantized_decode_in_whole_layer_graphs_matches_the_oracle(served, keep_alive, dtype):
    """Every expert hot: decode steps capture whole layers (the int8 / int4 decode kernels from counts on the
    device, inside the graph); logits within the same tolerance as the layer-by-layer path."""
    s = served(dtype)
    cfg = s.source.model.config
    engine = Engine(Config(model=str(s.path), device=DEVICE.type, dtype="bfloat16"), GGUFModel(s.path), remote=None)
    keep_alive.append(engine)
    engine.apply(round_robin_placement(cfg, cfg.n_experts, 0))
    got = run_engine(engine, engine.moe, s.sequences)
    graphs = engine.trunk.graphs
    assert graphs is not None and graphs.capture
    assert any(len(b.whole_graphs) == cfg.n_layers for b in graphs.batches.values())
    relative = ((got - s.logits).norm() / s.logits.norm()).item()
    print(f"{dtype} all hot, whole-layer graphs: relative logit error {relative:.2e}")
    assert relative < LOGIT_TOLERANCE


@pytest.mark.parametrize("placement", list(SYSTEM_PLACEMENTS))
def test_bf16_system_with_q4_0_experts_logprobs_match_the_oracle(served, placement):
    s = served("q4_0")
    options, paths = SYSTEM_PLACEMENTS[placement]
    prompt = s.sequences[0][:PROMPT_LEN]  # one prefill chunk of 64 tokens, then decode
    with RunningSystem(str(s.path), "--device", DEVICE.type, "--dtype", "bfloat16", *options) as system, \
            Client(system.endpoint) as client:
        result = client.complete(token_ids=prompt, max_tokens=16, logprobs=1)
        pairs = scrape_tiers(worker_metrics_url(client.health(), system.endpoint)).pairs
    print(f"q4_0 {placement}: routed pairs by path {pairs}")
    assert all(pairs[path] > 0 for path in paths), f"expected pairs on {paths}"
    reference = s.oracle.forward(prompt + result.token_ids).log_softmax(-1)
    want = [reference[len(prompt) - 1 + i, t].item() for i, t in enumerate(result.token_ids)]
    worst = max(abs(a - b) for a, b in zip(result.logprobs, want, strict=True))
    print(f"q4_0 {placement}: worst logprob gap {worst:.3f} nats")
    assert worst < LOGPROB_TOLERANCE
