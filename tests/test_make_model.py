"""The model generator: valid files for every architecture and type, determinism, weights that make
experts and attention matter, routing skew measured through the oracle, tokenizer, CLI errors."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from bench.routing_popularity import selection_counts
from shared.bpe_vocab import MAX_TRAINED, tokenizer_metadata
from shared.gguf_file import GGUFModel
from shared.make_model import ARCHS, DTYPES, main, make_model, preset_config
from shared.model_config import tensor_shapes
from shared.quantize import quantize_rows, random_matrix, set_first_column
from shared.reference import ReferenceModel
from shared.tokenizer import CONTROL, NORMAL, Tokenizer
from shared.weights_gen import BIAS_VALUE, WeightGenerator, hot_ranking, routing_bias, zipf_shares


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    make_model(path, "qwen3moe", "tiny", "f32", seed=1)
    return path


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_and_dtype_opens_with_the_preset_config_and_runs_in_the_oracle(tmp_path, arch, dtype):
    path = tmp_path / "m.gguf"
    make_model(path, arch, "tiny", dtype, seed=3)
    model = GGUFModel(path)
    cfg, _ = preset_config("tiny", arch)
    assert model.config == cfg
    assert model.metadata["general.architecture"] == ARCHS[arch]
    assert model.metadata["general.file_type"] == int(DTYPES[dtype][1])
    assert model.metadata["general.quantization_version"] == 2
    assert len(model.metadata["tokenizer.ggml.tokens"]) == cfg.vocab_size
    # tiny rows (64, 32 values) are too short for Q4_K's 256-value blocks: those fall back to Q4_0.
    matrix_type = Q.Q4_0 if dtype in ("q4_k", "q4_k_m", "q5_k") else DTYPES[dtype][0]
    for name, shape in tensor_shapes(cfg).items():
        expected = Q.F32 if len(shape) == 1 or ".ffn_gate_inp." in name else matrix_type
        assert model.qtype(name) == expected, name
    assert torch.allclose(model.tensor("token_embd.weight")[:, 0], torch.tensor(BIAS_VALUE), rtol=1e-3)
    logits = ReferenceModel(model).forward([5, 17, 300, 42, 7])
    assert logits.shape == (5, cfg.vocab_size) and torch.isfinite(logits).all()


def test_k_quant_rows_of_256_are_stored_as_q4_k_and_run(tmp_path):
    make_model(tmp_path / "s.gguf", None, "small", "q4_k")
    model = GGUFModel(tmp_path / "s.gguf")
    assert {model.qtype(n) for n in ("token_embd.weight", "blk.0.ffn_down_exps.weight", "output.weight")} == {Q.Q4_K}
    assert torch.isfinite(ReferenceModel(model).forward(list(range(10)))).all()


def test_a_k_quant_of_the_tiny_preset_says_which_matrices_fell_back(tmp_path, capsys):
    """Its 32-value rows were written as Q4_0 under a file type of q4_k with no word said; the small preset's rows
    split into 256-value blocks, and a q4_0 file's Q4_0 is no fallback."""
    assert main([str(tmp_path / "k.gguf"), "--dtype", "q4_k"]) == 0
    assert "the tiny preset's rows do not split into q4_k's blocks, so of its matrices" in capsys.readouterr().err
    assert make_model(tmp_path / "k.gguf", preset="tiny", dtype="q4_k").fallbacks.keys() == {"Q4_0"}
    assert make_model(tmp_path / "s.gguf", preset="small", dtype="q4_k").fallbacks == {}
    assert main([str(tmp_path / "q.gguf"), "--dtype", "q4_0"]) == 0
    assert "note" not in capsys.readouterr().err


def test_q4_k_m_stores_the_down_experts_of_llama_cpps_more_bits_layers_as_q6_k(tmp_path):
    """llama.cpp's use_more_bits over 4 layers: layer 2 ((2 - 0) % 3 == 2) and layer 3 (the last eighth, rounded);
    their Q6_K values have the spread of the Q4_K ones beside them."""
    make_model(tmp_path / "s.gguf", None, "small", "q4_k_m")
    model = GGUFModel(tmp_path / "s.gguf")
    assert model.metadata["general.file_type"] == int(DTYPES["q4_k_m"][1])
    assert [model.qtype(f"blk.{i}.ffn_down_exps.weight") for i in range(4)] == [Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K]
    assert {model.qtype(f"blk.{i}.ffn_{kind}_exps.weight") for i in range(4) for kind in ("gate", "up")} == {Q.Q4_K}
    q4, q6 = (float(model.expert(layer, "ffn_down_exps", 3).std()) for layer in (1, 2))
    assert 0.9 < q6 / q4 < 1.1
    assert torch.isfinite(ReferenceModel(model).forward(list(range(10)))).all()


def test_q5_k_stores_the_routed_experts_as_q5_k_and_the_trunk_as_q4_k(tmp_path):
    make_model(tmp_path / "s.gguf", None, "small", "q5_k")
    model = GGUFModel(tmp_path / "s.gguf")
    assert {model.qtype(f"blk.{i}.ffn_{kind}_exps.weight") for i in range(4) for kind in ("gate", "up", "down")} \
        == {Q.Q5_K}
    assert {model.qtype(n) for n in ("token_embd.weight", "blk.0.attn_q.weight", "output.weight")} == {Q.Q4_K}
    assert torch.isfinite(ReferenceModel(model).forward(list(range(10)))).all()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_model(tmp_path / f"{name}.gguf", "qwen2moe", "tiny", "q4_0", seed=seed, routing_skew=0.5)
    assert filecmp.cmp(tmp_path / "a.gguf", tmp_path / "b.gguf", shallow=False)
    assert not filecmp.cmp(tmp_path / "a.gguf", tmp_path / "c.gguf", shallow=False)


def test_each_unit_depends_only_on_the_seed_not_on_generation_order(tmp_path):
    make_model(tmp_path / "m.gguf", "qwen3moe", "tiny", "q8_0", seed=5)
    model = GGUFModel(tmp_path / "m.gguf")
    cfg, step = preset_config("tiny", "qwen3moe")
    gen = WeightGenerator(cfg, 5, 0.0, step, cfg.vocab_size)
    name = "blk.2.ffn_up_exps.weight"
    units = {i: gen.unit(name, tensor_shapes(cfg)[name], Q.Q8_0, i) for i in reversed(range(cfg.n_experts))}
    expected = np.concatenate([units[i].ravel() for i in sorted(units)])
    assert np.array_equal(np.asarray(model.raw(name)).ravel(), expected)


def test_the_output_head_never_predicts_vocabulary_padding():
    cfg, step = preset_config("small")
    gen = WeightGenerator(cfg, 0, 0.0, step, padding_start=3000)
    head = gen.unit("output.weight", (cfg.vocab_size, cfg.hidden), Q.F32, 1).view(np.float32)  # rows 2048..4095
    assert not head[3000 - 2048:].any()
    assert np.all(np.abs(head[: 3000 - 2048, 1:]).sum(axis=1) > 0)


def test_experts_and_attention_change_the_greedy_continuation(tiny_f32):
    ref = ReferenceModel(GGUFModel(tiny_f32))
    prompt = [11, 200, 37, 480, 3, 99]
    base = ref.greedy(prompt, 8)
    assert len(set(base)) >= 3  # not collapsed onto one token
    for name in ("blk.1.ffn_down_exps.weight", "blk.2.attn_output.weight"):
        saved = ref.w[name].clone()
        ref.w[name].zero_()
        assert ref.greedy(prompt, 8) != base, f"zeroing {name} left the greedy tokens unchanged"
        ref.w[name].copy_(saved)
    # A wrong expert: the expert layer 0 ranks first for the last token computes with another's weights.
    routing: list[torch.Tensor] = []
    logits = ref.forward(prompt, routing)[-1]
    chosen = int(routing[0][-1, 0])
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        w = ref.w[f"blk.0.{kind}.weight"]
        w[chosen] = w[(chosen + 1) % len(w)]
    assert (ref.forward(prompt)[-1] - logits).norm() > 0.1 * logits.norm()
    assert ref.greedy(prompt, 8) != base


def test_routing_skew_follows_the_zipf_target_through_the_oracle(tmp_path):
    cfg, _ = preset_config("tiny")
    for skew in (0.0, 1.2):
        make_model(tmp_path / f"s{skew}.gguf", None, "tiny", "q8_0", seed=2, routing_skew=skew)
        counts = selection_counts(tmp_path / f"s{skew}.gguf", n_tokens=512)
        shares = counts / counts.sum(axis=1, keepdims=True)
        target = zipf_shares(cfg.n_experts, cfg.n_experts_used, skew)
        if skew == 0:
            assert np.abs(shares - 1 / cfg.n_experts).max() < 0.05
        else:
            assert target[0] > 3 / cfg.n_experts
            assert np.abs(np.sort(shares, axis=1)[:, ::-1] - target).max() < 0.06
            for layer in range(cfg.n_layers):
                assert shares[layer].argmax() == hot_ranking(2, layer, cfg.n_experts)[0]


def test_zipf_target_caps_shares_at_one_over_top_k():
    uniform = zipf_shares(8, 2, 0.0)
    assert np.allclose(uniform, 1 / 8)
    skewed = zipf_shares(128, 8, 1.2)
    assert skewed.sum() == pytest.approx(1.0)
    assert skewed.max() == pytest.approx(1 / 8)  # r^-1.2 alone would give the top expert 28%
    assert np.all(np.diff(skewed) <= 1e-12)
    # Below the cap the shares keep the r^-S ratios.
    assert skewed[10] / skewed[20] == pytest.approx((21 / 11) ** 1.2)


def test_calibrated_bias_reproduces_the_target_in_simulation():
    bias, _, _ = routing_bias(32, 4, 1.0, 256)
    rng = np.random.default_rng(1)
    logits = bias + rng.standard_normal((20000, 32))
    chosen = np.argpartition(-logits, 3, axis=1)[:, :4]
    shares = np.bincount(chosen.ravel(), minlength=32) / chosen.size
    assert np.abs(shares - zipf_shares(32, 4, 1.0)).max() < 0.01


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K])
def test_random_blocks_have_the_requested_spread_and_structure(qtype):
    stored = random_matrix(np.random.Generator(np.random.SFC64(0)), 256, 512, qtype, 0.25, zero_first_column=True)
    values = quants.dequantize(stored, qtype) if qtype != Q.F32 else stored.view(np.float32)
    values = values.reshape(256, 512)
    assert values.std() == pytest.approx(0.25, rel=0.03)
    assert abs(values.mean()) < 0.01
    assert not values[:, 0].any()
    if qtype == Q.Q4_K:  # sub-blocks of one block have their own scales, so a kernel that ignores them fails
        spread = values.reshape(-1, 8, 32).std(axis=-1)
        assert (spread.max(axis=1) / spread.min(axis=1)).mean() > 3
    set_first_column(stored, qtype, 2.0)
    after = (quants.dequantize(stored, qtype) if qtype != Q.F32 else stored.view(np.float32)).reshape(256, 512)
    assert np.allclose(after[:, 0], 2.0, rtol=5e-3)
    assert np.array_equal(after[:, 256:], values[:, 256:])  # only the first block was touched


@pytest.mark.parametrize("qtype, sub_block", [(Q.Q5_K, 32), (Q.Q6_K, 16)])
def test_random_q5_k_and_q6_k_blocks_have_the_requested_spread_and_their_sub_block_scales(qtype, sub_block):
    """Q5_K (q5_k experts) and Q6_K (the down experts of q4_k_m files): d (and Q5_K's dmin) where gguf reads
    them, every sub-block a scale of its own, zero mean; Q5_K's first column zeroed where asked (gate and up
    experts), Q6_K's refused (only down experts, which need none, are Q6_K)."""
    zero_first = qtype == Q.Q5_K
    stored = random_matrix(np.random.Generator(np.random.SFC64(0)), 256, 512, qtype, 0.25, zero_first)
    values = quants.dequantize(stored, qtype).reshape(256, 512)
    assert values.std() == pytest.approx(0.25, rel=0.03)
    assert abs(values.mean()) < 0.01
    spread = values.reshape(-1, 256 // sub_block, sub_block).std(axis=-1)
    assert (spread.max(axis=1) / spread.min(axis=1)).mean() > 3
    if zero_first:
        assert not values[:, 0].any() and values[:, 1].any()
    else:
        with pytest.raises(ValueError, match=qtype.name):
            random_matrix(np.random.default_rng(0), 4, 256, qtype, 0.25, zero_first_column=True)


def test_bf16_rows_are_stored_as_gguf_rounds_them():
    """quantize_rows converts through torch for speed; its bytes must be gguf's, extremes and signed zeros too."""
    x = (np.random.default_rng(0).standard_normal((64, 256)) * np.logspace(-40, 38, 256)).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    assert np.array_equal(quantize_rows(x, Q.BF16), np.ascontiguousarray(quants.quantize(x, Q.BF16)).view(np.uint8))


def test_q4_k_quantizer_round_trips_through_gguf_dequantize():
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    y = quants.dequantize(quantize_rows(x, Q.Q4_K), Q.Q4_K)
    assert np.sqrt(np.mean((x - y) ** 2)) < 0.1 * x.std()


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_tokenizer_is_a_working_byte_level_bpe(tmp_path, arch):
    make_model(tmp_path / "m.gguf", arch, "small", "q4_0")
    md = GGUFModel(tmp_path / "m.gguf").metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
    assert md["tokenizer.ggml.add_bos_token"] is False
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(special)] == CONTROL
    vocab = set(tokens)
    merges = [m.split(" ", 1) for m in md["tokenizer.ggml.merges"]]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    tok = Tokenizer(md)
    text = "The quick brown fox, ça va très bien! 你好世界 日本語 🎉🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for script in ("你好世界", "très", "🎉"):
        assert len(tok.encode(script)) < len(script.encode()), f"no merges learned for {script!r}"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    if arch == "mixtral":
        assert md["general.architecture"] == "llama"
        assert chat == "<s>[INST] Hi [/INST]"
    else:
        assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert tokens[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"


def test_large_vocabularies_are_padded_with_control_tokens():
    md = tokenizer_metadata("qwen3moe", 20000)
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 20000
    assert tokens[MAX_TRAINED:MAX_TRAINED + 3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[-1] == f"<|extra_{20000 - MAX_TRAINED - 4}|>"
    assert set(types[MAX_TRAINED:]) == {CONTROL} and set(types[:MAX_TRAINED]) == {NORMAL}


def test_gguf_dump_lists_blocks_and_experts(tiny_f32):
    out = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(tiny_f32)],
                         capture_output=True, text=True, check=True).stdout
    assert "qwen3moe.block_count = 4" in out and "qwen3moe.expert_count = 8" in out
    assert "blk.3.ffn_down_exps.weight" in out


def test_bad_arguments_exit_2_with_a_clear_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "shared.cli", "make-model", str(tmp_path / "x.gguf"),
                          "--preset", "huge"], capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice: 'huge'" in run.stderr
    assert main([str(tmp_path / "x.gguf"), "--routing-skew", "-1"]) == 2
    for skew in ("nan", "inf"):  # a NaN skew wrote a model whose every route was NaN
        assert main([str(tmp_path / "x.gguf"), "--routing-skew", skew]) == 2
    assert main([str(tmp_path / "x.gguf"), "--arch", "olmoe", "--preset", "qwen3-30b-a3b", "--seed", "-3"]) == 2
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("out", ["", "new/", "."])
def test_an_output_that_is_no_file_s_path_is_refused(tmp_path, monkeypatch, capsys, out):
    """'' ended in a traceback from gguf's writer, and "new/" wrote a file named "new"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([out])
    assert exit_.value.code == 2 and "the output must be a file's path, not" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_start_without_disk_space(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    assert main([str(tmp_path / "big.gguf"), "--preset", "qwen3-30b-a3b", "--dtype", "q4_0"]) == 1
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "big.gguf").exists()
