"""Decode steps crossing to the expert hosts from the device (`decode_crossings`): each layer one CUDA graph
replay with the host exchange inside it (the stream copies rows into the mailbox lane, raises its flag, waits on
the host's, copies the answer back). The same checks as tests/test_decode_crossings.py's, on a GPU worker."""

from __future__ import annotations

import pytest
import torch

from tests.test_decode_crossings import check_a_host_killed, check_greedy_tokens, check_hot_and_crossing, tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
__all__ = ["tiny"]  # the fixture


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_greedy_tokens_through_the_lanes_equal_the_oracle_in_fp32(tiny, arch):
    check_greedy_tokens(*tiny[arch], "--device", "cuda", "--dtype", "float32")


@pytest.mark.parametrize("hot", [0, 4])
def test_hot_share_and_lanes_in_one_graph_a_layer_in_bf16(tiny, hot):
    check_hot_and_crossing(*tiny["qwen3moe"], hot, "--device", "cuda")


def test_a_host_killed_mid_step_is_drained_with_poison_and_the_request_resumes_on_its_successor(tiny):
    # fp32: the resumed request's 200 tokens are compared with the oracle's
    check_a_host_killed(*tiny["qwen3moe"], "--device", "cuda", "--dtype", "float32")
