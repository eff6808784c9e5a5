"""The static buffers a decode graph replays over, run eagerly on the CPU: several sequences of different
lengths decoding together, padded to the batch and context buckets, give each sequence the oracle's logits,
and the padding rows write nowhere but the spare KV slot."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from gpu_worker.decode_graphs import MIN_CONTEXT, bucket
from gpu_worker.experts import HotExperts, MoEDispatch
from gpu_worker.model import Chunk, Trunk
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.gguf_write import write_model
from shared.make_model import make_model
from shared.model_config import ModelError
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel
from tests.damaged_models import nan_value
from tests.test_gguf_file import random_tensors, tiny_config

BLOCKS_PER_SEQUENCE, BLOCK_SIZE = 5, 16


def decode_together(model: GGUFModel, device: torch.device, graphs: bool, sequences: list[list[int]],
                    steps: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Trunk]:
    """Every expert hot; each sequence's prompt (all but its last `steps` tokens) alone, then `steps` decode
    steps of all of them together. Logits (sequences, steps + 1, vocab) on the CPU, and the trunk."""
    cfg = model.config
    placement = round_robin_placement(cfg, cfg.n_experts, 0)
    hot = HotExperts(ExpertSource(model, None), device, dtype)
    hot.apply(placement)
    moe = MoEDispatch(placement, hot, None)
    trunk = Trunk(model, device, dtype, num_blocks=64, block_size=BLOCK_SIZE, decode_graphs=graphs)
    tables = [list(range(BLOCKS_PER_SEQUENCE * s, BLOCKS_PER_SEQUENCE * (s + 1))) for s in range(len(sequences))]
    out = [[trunk.forward([Chunk(seq[:-steps], 0, table)], moe)[0]]
           for seq, table in zip(sequences, tables, strict=True)]
    for back in range(steps, 0, -1):
        chunks = [Chunk(seq[len(seq) - back : len(seq) - back + 1], len(seq) - back, table)
                  for seq, table in zip(sequences, tables, strict=True)]
        for s, row in enumerate(trunk.forward(chunks, moe)):
            out[s].append(row)
    return torch.stack([torch.stack(rows) for rows in out]).cpu(), trunk


def test_bucket_is_the_power_of_two_at_or_above():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]
    assert bucket(3, MIN_CONTEXT) == MIN_CONTEXT and bucket(MIN_CONTEXT + 1, MIN_CONTEXT) == 2 * MIN_CONTEXT


def test_padded_static_decode_gives_every_sequence_the_oracles_logits(tmp_path):
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=11)
    model = GGUFModel(path)
    # three sequences (a batch bucket of 4: one padding row) with prompts of 5, 9 and 62 tokens; the last one's
    # context grows past the smallest context bucket while decoding
    sequences = [[(7 * i + 3 * s) % (model.config.vocab_size - 4) + 3 for i in range(n + 4)]
                 for s, n in enumerate((5, 9, 62))]
    got, trunk = decode_together(model, torch.device("cpu"), True, sequences, 4)
    assert trunk.graphs is not None and set(trunk.graphs.batches) == {(4, 64), (4, 128)}
    assert trunk.graphs.fits(1, 32768) and not trunk.graphs.fits(3, 16385)  # larger steps run eagerly
    oracle = ReferenceModel(model)
    for s, seq in enumerate(sequences):
        assert torch.allclose(got[s], oracle.forward(seq)[-5:], atol=1e-4, rtol=1e-4)
    used = len(sequences) * BLOCKS_PER_SEQUENCE * BLOCK_SIZE
    assert not trunk.kv[:, :, used:-1].any(), "nothing is written past the sequences' blocks but the spare slot"


def test_the_rope_table_covers_the_kv_caches_positions_not_the_models_claimed_context(tmp_path):
    """A file's context_length is only a claim: one of 2**32 - 1 had the worker try to allocate 34 GB for the
    table, and fail. No sequence gets a position past the KV cache's slots, so the table needs no more rows."""
    cfg = replace(tiny_config(), context_length=2**20)
    path = tmp_path / "long.gguf"
    write_model(path, cfg, random_tensors(cfg))
    model = GGUFModel(path)
    sequence = [(5 * i) % cfg.vocab_size for i in range(40)]
    got, trunk = decode_together(model, torch.device("cpu"), True, [sequence], 2)
    assert trunk.rope_cos.shape[0] == trunk.rope_sin.shape[0] == 64 * BLOCK_SIZE
    assert torch.allclose(got[0], ReferenceModel(model).forward(sequence)[-3:], atol=1e-4, rtol=1e-4)


def test_a_model_whose_rms_epsilon_is_zero_decodes_padded_batches_to_the_oracles_logits(tmp_path):
    """norm_eps 0 is a model the loader takes. A padding row of zeros normalized to 0 x rsqrt(0) = NaN and wrote it
    into the spare KV slot, which every row's attention masks but still multiplies: every sequence's logits were
    NaN in a batch short of its bucket."""
    cfg = replace(tiny_config(), norm_eps=0.0)
    path = tmp_path / "eps0.gguf"
    write_model(path, cfg, random_tensors(cfg))
    model = GGUFModel(path)
    sequences = [[(3 * i + 5 * s) % cfg.vocab_size for i in range(6 + 4 * s)] for s in range(3)]  # bucket 4
    got, _ = decode_together(model, torch.device("cpu"), True, sequences, 2)
    oracle = ReferenceModel(model)
    for s, seq in enumerate(sequences):
        assert torch.allclose(got[s], oracle.forward(seq)[-3:], atol=1e-4, rtol=1e-4)


def test_a_trunk_matrix_holding_nan_is_refused_by_name_and_a_damaged_embedding_row_is_not(tmp_path):
    """NaN in a matrix every token passes through (here an attention projection, or the router) loaded, the system
    said it was ready, and every request failed; a damaged embedding row fails only the prompts holding its token
    (tests/test_bad_input.py), so the model still loads."""
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_gate_inp.weight"):
        path = tmp_path / f"{name}.gguf"
        make_model(path, preset="tiny", dtype="f32", seed=3)
        nan_value(path, name)
        with pytest.raises(ModelError, match=f"tensor {re.escape(name)} holds NaN or infinite values"):
            Trunk(GGUFModel(path), torch.device("cpu"), torch.float32, num_blocks=4, block_size=BLOCK_SIZE)
    path = tmp_path / "embedding.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=3)
    nan_value(path, "token_embd.weight")
    Trunk(GGUFModel(path), torch.device("cpu"), torch.float32, num_blocks=4, block_size=BLOCK_SIZE)
