"""A real byte-level BPE vocabulary for generated models, in llama.cpp's GGUF tokenizer keys.

The vocabulary is trained with the `tokenizers` library on a deterministic multilingual corpus
(English, accented Latin, Chinese, Japanese, Korean, emoji), pre-split with the Qwen2 regex that
llama.cpp applies for `tokenizer.ggml.pre = "qwen2"`, and stored the way llama.cpp expects:
tokens in the GPT-2 byte-to-unicode spelling, merges as "left right" strings. After the trained
tokens come the control tokens and then `<|extra_N|>` control tokens up to the model's vocab size.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.tokenizer import CONTROL, NORMAL, QWEN2_SPLIT

# A large vocabulary pads with control tokens rather than training further: the corpus runs out of
# useful merges well before 150k, and training more only costs time.
MAX_TRAINED = 8192

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mixtral-Instruct's format; a system message is folded into the first user turn as Mistral does.
INST_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Per chat style: control tokens (in vocabulary order), which of them are BOS / EOS / padding, template.
_STYLES: dict[str, dict[str, Any]] = {
    "chatml": {
        "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "template": CHATML_TEMPLATE,
    },
    "inst": {
        "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"),
        "bos": "<s>", "eos": "</s>", "pad": "<|endoftext|>",
        "template": INST_TEMPLATE,
    },
}

_ENGLISH = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can time about model expert "
    "memory server token layer weight router request stream batch cache program language system question answer "
    "world water light house music river mountain garden morning evening winter summer people children story "
    "small large quick brown fox jumps over lazy dog reading writing thinking learning running building making "
    "number between through because however something nothing everything another together different important"
).split()
_LATIN = (
    "café déjà vu naïve façade élève être où ça très français garçon noël crème brûlée señor niño mañana "
    "corazón canción pequeño también información äpfel über straße größe müde schön fräulein können "
    "ação coração não irmão avó pão português ölçü şehir ğüzel kärlek smörgås ålder fjäll øl ærlig"
).split()
_CJK = (
    "你好世界中国人大小上下天地水火山的是了在有和不这我们他她它来去说时候学生老师朋友电脑语言模型专家"
    "日本語東京大学先生今日明日ありがとうございますこんにちはカタカナひらがなテキスト"
    "한국어안녕하세요감사합니다서울학교사랑"
)
_EMOJI = "😀😂🥲😍🤔👍🙏🎉🔥✨🚀🌍🍕☕🐍💡📚✅❌❤️👋😎🤖"
_SYLLABLES = (
    "ka ro ble tion men ter pre con di ver sa lo mi nu pa re ing ed ly al ist ous ment ness ship"
).split()


def _corpus(n_lines: int = 6000) -> list[str]:
    """Deterministic text with a Zipf-like word frequency, so BPE learns merges in every script."""
    rng = random.Random(20240601)
    weights = [1.0 / (i + 1) for i in range(len(_ENGLISH))]
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.45:
            words = rng.choices(_ENGLISH, weights, k=rng.randint(5, 14))
        elif kind < 0.6:
            words = [rng.choice(_LATIN) for _ in range(rng.randint(4, 10))]
        elif kind < 0.75:
            words = ["".join(rng.choices(_CJK, k=rng.randint(2, 6))) for _ in range(rng.randint(2, 5))]
        elif kind < 0.85:
            words = [rng.choice(_ENGLISH) + rng.choice(_EMOJI) for _ in range(rng.randint(3, 7))]
        else:  # invented words keep the corpus from running out of merges for larger vocabularies
            words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(rng.randint(4, 10))]
        line = " ".join(words)
        end = rng.choice((".", "!", "?", ",", ";", ":"))
        lines.append(f"{line[0].upper()}{line[1:]}{end} {rng.randint(0, 999)}")
    return lines


@lru_cache(maxsize=8)
def trained_bpe(n_tokens: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens by id, merges) of a byte-level BPE with at most `n_tokens` tokens (at least the 256 bytes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokens = tuple(t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    merges = tuple(" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"])
    return tokens, merges


def chat_style(arch: str) -> str:
    """Mixtral (GGUF architecture "llama") chats in [INST] turns; the Qwen and OLMoE families in ChatML."""
    return "inst" if arch == "llama" else "chatml"


def _trained_for(arch: str, vocab_size: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(trained tokens, merges, control tokens) of the vocabulary; padding fills the rest."""
    specials: tuple[str, ...] = _STYLES[chat_style(arch)]["specials"]
    n_trained = min(vocab_size - len(specials), MAX_TRAINED)
    if n_trained < 256:
        raise ValueError(f"a vocabulary of {vocab_size} tokens cannot hold the 256 byte tokens and {len(specials)} "
                         "control tokens")
    return *trained_bpe(n_trained), specials


def padding_start(arch: str, vocab_size: int) -> int:
    """Id of the first `<|extra_N|>` padding token (vocab_size when there is none)."""
    trained, _, specials = _trained_for(arch, vocab_size)
    return len(trained) + len(specials)


def tokenizer_metadata(arch: str, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys of a `vocab_size`-token vocabulary for a model of GGUF architecture `arch`."""
    style = _STYLES[chat_style(arch)]
    trained, merges, specials = _trained_for(arch, vocab_size)
    extras = [f"<|extra_{i}|>" for i in range(vocab_size - len(trained) - len(specials))]
    tokens = [*trained, *specials, *extras]
    ids = {t: i for i, t in enumerate(tokens) if t in specials}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [NORMAL] * len(trained) + [CONTROL] * (len(specials) + len(extras)),
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": ids[style["bos"]],
        "tokenizer.ggml.eos_token_id": ids[style["eos"]],
        "tokenizer.ggml.padding_token_id": ids[style["pad"]],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": style["template"],
    }
