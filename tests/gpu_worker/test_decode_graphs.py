"""The static buffers a decode graph replays over, run eagerly on the CPU: several sequences of different
lengths decoding together, padded to the batch and context buckets, give each sequence the oracle's logits,
and the padding rows write nowhere but the spare KV slot."""

from __future__ import annotations

import torch

from gpu_worker.decode_graphs import MIN_CONTEXT, bucket
from gpu_worker.experts import HotExperts, MoEDispatch
from gpu_worker.model import Chunk, Trunk
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel

CPU = torch.device("cpu")


def test_bucket_is_the_power_of_two_at_or_above():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]
    assert bucket(3, MIN_CONTEXT) == MIN_CONTEXT and bucket(MIN_CONTEXT + 1, MIN_CONTEXT) == 2 * MIN_CONTEXT


def test_padded_static_decode_gives_every_sequence_the_oracles_logits(tmp_path):
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=11)
    model = GGUFModel(path)
    cfg = model.config
    placement = round_robin_placement(cfg, cfg.n_experts, 0)
    hot = HotExperts(ExpertSource(model, None), CPU, torch.float32)
    hot.apply(placement)
    moe = MoEDispatch(placement, hot, None)
    trunk = Trunk(model, CPU, torch.float32, num_blocks=32, block_size=4, decode_graphs=True)
    assert trunk.graphs is not None
    assert trunk.graphs.fits(1, 32768) and not trunk.graphs.fits(3, 16385)  # larger steps run eagerly
    # three sequences (a batch bucket of 4: one padding row), prompts of 5, 9 and 62 tokens (the last one's
    # context grows past the smallest context bucket while decoding)
    sequences = [[(7 * i + 3 * s) % (cfg.vocab_size - 4) + 3 for i in range(n + 4)] for s, n in enumerate((5, 9, 62))]
    tables, free = [], iter(range(32))
    for seq in sequences:
        tables.append([next(free) for _ in range(-(-len(seq) // 4))])
    spare = trunk.kv[:, :, -1].clone()
    prompts = [trunk.forward([Chunk(seq[:-4], 0, table)], moe) for seq, table in zip(sequences, tables, strict=True)]
    assert torch.equal(trunk.kv[:, :, -1], spare), "a prefill chunk writes no spare slot"
    steps = []
    for back in range(4, 0, -1):
        chunks = [Chunk(seq[-back : len(seq) - back + 1], len(seq) - back, table)
                  for seq, table in zip(sequences, tables, strict=True)]
        steps.append(trunk.forward(chunks, moe))
    assert set(trunk.graphs.batches) == {(4, 64), (4, 128)}
    oracle = ReferenceModel(model)
    for s, seq in enumerate(sequences):
        got = torch.stack([prompts[s][0]] + [step[s] for step in steps])
        want = oracle.forward(seq)[-5:]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(trunk.kv[:, :, : -1][:, :, 24 * 4 :], torch.zeros_like(trunk.kv[:, :, 24 * 4 : -1])), \
        "nothing is written past the sequences' blocks but the spare slot"
