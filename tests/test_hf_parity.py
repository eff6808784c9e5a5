"""The fp32 oracle (shared/reference.py) against Hugging Face transformers on the same weights.

Each tiny random transformers model is converted to a llama.cpp-named GGUF (tests/hf_to_gguf.py),
opened with GGUFModel and run by ReferenceModel. Metric, per prompt: the largest absolute difference
between the oracle's and HF's logits over every position and vocabulary entry, divided by the largest
absolute HF logit of that prompt; it must be at most 1e-4. Greedy continuations must be identical
to HF's generate(), which takes transformers' KV-cache path rather than a full recompute.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from shared.gguf_file import GGUFModel
from shared.gguf_write import write_model
from shared.reference import ReferenceModel
from tests.hf_to_gguf import gguf_tensors, hf_model_config, write_gguf

TOLERANCE = 1e-4
PROMPT_LENGTHS = (1, 7, 33)
NEW_TOKENS = 12

# No special tokens, so that generate() never stops early at an end-of-sequence token.
COMMON = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
MODELS = {
    # head_dim 32 != hidden / heads, as in Qwen3-30B-A3B (hidden 2048, 32 heads of 128).
    "qwen3moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                 dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)),
    "qwen2moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                 dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      norm_topk_prob=False)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=8, intermediate_size=32)),
    # llama.cpp's OLMoE k_norm spans the whole width: as many KV heads as query heads.
    "olmoe": (OlmoeConfig, OlmoeForCausalLM,
              dict(num_experts=8, intermediate_size=32, num_key_value_heads=4, norm_topk_prob=False)),
}


def tiny_hf_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A random fp32 model in eval mode. transformers starts norm gains at 1 and biases at 0, which would
    hide a swapped or misplaced norm or bias; every parameter is redrawn so each one counts. Token
    embeddings at std 1 keep the residual stream token-specific, so routing stays spread in every layer."""
    config_cls, model_cls, extra = MODELS[family]
    model = model_cls(config_cls(**{**COMMON, **extra})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(0.15 * noise)
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def hf_logits(model: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("family", MODELS)
def test_oracle_matches_transformers(tmp_path, family):
    hf = tiny_hf_model(family)
    write_gguf(hf, tmp_path / "m.gguf")
    oracle = ReferenceModel(GGUFModel(tmp_path / "m.gguf"))
    errors = {}
    for tokens in prompts(hf.config.vocab_size):
        routing: list[torch.Tensor] = []
        errors[len(tokens)] = relative_error(oracle.forward(tokens, routing), hf_logits(hf, tokens))
        # Parity over a collapsed router would exercise only a few experts.
        if len(tokens) == max(PROMPT_LENGTHS):
            assert all(len(ids.unique()) >= 6 for ids in routing), [ids.unique().tolist() for ids in routing]
        with torch.no_grad():
            expected = hf.generate(torch.tensor([tokens]), do_sample=False, max_new_tokens=NEW_TOKENS)
        assert oracle.greedy(tokens, NEW_TOKENS) == expected[0, len(tokens):].tolist(), f"prompt of {len(tokens)}"
    print(f"{family}: max|oracle - HF| / max|HF| by prompt length: {errors}")
    assert max(errors.values()) <= TOLERANCE


def test_mixtral_without_llama_cpp_qk_permutation_fails_parity(tmp_path):
    """Interleaved RoPE on unpermuted Q/K rows is a different model: the parity check sees it."""
    hf = tiny_hf_model("mixtral")
    tensors = gguf_tensors(hf)
    for i, layer in enumerate(hf.model.layers):
        tensors[f"blk.{i}.attn_q.weight"] = layer.self_attn.q_proj.weight.detach().numpy()
        tensors[f"blk.{i}.attn_k.weight"] = layer.self_attn.k_proj.weight.detach().numpy()
    write_model(tmp_path / "m.gguf", hf_model_config(hf.config), tensors)
    oracle = ReferenceModel(GGUFModel(tmp_path / "m.gguf"))
    tokens = prompts(hf.config.vocab_size)[-1]
    assert relative_error(oracle.forward(tokens), hf_logits(hf, tokens)) > 100 * TOLERANCE
