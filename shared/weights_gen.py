"""Deterministic random weights for a generated MoE model, with controllable expert popularity.

Every tensor is cut into fixed units (one expert of a merged expert tensor, or a group of rows) and
each unit draws from its own generator seeded by (seed, tensor name, unit), so the bytes depend only
on the seed, never on how the writer chunks or threads the work.

Scales keep the model neither collapsed nor trivial. Token embeddings have std 1, every projection
that reads the normalised residual (q, k, v, expert gate and up, output head) std 1/sqrt(fan_in), and
the two matrices that write back into the residual (attention output, expert down) are scaled so
each sub-layer adds `step` times the residual's per-channel rms: about 0.3 for the tiny and small
presets, so attention and every expert visibly move the logits, and less for the deep real shapes.
Attention is made sharp (QK_GAIN) so that it keeps mattering at later positions, and norm weights
are 1 with a little jitter.

Expert popularity (`routing_skew` S): in layer l the expert of popularity rank r is selected with
share proportional to r^-S (S = 0: uniform), with a different random ranking per layer. These
architectures have no router bias, so the bias rides on a hidden channel:

- residual channel 0 ("bias channel") holds the constant BIAS_VALUE in every token embedding;
  no matrix reads it (column 0 of q/k/v, expert gate/up, shared-expert gate and output head is 0)
  and none writes it (row 0 of attention output and expert down is 0), so it stays constant;
- the router of layer l reads it through column 0: router row e gets b_e * sqrt(v_l) / BIAS_VALUE,
  where sqrt(v_l) is the expected per-channel rms of the rest of the residual at that router. With
  the other columns of each row scaled to unit norm, a router logit is then b_e plus Gaussian
  noise of std 1 (in units of the residual's rms), the same for every expert;
- b is calibrated once per (experts, top-k, S) by iterative proportional fitting on simulated
  logits: b += log(target / observed selection frequency) until top-k selection matches the target.

Top-k selects an expert at most once per token, so no expert can have more than 1/k of the
selections: target shares above 1/k are capped there and the excess is spread over the other
experts in proportion to their own targets (`zipf_shares`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

from shared.model_config import ModelConfig
from shared.quantize import random_matrix, set_first_column

BIAS_CHANNEL = 0
# Above every other value a Q4_0 or Q8_0 embedding block holds (|v| <= 1.73 for std 1), so they store it exactly.
BIAS_VALUE = 2.0
NORM_JITTER = 0.1  # norm weights are 1 + N(0, NORM_JITTER): a path that skips a norm weight gives other logits
ATTN_BIAS_STD = 0.05  # qwen2moe's q/k/v biases
ROWS_PER_UNIT = 2048
# q and k entries of std QK_GAIN give attention scores of std QK_GAIN^2 = 4: attention picks a few
# earlier tokens instead of averaging them all, so its output does not fade with position.
QK_GAIN = 2.0
# With that, a position's attention update has about half the variance of position 0's (which can
# only attend to itself), measured over 64-token sequences of the small preset.
ATTN_VAR_SHARE = 0.5


def _gaussian_mean(f: Callable[[np.ndarray], np.ndarray]) -> float:
    """E[f(g)] for g ~ N(0, 1), by a fine Riemann sum (exact enough, and free of constants to trust)."""
    g = np.linspace(-12.0, 12.0, 240001)
    return float(np.sum(f(g) * np.exp(-g * g / 2)) * (g[1] - g[0]) / np.sqrt(2 * np.pi))


# E[silu(g)^2] and E[sigmoid(g)^2]: the gain of a SwiGLU unit and of the shared-expert gate.
SILU_SQ = _gaussian_mean(lambda g: (g / (1 + np.exp(-g))) ** 2)
SIGMOID_SQ = _gaussian_mean(lambda g: (1 / (1 + np.exp(-g))) ** 2)


def zipf_shares(n_experts: int, top_k: int, skew: float) -> np.ndarray:
    """Target share of the selections for popularity ranks 1..n: r^-skew, each capped at 1/top_k."""
    p = np.arange(1, n_experts + 1, dtype=np.float64) ** -skew
    p /= p.sum()
    cap = 1.0 / top_k
    capped = np.zeros(n_experts, dtype=bool)
    while (p > cap * (1 + 1e-12)).any():
        capped |= p >= cap
        p[capped] = cap
        p[~capped] *= (1 - cap * capped.sum()) / p[~capped].sum()
    return p


@lru_cache(maxsize=32)
def routing_bias(n_experts: int, top_k: int, skew: float, hidden: int) -> tuple[np.ndarray, float, float]:
    """Logit offset per popularity rank, for router noise of std 1, and the mean sum of squared
    routing weights of a token (top-k renormalised, then raw softmax), which sizes the expert output.

    The simulated logits are b / rho + N(0, 1), rho being a token's residual norm over its expected
    value (chi with hidden-1 degrees of freedom): the bias channel is the same for every token while
    the noise scales with the rest of the residual.
    """
    rng = np.random.Generator(np.random.PCG64(20240601))  # calibration does not depend on the model seed
    n_tokens = 16384
    noise = rng.standard_normal((n_tokens, n_experts))
    rho = np.sqrt(rng.chisquare(hidden - 1, (n_tokens, 1)) / (hidden - 1))
    target = top_k * zipf_shares(n_experts, top_k, skew)
    b = np.zeros(n_experts) if skew == 0 else np.log(target)
    for _ in range(0 if skew == 0 else 100):
        chosen = np.argpartition(-(b / rho + noise), top_k - 1, axis=1)[:, :top_k]
        freq = np.bincount(chosen.ravel(), minlength=n_experts) / n_tokens
        # Half steps: the experts compete for k places, and full steps overshoot and oscillate.
        b = np.clip(b + 0.5 * np.log(target / np.maximum(freq, 0.5 / n_tokens)), -30, 30)
        b -= b.mean()
    logits = b / rho + noise
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.sort(probs, axis=1)[:, -top_k:]
    renormalised = top / top.sum(axis=1, keepdims=True)
    return b, float(np.mean((renormalised**2).sum(axis=1))), float(np.mean((top**2).sum(axis=1)))


def _unit_rng(seed: int, name: str, unit: int) -> np.random.Generator:
    key = np.random.SeedSequence(seed, spawn_key=(zlib.crc32(name.encode()), unit))
    return np.random.Generator(np.random.SFC64(key))


def hot_ranking(seed: int, layer: int, n_experts: int) -> np.ndarray:
    """Expert ids of layer `layer` from most to least popular."""
    return _unit_rng(seed, "routing", layer).permutation(n_experts)


class WeightGenerator:
    """Produces the stored bytes of any tensor of `cfg`, unit by unit."""

    def __init__(self, cfg: ModelConfig, seed: int, routing_skew: float, step: float, padding_start: int) -> None:
        """`padding_start`: the first token id of the vocabulary's unused padding, which the output head never
        predicts (its rows are 0, so their logits stay below the best real token's), as in trained models."""
        self.seed, self.step, self.padding_start = seed, step, padding_start
        self.bias_by_rank, w2_renormalised, w2_raw = routing_bias(
            cfg.n_experts, cfg.n_experts_used, float(routing_skew), cfg.hidden)
        sum_w2 = w2_renormalised if cfg.norm_topk_prob else w2_raw
        shared = cfg.shared_expert_ffn > 0
        moe_share = step / np.sqrt(2.0) if shared else step  # routed and shared experts split the update
        # Gain (std x sqrt(fan_in)) of the matrices that write into the residual.
        self._writers = {
            "attn_output": step,
            "ffn_down_exps": moe_share / np.sqrt(SILU_SQ * sum_w2),
            "ffn_down_shexp": moe_share / np.sqrt(SILU_SQ * SIGMOID_SQ),
        }
        self.qk_norm = cfg.qk_norm

    def residual_var(self, layer: int) -> float:
        """Expected per-channel variance of the residual (bias channel aside) at layer `layer`'s router."""
        return 1.0 + (layer * (1 + ATTN_VAR_SHARE) + ATTN_VAR_SHARE) * self.step**2

    def units(self, shape: tuple[int, ...]) -> int:
        if len(shape) == 3:
            return shape[0]
        return -(-shape[0] // ROWS_PER_UNIT) if len(shape) == 2 else 1

    def unit(self, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, index: int) -> np.ndarray:
        """Unit `index` of tensor `name` (numpy-order `shape`) as stored in `qtype`: an array of the file's bytes."""
        rng = _unit_rng(self.seed, name, index)
        kind = name.split(".")[-2]
        if len(shape) == 1:
            return self._vector(rng, kind, name, shape[0])
        rows, cols = shape[-2:]
        if len(shape) == 2:
            rows = min(ROWS_PER_UNIT, rows - index * ROWS_PER_UNIT)
        if kind == "ffn_gate_inp":
            return self._router(rng, int(name.split(".")[1]), rows, cols)
        if kind == "token_embd":
            out = random_matrix(rng, rows, cols, qtype, 1.0)
            set_first_column(out, qtype, BIAS_VALUE)
            return out
        if kind == "output":
            out = random_matrix(rng, rows, cols, qtype, 1 / np.sqrt(cols), zero_first_column=True)
            out[max(0, self.padding_start - index * ROWS_PER_UNIT):] = 0
            return out
        if kind in self._writers:
            out = random_matrix(rng, rows, cols, qtype, self._writers[kind] / np.sqrt(cols))
            out[BIAS_CHANNEL] = 0  # all-zero bytes are 0 in every storage type
            return out
        gain = QK_GAIN if kind in ("attn_q", "attn_k") and self.qk_norm == "none" else 1.0
        return random_matrix(rng, rows, cols, qtype, gain / np.sqrt(cols), zero_first_column=True)

    def _vector(self, rng: np.random.Generator, kind: str, name: str, n: int) -> np.ndarray:
        if name.endswith(".bias"):
            return (rng.standard_normal(n) * ATTN_BIAS_STD).astype(np.float32)
        if kind == "ffn_gate_inp_shexp":
            v = rng.standard_normal(n) / np.sqrt(n)
            v[BIAS_CHANNEL] = 0.0
            return v.astype(np.float32)
        v = 1.0 + NORM_JITTER * rng.standard_normal(n)
        v[BIAS_CHANNEL] = 1.0  # the router sees the bias channel at exactly its designed size
        if kind in ("attn_q_norm", "attn_k_norm"):
            v *= QK_GAIN
        return v.astype(np.float32)

    def _router(self, rng: np.random.Generator, layer: int, rows: int, cols: int) -> np.ndarray:
        r = rng.standard_normal((rows, cols))
        r[:, BIAS_CHANNEL] = 0.0
        r /= np.linalg.norm(r, axis=1, keepdims=True)  # equal norms: equal noise, no expert favoured by chance
        noise_rms = np.sqrt(self.residual_var(layer) * (1 + NORM_JITTER**2))
        r[hot_ranking(self.seed, layer, rows), BIAS_CHANNEL] = self.bias_by_rank * noise_rms / BIAS_VALUE
        return r.astype(np.float32)
