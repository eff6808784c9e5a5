"""Text to token ids and back for a GGUF model, built from its metadata on the `tokenizers` library.

llama.cpp writes two tokenizer families into GGUF files, and both are built here to split text as
llama.cpp does on the same file:
- "gpt2": byte-level BPE with its merge list (Qwen, OLMoE); the words BPE sees come from the
  pre-tokenizer regex that `tokenizer.ggml.pre` names.
- "llama": SentencePiece BPE (Mixtral): pieces spelled with "▁" for spaces, scores instead of
  merges, and <0xXX> tokens for bytes no piece covers.
Control and user-defined tokens are matched whole in the text; the chat template comes along.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any, get_args, get_origin

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from shared.chat_template import ChatTemplate, ChatTemplateError
from shared.gguf_file import GGUFModel

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # 5 (unused) is read as normal
# Special tokens: markup, matched in text only when asked to and left out of it by skip_special
_SPECIAL_TYPES = (UNKNOWN, CONTROL)

SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# The pre-tokenizer regexes of tokenizer.json (llama.cpp spells the case-insensitive group out by hand).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex, ignore_merges): llama.cpp takes a whole word that is in the vocabulary
# as one token without merging for the llama3 family only.
_PRE_TOKENIZERS = {
    "default": (GPT2_SPLIT, False),
    "gpt-2": (GPT2_SPLIT, False),
    "olmo": (GPT2_SPLIT, False),
    "qwen2": (QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (QWEN2_SPLIT, False),
    "llama-bpe": (LLAMA3_SPLIT, True),
    "llama3": (LLAMA3_SPLIT, True),
    "llama-v3": (LLAMA3_SPLIT, True),
    "dbrx": (LLAMA3_SPLIT, True),
    "smaug-bpe": (LLAMA3_SPLIT, True),
}

# Texts of end-of-turn tokens: a chat model ends its reply with one of these rather than with eos
# (llama.cpp's end-of-generation list, restricted to the families tierserve serves and their kin).
_END_OF_TURN = frozenset({"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"})


class TokenizerError(ValueError):
    """Metadata no tokenizer can be built from, or token ids this vocabulary does not have."""


def split_merge(merge: str) -> tuple[str, str]:
    """One "left right" entry of tokenizer.ggml.merges; as llama.cpp, the separator is the first space
    after the first character, so a left part that is itself a space survives."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise TokenizerError(f"tokenizer.ggml.merges entry {merge!r} has no space between its two parts")
    return merge[:cut], merge[cut + 1 :]


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging, as Hugging Face converts it.

    Every split of a piece into two pieces of the vocabulary is a merge, ranked by the score of the
    piece it makes (higher first; ties: longer left part, then longer right part). Splits of one piece
    come in the order of their parts' ids, which is where the sort's stability leaves equal ranks.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores, strict=True))
    # a split's two parts have lengths of the vocabulary's pieces: trying only those (a few dozen) rather than every
    # place in the piece, a piece of a million characters in a damaged file is not a trillion comparisons at start
    lengths = {len(t) for t in tokens}
    merges = []
    for piece, score in score_of.items():
        n = len(piece)
        local = [(piece[:k], piece[k:]) for k in lengths
                 if 0 < k < n and n - k in lengths and piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        merges += [(left, right, score) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


# The type of every metadata key the tokenizer reads. A GGUF file may store any type under any key, and a
# wrong one would otherwise fail deep inside the build or be read as something else (bool("no") is True).
_KEY_TYPES: dict[str, Any] = {
    "tokenizer.ggml.model": str,
    "tokenizer.ggml.pre": str,
    "tokenizer.ggml.tokens": list[str],
    "tokenizer.ggml.token_type": list[int],
    "tokenizer.ggml.merges": list[str],
    "tokenizer.ggml.scores": list[float],
    "tokenizer.ggml.add_bos_token": bool,
    "tokenizer.ggml.add_eos_token": bool,
    "tokenizer.ggml.add_space_prefix": bool,
    "tokenizer.chat_template": str,
    **{f"tokenizer.ggml.{name}_token_id": int for name in ("bos", "eos", "padding", "unknown", "eot", "eom")},
}
# bool is an int to Python, but never a number in GGUF; numpy scalars are accepted as the numbers they are
_ACCEPTED = {str: str, bool: bool, int: numbers.Integral, float: numbers.Real, list: list}
_REQUIRED = object()


def _fits(t: type, kind: Any) -> bool:
    return issubclass(t, _ACCEPTED[get_origin(kind) or kind]) and (kind is bool or not issubclass(t, bool))


def _mismatch(value: Any, kind: Any) -> str | None:
    """What `value` is when it is not of type `kind` (a list[...] type checks every item), else None."""
    if not _fits(type(value), kind):
        return f"{type(value).__name__} {reprlib.repr(value)}"
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        # by the items' distinct types: a vocabulary's lists have some 150k items
        if not all(_fits(t, item) for t in set(map(type, value))):
            bad = next(i for i, v in enumerate(value) if not _fits(type(v), item))
            return f"a list whose item {bad} is {_mismatch(value[bad], item)}"
    return None


def _get(md: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """md[key], refused unless it has the type _KEY_TYPES gives it; `default` when it is absent."""
    if key not in md:
        if default is _REQUIRED:
            raise TokenizerError(f"metadata key {key} is missing: the file carries no usable tokenizer")
        return default
    kind = _KEY_TYPES[key]
    if (found := _mismatch(md[key], kind)) is not None:
        expected = str(kind) if get_origin(kind) else kind.__name__
        raise TokenizerError(f"metadata key {key} is {found}, expected {expected}")
    return md[key]


def _token_id(md: Mapping[str, Any], key: str, default: int | None, n_tokens: int) -> int | None:
    value = _get(md, key, default)
    if value is not None and not 0 <= value < n_tokens:
        raise TokenizerError(f"{key} = {value} is outside the vocabulary of {n_tokens}")
    return None if value is None else int(value)


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) < len(tokens):
        log.warning(
            "%d tokens repeat an earlier token's text: encoding never produces them",
            len(tokens) - len(vocab),
        )
    return vocab


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> BPE:
    try:
        return BPE(vocab, merges, **options)
    except Exception as e:  # `tokenizers` raises a bare Exception for merges that name unknown tokens
        raise TokenizerError(f"tokenizer merges do not fit the vocabulary: {e}") from e


def _byte_level(md: Mapping[str, Any], tokens: Sequence[str]) -> HFTokenizer:
    pre = _get(md, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        log.warning("unknown pre-tokenizer %r (tokenizer.ggml.pre): splitting words as gpt-2 does", pre)
    split, ignore_merges = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["gpt-2"])
    merges = [split_merge(m) for m in _get(md, "tokenizer.ggml.merges")]
    tok = HFTokenizer(_bpe(_vocab(tokens), merges, ignore_merges=ignore_merges))
    # No NFC normalizer although Qwen's tokenizer.json has one: llama.cpp does not normalize.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _scores(md: Mapping[str, Any], n_tokens: int) -> list[float]:
    scores = _get(md, "tokenizer.ggml.scores")
    if len(scores) != n_tokens:
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n_tokens} tokens")
    # Scores rank the merges: a NaN has no place in that order (the sort would leave merges anywhere, and
    # encoding silently wrong), and no vocabulary scores a piece infinitely; either marks a broken file.
    if not all(map(math.isfinite, scores)):
        bad = next(i for i, score in enumerate(scores) if not math.isfinite(score))
        raise TokenizerError(f"tokenizer.ggml.scores item {bad} is {scores[bad]}, not a finite number")
    return scores


def _sentencepiece(md: Mapping[str, Any], tokens: Sequence[str]) -> HFTokenizer:
    scores = _scores(md, len(tokens))
    unk = _token_id(md, "tokenizer.ggml.unknown_token_id", 0, len(tokens))
    model = _bpe(
        _vocab(tokens), merges_from_scores(tokens, scores), unk_token=tokens[unk], byte_fallback=True, fuse_unk=True
    )
    tok = HFTokenizer(model)
    # A normalizer rather than the Metaspace pre-tokenizer: it prepends "▁" to every stretch of text
    # between special tokens, even one that starts with a space, which is what SentencePiece and
    # llama.cpp do (Metaspace skips text already starting with a space, so " hi" would lose one).
    spaces = normalizers.Replace(" ", SPACE)
    if _get(md, "tokenizer.ggml.add_space_prefix", True):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spaces])
    else:
        tok.normalizer = spaces
    return tok  # decoded by Tokenizer._decode_sentencepiece


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _default_types(tokens: Sequence[str], spm: bool) -> list[int]:
    """Token types for a file that gives none: all normal, but for SentencePiece's byte tokens, known by their
    spelling. Encoding falls back on them by that spelling (llama.cpp's byte fallback and `tokenizers`' alike),
    so decoding must read them as bytes, not print "<0x0A>"."""
    return [BYTE if spm and _BYTE_TOKEN.fullmatch(t) else NORMAL for t in tokens]


class Tokenizer:
    """A GGUF model's tokenizer: encode, decode, stream-decode and render chats.

    Ids are the GGUF's: id i is tokenizer.ggml.tokens[i], whatever the `tokenizers` object inside does.
    """

    def __init__(self, md: Mapping[str, Any]) -> None:
        model = _get(md, "tokenizer.ggml.model")
        if model not in _BUILDERS:
            raise TokenizerError(f"unknown tokenizer model {model!r} (tokenizer.ggml.model); supported: gpt2, llama")
        self.model = model
        self.tokens: list[str] = list(_get(md, "tokenizer.ggml.tokens"))
        spm = model == "llama"
        types = _get(md, "tokenizer.ggml.token_type", []) or _default_types(self.tokens, spm)
        self.token_types: list[int] = list(types)
        if len(self.token_types) != len(self.tokens):
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(self.token_types)} entries for {len(self.tokens)} tokens"
            )
        if spm:  # decoded by their spelling: one that is not <0xXX> failed every request that streamed it
            bad = next((i for i, (t, kind) in enumerate(zip(self.tokens, self.token_types, strict=True))
                        if kind == BYTE and not _BYTE_TOKEN.fullmatch(t)), None)
            if bad is not None:
                raise TokenizerError(f"token {bad} ({self.tokens[bad]!r}) has the byte type (tokenizer.ggml.token_type"
                                     f" {BYTE}) but is not spelled <0xXX>")
        # llama.cpp's defaults for files that do not say: SentencePiece vocabularies put <s> first.
        n = len(self.tokens)
        self.bos_id = _token_id(md, "tokenizer.ggml.bos_token_id", 1 if spm else None, n)
        self.eos_id = _token_id(md, "tokenizer.ggml.eos_token_id", 2 if spm else None, n)
        self.pad_id = _token_id(md, "tokenizer.ggml.padding_token_id", None, n)
        self.add_bos = _get(md, "tokenizer.ggml.add_bos_token", spm) and self.bos_id is not None
        self.add_eos = _get(md, "tokenizer.ggml.add_eos_token", False) and self.eos_id is not None
        self._template_source: str | None = _get(md, "tokenizer.chat_template", None)
        self._space_prefix = spm and _get(md, "tokenizer.ggml.add_space_prefix", True)

        self._hf = _BUILDERS[model](md, self.tokens)
        # llama.cpp matches unknown and control tokens only when asked to parse special tokens, and
        # user-defined ones (e.g. <think>) always; tokenizers' special / non-special added tokens do the same.
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(self.tokens, self.token_types, strict=True)
            if kind in _SPECIAL_TYPES
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(self.tokens, self.token_types, strict=True)
            if kind == USER_DEFINED
        ]
        self._hf.add_special_tokens(special)
        self._hf.add_tokens(user)

        ends = {self.eos_id} if self.eos_id is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if (extra := _token_id(md, key, None, n)) is not None:
                ends.add(extra)
        ends.update(
            i
            for i, (t, kind) in enumerate(zip(self.tokens, self.token_types, strict=True))
            if t in _END_OF_TURN and kind in (CONTROL, USER_DEFINED)
        )
        self.eos_token_ids: frozenset[int] = frozenset(ends)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls(GGUFModel(path).metadata)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (byte-level or "▁" pieces), not as decoded text."""
        self._check_ids([token_id])
        return self.tokens[token_id]

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= len(self.tokens)):
            bad = next(i for i in ids if not 0 <= i < len(self.tokens))
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {len(self.tokens)} tokens")

    @cached_property
    def _hf_literal(self) -> HFTokenizer:
        # A copy that reads control tokens as text; built on first use, since copying a large vocabulary
        # takes a second, and a per-call flag on the shared object would race between threads.
        literal = HFTokenizer.from_str(self._hf.to_str())
        literal.encode_special_tokens = True
        return literal

    def encode(self, text: str, add_special: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text`. add_special: add BOS/EOS where the model asks for them. special: match
        control tokens written in the text (<|im_start|>...) as single ids; off for untrusted text."""
        hf = self._hf if special else self._hf_literal
        # the batch call, unlike encode, releases the GIL while it works: a thread tokenizing a long prompt (half a
        # second for 1 MiB) leaves the coordinator's event loop running; it also skips the offsets, unused here
        ids = hf.encode_batch_fast([text], add_special_tokens=False)[0].ids
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False, continuation: bool = False) -> str:
        """The text of `ids`; as a `continuation` of earlier text, with SentencePiece's leading space kept (its
        decoder drops the space of a text's first piece)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if self.model == "llama":
            return self._decode_sentencepiece(ids, skip_special, continuation)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def _decode_sentencepiece(self, ids: list[int], skip_special: bool, continuation: bool) -> str:
        # Bytes first and text from them at the end, as SentencePiece decodes: `tokenizers`' ByteFallback turns
        # every byte of a run of byte tokens that is not all valid UTF-8 into U+FFFD, whole characters included.
        out = bytearray()
        for i in ids:
            kind = self.token_types[i]
            if kind == BYTE:
                out.append(int(self.tokens[i][3:5], 16))
            elif not (skip_special and kind in _SPECIAL_TYPES):
                out += self.tokens[i].replace(SPACE, " ").encode()
        text = out.decode("utf-8", "replace")
        return text[1:] if self._space_prefix and not continuation and text.startswith(" ") else text

    def detokenizer(self, skip_special: bool = False, context: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A stream decoder for the tokens that follow `context` (the prompt): it hands out the text they add."""
        return IncrementalDetokenizer(self, skip_special, context)

    @cached_property
    def chat_template(self) -> ChatTemplate:
        if not self._template_source:
            raise ChatTemplateError(
                "the model has no chat template (tokenizer.chat_template is missing): send a prompt or token ids"
            )
        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return ChatTemplate(self._template_source, bos_token=bos, eos_token=eos)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for a conversation; encode it with special=True."""
        return self.chat_template.render(messages, add_generation_prompt, **variables)


class IncrementalDetokenizer:
    """Text of a growing token sequence, handed out as it becomes final.

    Decoding one token alone is wrong in two ways: a character may span several byte tokens, and
    SentencePiece's decoder drops the leading space of whatever it decodes. So each step decodes a
    short window twice, with and without the new tokens, and hands out the difference once it no longer
    ends in a partial character (U+FFFD). The pieces joined equal `decode` of the whole sequence, or, after a
    context, what the sequence adds to the context's text (a first piece keeps its leading space).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        # The window opens on the end of the context, so the first new token is decoded as a continuation: on
        # its shortest tail of whole characters (one spans at most 4 byte tokens), or on nothing when the context
        # ends inside a character, since the new tokens' text would then start inside it. Tokens that skip_special
        # leaves out never enter the window, rather than being decoded as nothing: SentencePiece's decoder drops
        # a text's leading space, so a window opening on one would take the space of the piece after it.
        last = list(itertools.islice((int(i) for i in reversed(context) if not self._skipped(i)), 4))[::-1]
        tails = (last[-n:] for n in range(1, len(last) + 1))
        self._ids: list[int] = next((t for t in tails if "\ufffd" not in tokenizer.decode(t)), [])
        # a window opening on nothing after a context decodes as what it is, a continuation: its first piece's
        # leading space is the text's (decode(context + new) has it)
        self._continuation = bool(last) and not self._ids
        self._prefix = 0  # start of the window: text before it is already handed out
        self._read = len(self._ids)  # end of what has been handed out

    def feed(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is still partial, and for a
        token that skip_special leaves out)."""
        self._tok._check_ids([token_id])
        if self._skipped(token_id):
            return ""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def _skipped(self, token_id: int) -> bool:
        return self._skip and self._tok.token_types[token_id] in _SPECIAL_TYPES

    def flush(self) -> str:
        """At the end of the sequence: whatever is held back, partial characters decoded as U+FFFD."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._tok.decode(self._ids[self._prefix : self._read], continuation=self._continuation)
        text = self._tok.decode(self._ids[self._prefix :], continuation=self._continuation)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]
