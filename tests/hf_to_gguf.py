"""Convert an in-memory Hugging Face MoE model to a llama.cpp-named GGUF, as llama.cpp's convert_hf_to_gguf.py does.

Tensor names come from gguf-py's TensorNameMap, the table llama.cpp's converter maps names with, so
they are checked independently of shared/model_config.py (GGUFModel validates the result against it).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from shared.gguf_write import write_model
from shared.model_config import ModelConfig

# Mixtral has no architecture of its own in llama.cpp: its converter writes it as "llama".
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}


def hf_model_config(hf: PretrainedConfig) -> ModelConfig:
    """The ModelConfig of a transformers config of one of the four supported MoE families."""
    return ModelConfig(
        arch=GGUF_ARCH[hf.model_type],
        n_layers=hf.num_hidden_layers,
        hidden=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rope_base=hf.rope_parameters["rope_theta"],
        norm_eps=hf.rms_norm_eps,
        n_experts=getattr(hf, "num_experts", None) or hf.num_local_experts,
        n_experts_used=hf.num_experts_per_tok,
        # qwen configs also carry intermediate_size, the width of their (unused here) dense MLP layers.
        expert_ffn=getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size,
        vocab_size=hf.vocab_size,
        context_length=hf.max_position_embeddings,
        shared_expert_ffn=getattr(hf, "shared_expert_intermediate_size", 0),
        # Mixtral always renormalises its top-k weights and has no flag: None takes llama's default (on).
        norm_topk_prob=getattr(hf, "norm_topk_prob", None),
    )


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: reorder each head's rows from (half, half) to (pair, pair) order,
    so that rotating adjacent pairs (llama.cpp's RoPE for llama) equals HF's rotation of the two halves."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unfuse_experts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers 5 holds each layer's experts as bare 3-D parameters, gate and up stacked along the rows
    of gate_up_proj; llama.cpp's converter splits them in two and maps them by their per-projection names."""
    if name.endswith("experts.gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        base = name.removesuffix("gate_up_proj")
        return [(base + "gate_proj.weight", gate), (base + "up_proj.weight", up)]
    if name.endswith("experts.down_proj"):
        return [(name + ".weight", tensor)]
    return [(name, tensor)]


def gguf_tensors(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """Every weight of `model` under its llama.cpp name and layout, float32, in state-dict order."""
    hf = model.config
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == GGUF_ARCH[hf.model_type])
    names = gguf.get_tensor_name_map(arch, hf.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        for name, data in _unfuse_experts(hf_name, tensor.detach().float()):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"cannot map tensor {hf_name} to a llama.cpp name")
            if hf.model_type == "mixtral" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                data = permute_qk(data, hf.num_attention_heads if ".attn_q." in gguf_name else hf.num_key_value_heads)
            if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
                # HF's (1, H) linear; published qwen2moe GGUFs store it as the vector llama.cpp reads.
                data = data.squeeze(0)
            out[gguf_name] = data.numpy()
    return out


def write_gguf(model: PreTrainedModel, path: str | os.PathLike[str]) -> ModelConfig:
    """Write `model` as an fp32 GGUF at `path`; returns the config the file declares."""
    cfg = hf_model_config(model.config)
    write_model(path, cfg, gguf_tensors(model))
    return cfg
