"""Render a model's chat template into a prompt string, in the Jinja2 environment Hugging Face uses.

Templates are written against transformers' `apply_chat_template`: a sandboxed environment with
trim_blocks/lstrip_blocks, the loopcontrols extension, `{% generation %}` blocks, a `tojson` filter that
keeps non-ASCII text, and `raise_exception` / `strftime_now` globals. A template that renders there renders
the same here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered for these messages; the message says why."""


def _raise_exception(message: str) -> None:
    # Templates call this to refuse a conversation (e.g. roles that do not alternate): a client error.
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: templates written for assistant-only training mark the
    assistant's text with it (transformers maps it to a loss mask); a prompt only needs the text inside."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, as transformers parses it, so the body has the same scope there and here.
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled template; `render` is safe to call from several requests (the template holds no state)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt for `messages`; extra variables (tools, documents, enable_thinking...) reach the template."""
        # transformers passes tools and documents to every template, None when not given: templates test
        # `tools is not none`, which an undefined variable would pass.
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}
        context.update(variables)
        # A key set to null is a key left out, as transformers and llama.cpp read messages: templates test
        # `message.tool_calls is defined`, and OpenAI-style clients send "tool_calls": null on plain replies.
        present = [{key: value for key, value in m.items() if value is not None} for m in messages]
        try:
            return self._template.render(messages=present, add_generation_prompt=add_generation_prompt, **context)
        except ChatTemplateError:
            raise  # the template refused the conversation: its own message says why
        except Exception as e:
            # Jinja's errors and whatever Python raises in the template's code on these messages (TypeError for
            # content of another shape, ValueError from str.index...): a refusal of this request, not a server fault.
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
