"""Tokenizers rebuilt from GGUF metadata: round trips, special tokens, streaming decode, chat templates.

Both vocabularies are trained here with `tokenizers` and written into real GGUF model files the way
llama.cpp's converter lays them out; Hugging Face's own GGUF tokenizer loader is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers, trainers
from tokenizers.models import BPE

from shared.chat_template import ChatTemplateError
from shared.gguf_write import write_model
from shared.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    SPACE,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
    TokenizerError,
    merges_from_scores,
)
from tests.test_gguf_file import random_tensors, tiny_config

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'd said they'll do.",
    "Hello world! Hello there, hello again: 12345 + 678 = 13023.",
    "def main(argv):\n    return 0\n\n\tindented\twith tabs\n",
    "Café déjà vu, naïve façade, crème brûlée, São Paulo, Zürich, Ærøskøbing.",
    "東京は日本の首都です。中文分词测试，你好世界。",
    "Привет, как дела? Всё хорошо.",
    "Mixture of experts models route every token to a few experts in each layer.",
] * 20

TEXTS = [
    "Hello world",
    "the lazy dog jumps over the quick brown fox",
    "Café déjà vu — naïve Zürich",
    "東京は日本の首都です。你好",
    "emoji 🦊🚀 and 👩‍👩‍👧 families",
    "  two leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\nmixed \n \t end",
    "\n",
    "",
    "numbers 1234567890 and symbols #$%&*(){}",
]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mixtral-8x7B-Instruct-v0.1's template.
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Multi-line, in the style of Qwen3's: only renders as intended with trim_blocks and lstrip_blocks.
QWEN_STYLE = """{%- if tools %}
<|im_start|>system
Tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == "assistant" %}
<|im_start|>assistant
{{ message.content }}<|im_end|>
    {% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{% endif %}"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_USER_DEFINED = ["<think>", "</think>"]

def byte_level_metadata(pre: str = "qwen2", template: str | None = CHATML) -> dict:
    """A Qwen-style gpt2 vocabulary as llama.cpp's converter writes it: trained byte-level BPE pieces,
    "a b" merges, control tokens after the pieces and user-defined ones after those."""
    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [NORMAL] * len(tokens) + [CONTROL] * len(QWEN_SPECIALS) + [USER_DEFINED] * len(QWEN_USER_DEFINED)
    tokens += QWEN_SPECIALS + QWEN_USER_DEFINED
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [" ".join(m) for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
    }
    if template is not None:
        md["tokenizer.chat_template"] = template
    return md


def sentencepiece_metadata(template: str | None = MIXTRAL) -> dict:
    """A Llama/Mixtral-style SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then merged
    pieces best first and single characters last, each scored by its rank as SentencePiece BPE does."""
    tok = HFTokenizer(BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merged = ["".join(m) for m in model["merges"]]
    chars = [t for t in sorted(model["vocab"], key=model["vocab"].get) if len(t) == 1]
    pieces = merged + chars
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    if template is not None:
        md["tokenizer.chat_template"] = template
    return md


def write_gguf(path, md: dict, arch: str) -> None:
    cfg = dataclasses.replace(tiny_config(arch), vocab_size=len(md["tokenizer.ggml.tokens"]))
    write_model(path, cfg, random_tensors(cfg), metadata=md)


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "qwen.gguf"
    write_gguf(path, byte_level_metadata(), "qwen3moe")
    return path


@pytest.fixture(scope="module")
def mixtral_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "mixtral.gguf"
    write_gguf(path, sentencepiece_metadata(), "llama")
    return path


@pytest.fixture(scope="module")
def qwen(qwen_file):
    return Tokenizer.from_gguf(qwen_file)


@pytest.fixture(scope="module")
def mixtral(mixtral_file):
    return Tokenizer.from_gguf(mixtral_file)


def hf_reference(path):
    """Hugging Face transformers' tokenizer for the same GGUF file (its from_pretrained(gguf_file=) path)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    return convert_gguf_tokenizer(arch, tokenizer_dict)[0]


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.token_text(i) for i in tok.encode(text, add_special=False)]


@pytest.mark.parametrize("name", ["qwen", "mixtral"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(request, name, text):
    tok = request.getfixturevalue(name)
    ids = tok.encode(text, add_special=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_trained_pieces_are_used_not_just_bytes(qwen, mixtral):
    # A round trip alone would pass on a tokenizer that spells everything byte by byte.
    assert pieces(qwen, "The lazy dog") == ["The", "Ġlazy", "Ġdog"]
    assert pieces(mixtral, "The lazy dog") == [f"{SPACE}The", f"{SPACE}lazy", f"{SPACE}do", "g"]


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_byte_level_matches_hugging_face(tmp_path, pre):
    write_gguf(tmp_path / "m.gguf", byte_level_metadata(pre), "qwen3moe")
    ours, hf = Tokenizer.from_gguf(tmp_path / "m.gguf"), hf_reference(tmp_path / "m.gguf")
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n<think>x</think>", "I'M here, they'LL see 2024's"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_sentencepiece_matches_hugging_face_except_for_llama_cpp_spaces(mixtral, mixtral_file):
    hf = hf_reference(mixtral_file)
    for text in TEXTS + ["foo</s>bar"]:
        if not text.startswith(" ") and "</s>" not in text:
            assert mixtral.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids, text
    # Where they differ we follow SentencePiece and llama.cpp, which prepend " " to every stretch of text
    # between special tokens, even one starting with a space; Hugging Face's Metaspace pre-tokenizer does
    # so only at the start of the text and only when no space is already there.
    assert pieces(mixtral, "  two")[1:] == hf.encode("  two", add_special_tokens=False).tokens
    ours, theirs = pieces(mixtral, "foo</s>bar"), hf.encode("foo</s>bar", add_special_tokens=False).tokens
    assert ours[:4] == theirs[:4] and ours[3:5] == ["</s>", SPACE] and theirs[4] != SPACE
    assert mixtral.decode(mixtral.encode(" x", add_special=False)) == " x"


def test_llama3_takes_whole_words_from_the_vocabulary():
    # llama.cpp (and Llama 3's tokenizer.json) skip the merges for a word that is itself a token.
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "c", "bc", "ab", "abc"],
        "tokenizer.ggml.merges": ["b c", "a b"],
    }
    assert Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "llama-bpe"}).encode("abc") == [5]
    assert Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "qwen2"}).encode("abc") == [0, 3]


def test_merges_from_scores_rank_by_merged_piece_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    # bc outranks ab; abc is made by two merges of equal rank, the one with the longer left part first.
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_merges_from_scores_are_every_split_into_two_pieces_of_the_vocabulary():
    """Only the splits at lengths of the vocabulary's pieces are tried (a damaged file's piece of a million characters
    was a trillion comparisons): the same merges, in the same order, as trying every place of every piece. A vocabulary
    of random pieces over three letters, most of whose pieces split several ways, and one long piece."""
    rng = random.Random(5)
    pieces = {"".join(rng.choice("abc") for _ in range(rng.randint(1, 7))) for _ in range(400)} | {"a" * 300, "a" * 299}
    tokens = sorted(pieces, key=lambda p: (rng.random(), p))
    scores = [float(rng.randint(-20, 0)) for _ in tokens]
    ids = {t: i for i, t in enumerate(tokens)}
    every_place = []
    for piece, score in zip(tokens, scores, strict=True):
        splits = sorted(((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids),
                        key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        every_place += [(left, right, score) for left, right in splits]
    every_place.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    got = merges_from_scores(tokens, scores)
    assert got == [(left, right) for left, right, _ in every_place] and ("a" * 299, "a") in got


def test_sentencepiece_bytes_fall_back_to_byte_tokens(mixtral):
    ids = mixtral.encode("🦊", add_special=False)
    assert [mixtral.token_text(i) for i in ids] == [SPACE, "<0xF0>", "<0x9F>", "<0xA6>", "<0x8A>"]


def test_sentencepiece_byte_tokens_that_form_no_character_spoil_no_other(mixtral):
    # As SentencePiece decodes them: a stray byte is one U+FFFD, and the characters around it stay.
    fox, newline, stray = (mixtral.encode("🦊", add_special=False)[1:], mixtral.tokens.index("<0x0A>"),
                          mixtral.tokens.index("<0xCC>"))
    after = mixtral.encode("and", add_special=False)
    assert mixtral.decode([newline, stray]) == "\n\ufffd"
    ids = [*fox, stray, *after]
    assert mixtral.decode(ids) == "🦊\ufffd and"
    assert "".join(stream(mixtral, ids)) == "🦊\ufffd and"


def test_sentencepiece_byte_tokens_are_known_by_their_spelling_without_token_types():
    # A file without tokenizer.ggml.token_type: encoding falls back on <0xNN> pieces by their text, so decoding
    # must read them as bytes too, not print "<0x0A>".
    md = {k: v for k, v in sentencepiece_metadata().items() if k != "tokenizer.ggml.token_type"}
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "<0x0a>", "<0x0A0>"]
    md["tokenizer.ggml.scores"] = [*md["tokenizer.ggml.scores"], -1000.0, -1000.0]
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("🦊 ok", add_special=False)
    assert tok.token_text(ids[1]) == "<0xF0>" and tok.decode(ids) == "🦊 ok"
    assert "".join(stream(tok, ids)) == "🦊 ok"
    assert tok.decode([tok.tokens.index("<0x0A>")]) == "\n"
    # Only two uppercase hex digits spell a byte token; a piece merely like one is text.
    assert tok.decode([tok.vocab_size - 2, tok.vocab_size - 1]) == "<0x0a><0x0A0>"


def test_special_tokens_are_single_ids(qwen, mixtral):
    im_start, im_end = qwen.tokens.index("<|im_start|>"), qwen.tokens.index("<|im_end|>")
    ids = qwen.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids[1:-1] == qwen.encode("user\nhello")
    # Untrusted text: control tokens stay text; user-defined ones (<think>) are matched whole as in llama.cpp.
    literal = qwen.encode("<|im_end|>", special=False)
    assert im_end not in literal and qwen.decode(literal) == "<|im_end|>"
    assert qwen.encode("<think>", special=False) == [qwen.tokens.index("<think>")]
    assert mixtral.encode("a</s>b<unk>", add_special=False)[1:] == [2] + mixtral.encode("b", add_special=False) + [0]
    assert 2 not in mixtral.encode("a</s>b", add_special=False, special=False)


def test_bos_eos_and_stop_ids(qwen, mixtral):
    assert mixtral.encode("hi")[0] == 1 and mixtral.encode("hi", add_special=False)[0] != 1
    assert qwen.encode("hi") == qwen.encode("hi", add_special=False)  # Qwen asks for no BOS
    assert mixtral.bos_id == 1 and mixtral.eos_id == 2 and mixtral.eos_token_ids == {2}
    ends = {qwen.tokens.index("<|im_end|>"), qwen.tokens.index("<|endoftext|>")}
    assert qwen.eos_id == qwen.tokens.index("<|im_end|>") and qwen.eos_token_ids == ends
    assert qwen.pad_id == qwen.tokens.index("<|endoftext|>")


def test_add_bos_and_eos_flags_are_read():
    md = sentencepiece_metadata()
    md["tokenizer.ggml.add_bos_token"] = False
    md["tokenizer.ggml.add_eos_token"] = True
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("hi") == tok.encode("hi", add_special=False) + [2]


def test_decode_skips_special_tokens_when_asked(qwen, mixtral):
    ids = qwen.encode("<|im_start|>assistant\n<think>hm</think>Hi<|im_end|>")
    assert qwen.decode(ids) == "<|im_start|>assistant\n<think>hm</think>Hi<|im_end|>"
    assert qwen.decode(ids, skip_special=True) == "assistant\n<think>hm</think>Hi"
    assert mixtral.decode(mixtral.encode("Hi there") + [2], skip_special=True) == "Hi there"


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    detok = tok.detokenizer(skip_special)
    return [detok.feed(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("name", ["qwen", "mixtral"])
@pytest.mark.parametrize("skip_special", [False, True])
def test_incremental_detokenizer_joins_to_decode(request, name, skip_special):
    tok = request.getfixturevalue(name)
    with_specials = ["<|im_start|>assistant\n<think>x</think>Hi 🦊<|im_end|>", "<s> a</s> b </s>"]
    for text in TEXTS + with_specials:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip_special)
        assert "".join(pieces) == tok.decode(ids, skip_special=skip_special), text
        assert not any("\ufffd" in p for p in pieces), text


@pytest.mark.parametrize("name", ["qwen", "mixtral"])
def test_incremental_detokenizer_holds_partial_characters(request, name):
    tok = request.getfixturevalue(name)
    ids = tok.encode("ok 🦊", add_special=False)
    pieces = stream(tok, ids)
    assert len(ids) >= 4 and pieces[-2] == "🦊" and pieces[-1] == ""
    assert all(p == "" for p in pieces[-5:-2])  # the fox's first three bytes produce nothing yet
    # A sequence cut inside a character: flush hands out what decode shows for it.
    detok = tok.detokenizer()
    assert "".join([detok.feed(i) for i in ids[:-2]]) == "ok "
    rest = detok.flush()
    assert rest.startswith("\ufffd") and rest == tok.decode(ids[:-2])[len("ok ") :]


def test_incremental_detokenizer_keeps_sentencepiece_spaces(mixtral):
    ids = mixtral.encode("The lazy dog", add_special=False)  # ▁The ▁lazy ▁do g
    assert stream(mixtral, ids) == ["The", " lazy", " do", "g", ""]


@pytest.mark.parametrize("name", ["qwen", "mixtral"])
@pytest.mark.parametrize("skip_special", [False, True])
def test_incremental_detokenizer_continues_its_context(request, name, skip_special):
    # A completion's text is what it adds to the prompt's: SentencePiece's decoder drops the leading space
    # of a text's first piece, which the first generated word must keep (" dog", not "dog"), also after a
    # control token that adds no text.
    tok = request.getfixturevalue(name)
    ids = tok.encode("The lazy<|im_start|> dog</s> 🦊<s><|im_end|> jumps<|endoftext|>")
    for cut in range(1, len(ids)):
        prompt, completion = ids[:cut], ids[cut:]
        detok = tok.detokenizer(skip_special, context=prompt)
        text = "".join([detok.feed(i) for i in completion] + [detok.flush()])
        whole, before = tok.decode(ids, skip_special), tok.decode(prompt, skip_special)
        if "\ufffd" not in before:  # a prompt cut inside the fox: its bytes cannot be split between the two texts
            assert before + text == whole, cut


def test_a_word_after_a_context_that_ends_inside_a_character_keeps_its_space(mixtral):
    """A prompt ending in a character's first bytes (a reply cut off mid-emoji, sent back as token ids): the window
    opened on nothing, and SentencePiece's decoder dropped the space of the first generated word ("is", where
    decode(prompt + completion) reads "... is")."""
    fox = [i for i in mixtral.encode("🦊", add_special=False) if mixtral.token_types[i] == BYTE]
    prompt = mixtral.encode("Hello", add_special=False) + fox[:2]
    completion = mixtral.encode("is", add_special=False)  # ▁is
    detok = mixtral.detokenizer(context=prompt)
    text = "".join([detok.feed(i) for i in completion] + [detok.flush()])
    assert text == " is" and mixtral.decode(prompt) + text == mixtral.decode(prompt + completion)


def test_chatml_template_and_its_tokens(qwen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = qwen.apply_chat_template(messages)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not qwen.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = qwen.encode(prompt)
    assert ids.count(qwen.tokens.index("<|im_start|>")) == 3 and ids.count(qwen.tokens.index("<|im_end|>")) == 2


def test_mixtral_template(mixtral):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert mixtral.apply_chat_template(messages) == "<s>[INST] Hi [/INST]Hello!</s>[INST] How are you? [/INST]"
    with pytest.raises(ChatTemplateError, match="must alternate"):
        mixtral.apply_chat_template(messages[1:])
    ids = mixtral.encode(mixtral.apply_chat_template(messages[:1]), add_special=False)
    assert ids[0] == 1 and ids.count(1) == 1


def test_templates_render_as_transformers_renders_them():
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "user", "content": "Grüß dich 你好"}, {"role": "assistant", "content": "Hi"}]
    tools = [{"name": "weather", "description": "Météo", "parameters": {"city": "string"}}]
    for md, template in [
        (byte_level_metadata(template=CHATML), CHATML),
        (byte_level_metadata(template=QWEN_STYLE), QWEN_STYLE),
        (sentencepiece_metadata(template=MIXTRAL), MIXTRAL),
    ]:
        ours = Tokenizer.from_metadata(md)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=HFTokenizer(BPE()),
            chat_template=template,
            bos_token=ours.token_text(ours.bos_id),
            eos_token=ours.token_text(ours.eos_id),
        )
        for gen in (True, False):
            for extra in ({}, {"tools": tools, "enable_thinking": False}):
                expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
                assert ours.apply_chat_template(messages, gen, **extra) == expected
    qwen = Tokenizer.from_metadata(byte_level_metadata(template=QWEN_STYLE))
    prompt = qwen.apply_chat_template(messages[:1], tools=tools, enable_thinking=False)
    assert '"Météo"' in prompt and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _rendered_by_both(template: str, messages: list[dict]) -> tuple[str, str]:
    """`messages` rendered by `template` here and by transformers' apply_chat_template, with a generation prompt."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(BPE()), chat_template=template)
    return (Tokenizer.from_metadata(byte_level_metadata(template=template)).apply_chat_template(messages),
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_generation_blocks_of_training_templates_render_their_text():
    """Templates written for assistant-only training wrap the assistant's turns in {% generation %} blocks."""

    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ours, theirs = _rendered_by_both(template, messages)
    assert ours == theirs


def test_a_message_key_set_to_null_is_read_as_left_out():
    """OpenAI-style clients send "tool_calls": null on plain replies; Mistral-Small-3.1's template takes any
    message where `message.tool_calls is defined` for a tool call."""

    template = (
        "{% for message in messages %}{% if message.tool_calls is defined %}"
        "{% for call in message.tool_calls %}[TOOL_CALLS]{{ call.function | tojson }}{% endfor %}"
        "{% else %}{{ '[INST]' + message.content + '[/INST]' if message.role == 'user' else message.content }}"
        "{% endif %}{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "Hi", "name": None},
        {"role": "assistant", "content": "Hello", "tool_calls": None},
        {"role": "user", "content": "Weather?"},
    ]
    ours, theirs = _rendered_by_both(template, messages)
    assert ours == theirs == "[INST]Hi[/INST]Hello[INST]Weather?[/INST]"


def test_tools_and_documents_not_given_are_none():
    """transformers renders every template with `tools` and `documents`, None when not given; templates test
    `tools is not none`, which an undefined variable passes."""

    template = (
        "{% if tools is not none %}[TOOLS]{{ tools | tojson }}{% endif %}"
        "{% if documents is not none %}[DOCS]{{ documents | tojson }}{% endif %}"
        "{% for message in messages %}{{ message.content }}{% endfor %}"
    )
    ours, theirs = _rendered_by_both(template, [{"role": "user", "content": "Hi"}])
    assert ours == theirs == "Hi"
    qwen = Tokenizer.from_metadata(byte_level_metadata(template=template))
    assert qwen.apply_chat_template([], tools=[{"name": "f"}]) == '[TOOLS][{"name": "f"}]'


def test_missing_or_broken_chat_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_metadata(byte_level_metadata(template=None)).apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        Tokenizer.from_metadata(byte_level_metadata(template="{% for %}")).apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="failed"):
        Tokenizer.from_metadata(byte_level_metadata()).apply_chat_template([{"role": "user", "content": None}])
    # Python errors the template's own code raises on these messages (str.index: "substring not found")
    index = Tokenizer.from_metadata(byte_level_metadata(template="{{ messages[0].content.index('?') }}"))
    with pytest.raises(ChatTemplateError, match="failed.*ValueError.*substring not found"):
        index.apply_chat_template([{"role": "user", "content": "no question"}])


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="shared.tokenizer"):
        tok = Tokenizer.from_metadata(byte_level_metadata(pre="no-such-pre"))
    assert "no-such-pre" in caplog.text
    gpt2 = Tokenizer.from_metadata(byte_level_metadata(pre="gpt-2"))
    qwen = Tokenizer.from_metadata(byte_level_metadata(pre="qwen2"))
    # qwen2 splits digits one by one, gpt-2 keeps runs of digits together.
    assert tok.encode("12345") == gpt2.encode("12345") != qwen.encode("12345")


def test_errors_name_the_problem(qwen):
    md = byte_level_metadata()
    with pytest.raises(TokenizerError, match="unknown tokenizer model 'bert'"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({k: v for k, v in md.items() if k != "tokenizer.ggml.tokens"})
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.merges": ["x \u4e00\u4e01"]})
    with pytest.raises(TokenizerError, match="eos_token_id"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(TokenizerError, match=f"token id {qwen.vocab_size} is outside"):
        qwen.decode([1, qwen.vocab_size])
    with pytest.raises(TokenizerError, match="token id -1"):
        qwen.detokenizer().feed(-1)
    with pytest.raises(ValueError):
        qwen.token_text(qwen.vocab_size)


def test_a_byte_typed_token_not_spelled_as_a_byte_is_refused():
    """Decoded by its spelling, <0xZZ> or "hello" typed as a byte failed every request that streamed it."""
    md = sentencepiece_metadata()
    for spelling in ("<0xZZ>", "hello"):
        tokens = list(md["tokenizer.ggml.tokens"])
        tokens[3] = spelling  # the first byte token
        with pytest.raises(TokenizerError, match=f"token 3 \\('{spelling}'\\) has the byte type"):
            Tokenizer.from_metadata({**md, "tokenizer.ggml.tokens": tokens})


@pytest.mark.parametrize(
    "key, value, found, expected",
    [
        ("tokenizer.ggml.model", 2, "int 2", "str"),
        ("tokenizer.ggml.tokens", ["a", 1], "a list whose item 1 is int 1", "list[str]"),
        ("tokenizer.ggml.token_type", 3, "int 3", "list[int]"),
        ("tokenizer.ggml.token_type", ["1"], "a list whose item 0 is str '1'", "list[int]"),
        ("tokenizer.ggml.merges", 5, "int 5", "list[str]"),
        ("tokenizer.ggml.pre", [1], "list [1]", "str"),
        ("tokenizer.ggml.bos_token_id", "x", "str 'x'", "int"),
        ("tokenizer.ggml.eos_token_id", 1.5, "float 1.5", "int"),
        ("tokenizer.ggml.padding_token_id", True, "bool True", "int"),
        ("tokenizer.ggml.eot_token_id", "7", "str '7'", "int"),
        ("tokenizer.ggml.add_bos_token", "yes", "str 'yes'", "bool"),
        ("tokenizer.ggml.add_eos_token", 0, "int 0", "bool"),
        ("tokenizer.chat_template", 1, "int 1", "str"),
        ("tokenizer.ggml.scores", "high", "str 'high'", "list[float]"),
        ("tokenizer.ggml.unknown_token_id", 0.0, "float 0.0", "int"),
        ("tokenizer.ggml.add_space_prefix", 1, "int 1", "bool"),
    ],
)
def test_metadata_of_the_wrong_type_is_named(key, value, found, expected):
    # A GGUF file may store any type under any key: one the tokenizer cannot use is refused by name, not left to
    # fail deep inside the build (a TypeError the coordinator did not expect) or be read as something else.
    sentencepiece_only = ("tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix")
    md = sentencepiece_metadata() if key in sentencepiece_only else byte_level_metadata()
    with pytest.raises(TokenizerError, match=re.escape(f"{key} is {found}, expected {expected}")):
        Tokenizer.from_metadata({**md, key: value})


@pytest.mark.parametrize("key", ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id"])
def test_token_ids_outside_the_vocabulary_are_named(key):
    md = sentencepiece_metadata()
    n = len(md["tokenizer.ggml.tokens"])
    with pytest.raises(TokenizerError, match=f"{key} = -1 is outside the vocabulary of {n}"):
        Tokenizer.from_metadata({**md, key: -1})


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_scores_that_are_not_finite_are_named(score):
    # Scores rank SentencePiece's merges: a NaN would sort anywhere and leave encoding silently wrong.
    md = sentencepiece_metadata()
    scores = list(md["tokenizer.ggml.scores"])
    scores[300] = score
    with pytest.raises(TokenizerError, match=re.escape(f"tokenizer.ggml.scores item 300 is {score}, not a finite")):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.scores": scores})
