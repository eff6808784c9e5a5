"""`tierserve generate`, `chat`, `health` and `stats`: the client API from a shell.

    tierserve generate "The capital of France is" --max-tokens 16 --stop "." --json
    tierserve chat --system "You answer in one sentence."
    tierserve health   # exits 0 when the server is ready, 1 otherwise

--endpoint defaults to the client_endpoint of --config FILE, else to the default configuration's.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import zmq

from shared.client import DEFAULT_TIMEOUT_S, Client, ServerError, Stream, check_timeout
from shared.config import check_endpoint, load_config


def seconds_argument(text: str) -> float:
    """An argparse type: a number of seconds a client or launcher can wait (check_timeout)."""
    try:
        return check_timeout(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def utf8_text(text: str) -> str:
    """An argparse type: text that is valid UTF-8. Arguments are decoded with surrogate escapes (and chat reads
    stdin so), so a byte that is not UTF-8 arrives as a lone surrogate, which encoding the request would refuse in
    the codec's words, naming neither the byte nor the argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8: byte {', '.join(f'{b:#04x}' for b in byte)} at character {e.start}") from None
    return text


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()  # with both, the file was ignored without a word
    where.add_argument("--endpoint", help="the coordinator's client endpoint (tcp://HOST:PORT)")
    where.add_argument("--config", help="TOML configuration file whose client_endpoint to use")
    parser.add_argument("--timeout", type=seconds_argument, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for each answer")


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int)
    # one string a flag: with several, --stop also took the prompt that followed it
    parser.add_argument("--stop", action="append", default=[], metavar="S", type=utf8_text,
                        help="a stop string (repeat for more): generation ends before the first one that appears")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop}


def _client(args: argparse.Namespace) -> Client:
    try:
        endpoint = check_endpoint(args.endpoint, "--endpoint") if args.endpoint else \
            load_config(args.config).client_connect_endpoint
    except (OSError, ValueError) as e:
        raise SystemExit(f"tierserve: {e}") from None
    try:
        return Client(endpoint, timeout_s=args.timeout)
    except zmq.ZMQError as e:
        raise SystemExit(f"tierserve: cannot connect to {endpoint!r} ({e}); an endpoint is tcp://HOST:PORT") from None


# what a request can end in: the server's refusal, no answer, or a value the request cannot carry (ValueError)
REQUEST_ERRORS = (ServerError, TimeoutError, ValueError)


def _fail(command: str, error: Exception) -> int:
    print(f"tierserve {command}: {error}", file=sys.stderr)
    return 1


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve generate", description="Complete a text, streaming it.")
    parser.add_argument("text", type=utf8_text, help="the prompt")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (token ids, text, logprobs, usage, timings) at the end")
    parser.add_argument("--logprobs", type=int, default=0,
                        help="with --json: how many top alternatives to report per token")
    _connection_arguments(parser)
    _sampling_arguments(parser)
    args = parser.parse_args(argv)
    if args.logprobs < 0:
        parser.error(f"argument --logprobs: must be 0 or more, not {args.logprobs}")
    if args.logprobs and not args.json:
        parser.error("--logprobs needs --json: the streamed text has no place for them")
    with _client(args) as client:
        try:
            if args.json:
                print(json.dumps(client.complete(prompt=args.text, logprobs=args.logprobs,
                                                 **_sampling(args)).to_dict()))
                return 0
            _print_stream(client.generate(prompt=args.text, **_sampling(args)))
            print()
        except REQUEST_ERRORS as e:
            return _fail("generate", e)
    return 0


def chat_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve chat",
                                     description="Chat over stdin: one line is one turn; end with EOF (Ctrl-D). "
                                                 "Exits 1 if a turn failed.")
    parser.add_argument("--system", type=utf8_text, help="a system message that opens the conversation")
    _connection_arguments(parser)
    _sampling_arguments(parser)
    args = parser.parse_args(argv)
    if sys.stdin is None:  # closed (<&-): its first read was an AttributeError
        parser.error("stdin is closed: chat reads its turns from it")
    if isinstance(sys.stdin, io.TextIOWrapper):  # strict in most locales: a byte not UTF-8 was a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as client:
        failed = _chat(client, messages, _sampling(args), sys.stdin.isatty())
    return 1 if failed else 0


def _chat(client: Client, messages: list[dict], sampling: dict[str, Any], interactive: bool) -> int:
    """Turns until EOF; how many failed."""
    failed = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return failed
        if not line.strip():
            continue
        try:
            messages.append({"role": "user", "content": utf8_text(line.rstrip("\n"))})
        except argparse.ArgumentTypeError as e:
            _fail("chat", f"the turn is {e}")
            failed += 1
            continue
        try:
            reply, left_out = _chat_turn(client, messages, sampling)
        except REQUEST_ERRORS as e:
            messages.pop()  # the turn did not happen; the user may try again
            _fail("chat", e)
            failed += 1
            continue
        print()
        if left_out:
            which = "its oldest exchange is" if left_out == 1 else f"its {left_out} oldest exchanges are"
            print(f"tierserve chat: the conversation outgrew the model's context: {which} left out", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})


def _chat_turn(client: Client, messages: list[dict], sampling: dict[str, Any]) -> tuple[str, int]:
    """The reply to the conversation's last turn, printed as it streams, and how many exchanges were left out. A
    conversation grown past the model's context leaves out its oldest exchanges (the system message kept) until the
    turn fits: else every later turn was refused for the same history. Where it fails, the history is as it was."""
    history = messages[:]
    first = 1 if messages[0]["role"] == "system" else 0
    try:
        while True:
            try:
                reply = _print_stream(client.generate(messages=messages, **sampling))
                return reply, (len(history) - len(messages)) // 2
            except ServerError as e:
                if e.code != "context_exceeded" or len(messages) - first < 3:  # no earlier exchange to leave out
                    raise
                del messages[first : first + 2]
    except BaseException:
        messages[:] = history
        raise


def _print_stream(stream: Stream) -> str:
    """Print a reply's text as it streams in; returns the text."""
    pieces: list[str] = []
    try:
        for event in stream:
            if event.KIND == "token":
                # counted before it is printed: Ctrl-C often lands while it is, and its line must then end too
                pieces.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except BaseException:
        # Ctrl-C or a failed reply cut it short: end its line, or the shell's prompt (or chat's next turn, or the
        # error) lands on it
        text = "".join(pieces)
        if text and not text.endswith("\n"):
            print()
        raise
    finally:
        stream.close()  # cancels the request if Ctrl-C cut it short
    return "".join(pieces)


def health_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve health",
                                     description="Print the server's status and members as JSON; exit 0 if ready.")
    _connection_arguments(parser)
    args = parser.parse_args(argv)
    with _client(args) as client:
        try:
            reply = client.health()
        except (ServerError, TimeoutError) as e:
            return _fail("health", e)
    print(json.dumps({"status": reply.status, "members": reply.members}, indent=2))
    return 0 if reply.status == "ready" else 1


def stats_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve stats", description="Print the server's counters as JSON.")
    _connection_arguments(parser)
    args = parser.parse_args(argv)
    with _client(args) as client:
        try:
            reply = client.stats()
        except (ServerError, TimeoutError) as e:
            return _fail("stats", e)
    print(json.dumps(reply.stats, indent=2))
    return 0
