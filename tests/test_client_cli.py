"""The Python clients and the `tierserve generate / chat / health / stats` commands against a running system,
their tokens checked against the fp32 oracle and their text against the tokenizer."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared.cli import main as tierserve
from shared.client import AsyncClient, Client, ServerError, run
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.reference import ReferenceModel
from shared.tokenizer import Tokenizer

PROMPT = "The expert hosts"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("client") / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=2)
    return path


@pytest.fixture(scope="module")
def system(model):
    with RunningSystem(str(model), "--expert-hosts", "1", "--hot-experts", "4") as running:
        yield running


@pytest.fixture(scope="module")
def oracle(model) -> ReferenceModel:
    return ReferenceModel(GGUFModel(model))


@pytest.fixture(scope="module")
def tokenizer(model) -> Tokenizer:
    return Tokenizer.from_gguf(model)


def expected_reply(oracle, tokenizer, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    """The oracle's greedy tokens, ending at an end-of-turn token as the server does, and their text, which has
    no control tokens."""
    ids = oracle.greedy(prompt_ids, n)
    end = next((i for i, t in enumerate(ids) if t in tokenizer.eos_token_ids), None)
    if end is not None:
        ids = ids[: end + 1]
        return ids, tokenizer.decode(ids[:-1], skip_special=True)
    return ids, tokenizer.decode(ids, skip_special=True)


def test_complete_gathers_tokens_text_logprobs_usage_and_timings(system, oracle, tokenizer):
    with Client(system.endpoint) as client:
        result = client.complete(prompt=PROMPT, max_tokens=8, logprobs=3)
    prompt_ids = tokenizer.encode(PROMPT)
    ids, text = expected_reply(oracle, tokenizer, prompt_ids, 8)
    assert (result.token_ids, result.text, result.prompt_token_ids) == (ids, text, prompt_ids)
    assert len(result.logprobs) == len(ids) and all(lp <= 0 for lp in result.logprobs)
    assert [len(top) for top in result.top_logprobs] == [3] * len(ids)
    assert [top[0][0] for top in result.top_logprobs] == ids  # greedy: the chosen token is the likeliest
    assert result.usage == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids)}
    assert result.finish_reason == ("stop" if ids[-1] in tokenizer.eos_token_ids else "length")
    assert 0 < result.timings["ttft_s"] <= result.timings["total_s"] and result.timings["decode_tok_s"] > 0


def test_a_stop_string_cuts_the_text_and_ends_the_request(system, oracle, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    _, text = expected_reply(oracle, tokenizer, prompt_ids, 24)
    stop = text[5:8]
    with Client(system.endpoint) as client:
        result = client.complete(prompt=PROMPT, max_tokens=24, stop=[stop])
    assert result.finish_reason == "stop" and stop not in result.text
    assert result.text == text[: text.index(stop)]
    assert len(result.token_ids) < 24


def test_a_refused_request_raises_with_its_code(system):
    with Client(system.endpoint) as client, pytest.raises(ServerError) as info:
        client.complete(request_id="zero", prompt="hi", max_tokens=0)
    assert (info.value.code, info.value.request_id) == ("invalid_request", "zero")
    assert "max_tokens" in str(info.value)


def test_streams_of_one_client_interleave(system, oracle, tokenizer):
    with Client(system.endpoint) as client:
        a = client.generate(token_ids=[1, 2, 3], max_tokens=6)
        b = client.generate(token_ids=[4, 5], max_tokens=6)
        b_events = list(b)  # a's events arrive meanwhile and wait in its inbox
        a_events = list(a)
    assert [e.token_id for e in a_events[:-1]] == oracle.greedy([1, 2, 3], 6)
    assert [e.token_id for e in b_events[:-1]] == oracle.greedy([4, 5], 6)


def test_async_client_runs_requests_concurrently_and_cancels(system, oracle):
    async def main():
        async with AsyncClient(system.endpoint) as client:
            results = await asyncio.gather(client.complete(token_ids=[7, 8], max_tokens=5),
                                           client.complete(token_ids=[9], max_tokens=7), client.health())
            stream = await client.generate(token_ids=[7, 8], max_tokens=400)
            first = await anext(stream)
            await client.cancel(stream.request_id)
            rest = [e async for e in stream]
            return results, first, rest

    (a, b, health), first, rest = run(main())
    assert a.token_ids == oracle.greedy([7, 8], 5) and b.token_ids == oracle.greedy([9], 7)
    assert health.status == "ready"
    assert first.token_id == a.token_ids[0] and rest[-1].finish_reason == "cancelled"


def test_an_id_reused_after_its_stream_was_closed_never_gets_the_closed_requests_events(system, oracle):
    """close() cancels, but the server holds the request until the cancel arrives: its "cancelled" final was taken
    for the end of the next request under the same id, and that request's own events for the one after it."""
    expected = oracle.greedy([7, 8], 5)

    def reuse(generate_and_close, complete) -> None:
        for _ in range(5):
            generate_and_close()
            while True:
                try:
                    result = complete()
                    break
                except ValueError:  # its cancel is not answered yet: the id is still in flight
                    time.sleep(0.01)
            assert (result.finish_reason, result.token_ids) == ("length", expected)

    with Client(system.endpoint, timeout_s=30) as client:
        def generate_and_close() -> None:
            stream = client.generate(request_id="same", token_ids=[7, 8], max_tokens=100)
            next(stream)
            stream.close()

        reuse(generate_and_close, lambda: client.complete(request_id="same", token_ids=[7, 8], max_tokens=5))

    async def main() -> None:
        async with AsyncClient(system.endpoint, timeout_s=30) as client:
            for _ in range(5):
                stream = await client.generate(request_id="same", token_ids=[7, 8], max_tokens=100)
                await anext(stream)
                await stream.close()
                while True:
                    try:
                        result = await client.complete(request_id="same", token_ids=[7, 8], max_tokens=5)
                        break
                    except ValueError:
                        await asyncio.sleep(0.01)
                assert (result.finish_reason, result.token_ids) == ("length", expected)

    run(main())


def test_generate_command_streams_text_and_prints_json(system, oracle, tokenizer, capsys):
    ids, text = expected_reply(oracle, tokenizer, tokenizer.encode(PROMPT), 6)
    assert tierserve(["generate", PROMPT, "--endpoint", system.endpoint, "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert tierserve(["generate", PROMPT, "--endpoint", system.endpoint, "--max-tokens", "6", "--logprobs", "2",
                      "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"token_ids", "text", "prompt_token_ids", "logprobs", "finish_reason", "usage", "timings"}
    assert (out["token_ids"], out["text"]) == (ids, text)
    assert len(out["top_logprobs"][0]) == 2


def test_a_stop_string_before_the_prompt_is_one_stop_string(system, oracle, tokenizer, capsys):
    """--stop took every word after it, so `generate --stop . PROMPT` read the prompt as a second stop string and
    refused the command for want of one; --stop now takes one string and may be given again."""
    _, text = expected_reply(oracle, tokenizer, tokenizer.encode(PROMPT), 24)
    stops = [text[5:8], text[12:14]]
    assert tierserve(["generate", "--stop", stops[1], "--stop", stops[0], PROMPT, "--endpoint", system.endpoint,
                      "--max-tokens", "24"]) == 0
    assert capsys.readouterr().out == text[: min(text.index(stop) for stop in stops)] + "\n"


def test_logprobs_where_nothing_prints_them_are_refused(system, capsys):
    """--logprobs was taken by the streaming generate and by chat, which print text alone: it was ignored."""
    for command in (["generate", PROMPT], ["chat"]):
        with pytest.raises(SystemExit) as exit_:
            tierserve([*command, "--endpoint", system.endpoint, "--max-tokens", "2", "--logprobs", "2"])
        assert exit_.value.code == 2
        assert "--logprobs" in capsys.readouterr().err


def test_generate_command_reports_a_refusal(system, capsys):
    assert tierserve(["generate", "hi", "--endpoint", system.endpoint, "--top-p", "0"]) == 1
    err = capsys.readouterr().err
    assert "invalid_request" in err and "top_p" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_value_no_request_can_carry_is_a_message_not_a_traceback(system, command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    args = [command, *(["hi"] if command == "generate" else []), "--endpoint", system.endpoint]
    assert tierserve([*args, "--seed", str(10**23)]) == 1
    assert capsys.readouterr().err == (f"tierserve {command}: generate.seed holds an integer outside "
                                       "-2**63..2**64-1, which msgpack cannot carry\n")


def test_ctrl_c_while_generate_waits_for_a_whole_completion_exits_130_without_a_traceback(system):
    """--json waits for the whole completion before printing: Ctrl-C there ended the command with a traceback,
    killed by SIGINT rather than exiting 130 as the streaming command does."""
    with Client(system.endpoint) as client:
        cancelled = client.stats().stats["requests"]["cancelled"]
        command = subprocess.Popen([sys.executable, "-m", "shared.cli", "generate", PROMPT, "--endpoint",
                                    system.endpoint, "--max-tokens", "400", "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while client.stats().stats["running"] == 0:  # its request is in the engine
            assert command.poll() is None, command.communicate()
            time.sleep(0.01)
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=60)
        assert (command.returncode, out) == (130, ""), err
        assert "Traceback" not in err, err
        deadline = time.monotonic() + 10
        while client.stats().stats["requests"]["cancelled"] == cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats().stats["requests"]["cancelled"] == cancelled + 1


@pytest.mark.parametrize("command, stdin, request_", [
    (["generate", PROMPT], b"", {"prompt": PROMPT}),
    (["chat"], b"hello\n", {"messages": [{"role": "user", "content": "hello"}]}),
])
def test_ctrl_c_partway_through_a_streamed_reply_ends_its_line_and_exits_130(system, command, stdin, request_):
    """Ctrl-C left the reply's line open, so the shell's prompt landed on it."""
    with Client(system.endpoint) as client:
        reply = client.complete(max_tokens=400, **request_).text
    process = subprocess.Popen([sys.executable, "-m", "shared.cli", *command, "--endpoint", system.endpoint,
                                "--max-tokens", "400"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    process.stdin.write(stdin)
    # The reply's first byte: it has started. Unbuffered, so that communicate() gets every byte after it; bytes,
    # not text: the reply may hold a "\r" that text mode would read as "\n".
    first = process.stdout.read(1)
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    out = (first + rest).decode()
    assert process.returncode == 130, err
    assert "Traceback" not in err.decode(), err
    # the reply as far as it came, then one newline to end its line
    assert first and out.endswith("\n") and reply.startswith(out[:-1]), (out, reply)


def test_chat_command_keeps_the_conversation(system, oracle, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nhow are you\n"))
    assert tierserve(["chat", "--endpoint", system.endpoint, "--system", "Be brief.", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    messages = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for line in ("hello", "how are you"):
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special=False)
        _, reply = expected_reply(oracle, tokenizer, prompt, 5)
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert out == expected


def test_chat_command_exits_1_when_a_turn_failed(system, monkeypatch, capsys):
    """A refused turn was reported and skipped, but the command still exited 0: a script piping its questions in
    could not tell that an answer was missing."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert tierserve(["chat", "--endpoint", system.endpoint, "--max-tokens", "100000"]) == 1
    assert "context_exceeded" in capsys.readouterr().err


def test_chat_leaves_out_its_oldest_exchanges_once_the_conversation_outgrows_the_context(system, monkeypatch, capsys):
    """Every turn was sent with the whole history: once it outgrew the context, every later turn was refused for
    the same history and the session was dead."""
    turns = "".join(f"tell me a story about the river and the mountain number {i}\n" for i in range(8))
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    assert tierserve(["chat", "--endpoint", system.endpoint, "--system", "Be brief.", "--max-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert "the conversation outgrew the model's context: its oldest exchange is left out" in err, err


def test_health_and_stats_commands_print_json(system, capsys):
    assert tierserve(["health", "--endpoint", system.endpoint]) == 0
    health = json.loads(capsys.readouterr().out)
    assert health["status"] == "ready"
    assert {m["member_id"] for m in health["members"]} == {"coordinator", "gpu-worker", "expert-host-0"}
    assert tierserve(["stats", "--endpoint", system.endpoint]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["requests"]["completed"] >= 1 and stats["generated_tokens"] >= 1


def _health_through_a_config(client_endpoint: str, tmp_path) -> subprocess.CompletedProcess:
    """`tierserve health --config F` as installed, F holding only client_endpoint."""
    config = tmp_path / "client.toml"
    config.write_text(f'client_endpoint = "{client_endpoint}"\n')
    return subprocess.run([sys.executable, "-m", "shared.cli", "health", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_the_installed_command_reads_the_endpoint_from_the_config(system, tmp_path):
    done = _health_through_a_config(system.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ready"


def test_a_server_bound_on_every_interface_is_reached_by_up_and_the_commands(model, tmp_path):
    """client_endpoint = "tcp://*:PORT" binds the coordinator on every interface, but no socket can connect to
    "*": tierserve up died with a ZMQError while it waited for the system, and `--config` gave the commands the
    same endpoint."""
    with RunningSystem(str(model), "--expert-hosts", "0", "--hot-experts", "8",
                       "--client-endpoint", "tcp://*:0") as running:
        port = running.endpoint.rsplit(":", 1)[1]
        done = _health_through_a_config(f"tcp://*:{port}", tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ready"


def test_commands_without_a_server_time_out_clearly(capsys):
    assert tierserve(["stats", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.3"]) == 1
    assert "no answer from tcp://127.0.0.1:9 within 0.3 s" in capsys.readouterr().err


def test_a_config_file_it_cannot_read_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('client_endpont = "tcp://127.0.0.1:9"\n')
    for path, message in ((bad, f"tierserve: {bad}: unknown config key(s): client_endpont"),
                          (tmp_path / "missing.toml", "No such file or directory")):
        done = subprocess.run([sys.executable, "-m", "shared.cli", "health", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_endpoint_that_is_no_zeromq_address_is_a_message_not_a_traceback():
    """An endpoint without its transport (host:port), or a negative timeout, reached zmq as it was and ended the
    command with a ZMQError traceback; an infinite or huge one, an OverflowError."""
    for options, message in ((["--endpoint", "localhost:5555"], "'localhost:5555'"),
                             (["--endpoint", "tcp://127.0.0.1:9", "--timeout", "-1"], "--timeout"),
                             (["--endpoint", "tcp://127.0.0.1:9", "--timeout", "inf"], "at most 2,147,484 s"),
                             (["--endpoint", "tcp://127.0.0.1:9", "--timeout", "3e6"], "at most 2,147,484 s")):
        done = subprocess.run([sys.executable, "-m", "shared.cli", "health", *options],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode in (1, 2) and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_tierserve_without_a_command_prints_its_usage_as_an_error(capsys):
    """The usage went to stdout with exit status 2: a script reading the output took the error for output."""
    assert tierserve([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: tierserve <command>")
    assert tierserve(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: tierserve <command>")


def test_the_demo_of_a_model_that_is_not_there_says_so_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "shared.cli", "demo", "--model", str(tmp_path / "missing.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"cannot start: {tmp_path}/missing.gguf: no such model file" in run.stderr
    assert "tierserve demo: tierserve up exited with 1 before it was ready" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(("args", "code", "message"), [
    (["generate", "--endpoint", "tcp://127.0.0.1:99999", "hi"], 1,
     "tierserve: --endpoint must be tcp://HOST:PORT (HOST not an IPv6 address, PORT 0-65535 or *)"),
    (["generate", "--endpoint", "tcp://127.0.0.1:9", "--config", "c.toml", "hi"], 2,
     "argument --config: not allowed with argument --endpoint"),
    (["generate", "--endpoint", "tcp://127.0.0.1:9", "--logprobs", "-1", "hi"], 2,
     "argument --logprobs: must be 0 or more, not -1"),
    # a byte that is not UTF-8 reaches argv as a lone surrogate
    (["generate", "--endpoint", "tcp://127.0.0.1:9", "ab\udce2"], 2,
     "argument text: not valid UTF-8: byte 0xe2 at character 2"),
    (["generate", "--endpoint", "tcp://127.0.0.1:9", "--stop", "\udcff", "hi"], 2,
     "argument --stop: not valid UTF-8: byte 0xff at character 0"),
    (["chat", "--endpoint", "tcp://127.0.0.1:9", "--system", "\udcff"], 2,
     "argument --system: not valid UTF-8: byte 0xff at character 0"),
])
def test_client_commands_name_a_bad_option(capsys, args, code, message):
    """Port 99999 connected to 34463 (ZeroMQ takes ports modulo 65536) and answered from there; --config beside
    --endpoint was ignored without a word; --logprobs -1 was told it needs --json; text that is not UTF-8 was
    refused in the codec's words ("surrogates not allowed")."""
    with pytest.raises(SystemExit) as exit_:
        tierserve(args)
    status = exit_.value.code
    said = capsys.readouterr().err if status == 2 else str(status)  # argparse prints it; SystemExit(text) holds it
    assert (status == 2) == (code == 2) and message in said


def test_output_to_a_closed_pipe_and_chat_without_stdin_end_without_a_traceback(model):
    """`tierserve ... | head -c 3` ended in a BrokenPipeError traceback, twice over; `chat <&-` in an
    AttributeError."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    run = subprocess.run([sys.executable, "-m", "shared.cli", "convert-experts", str(model)], stdout=write,
                         stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert run.returncode == 141 and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "shared.cli", "chat", "--endpoint", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert run.returncode == 2 and "stdin is closed: chat reads its turns from it" in run.stderr, run.stderr


def test_output_to_a_full_disk_and_a_chat_turn_not_utf8_are_named(model):
    """`> /dev/full` ended in an OSError traceback; a turn that is not UTF-8 was refused in the codec's words."""
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "shared.cli", "convert-experts", str(model)], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "tierserve convert-experts: No space left on device" in run.stderr
    for errors in ("strict", "surrogateescape"):  # stdin's, by locale: strict ended in a UnicodeDecodeError
        run = subprocess.run([sys.executable, "-m", "shared.cli", "chat", "--endpoint", "tcp://127.0.0.1:9"],
                             input=b"\xff hi\n", capture_output=True, timeout=120,
                             env={**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"})
        assert run.returncode == 1, run.stderr
        assert b"the turn is not valid UTF-8: byte 0xff at character 0" in run.stderr, run.stderr


def test_the_demo_reports_a_refused_request_without_a_traceback_and_stops_the_system(model):
    """The server's refusal (here more tokens than the context holds) ended the demo in a ServerError traceback."""
    run = subprocess.run([sys.executable, "-m", "shared.cli", "demo", "--model", str(model), "--max-tokens", "1000000"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "tierserve demo: context_exceeded:" in run.stderr and "stopping..." in run.stderr
    with pytest.raises(SystemExit) as exit_:
        tierserve(["demo", "--max-tokens", "0"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("value", ["nan", "-5", "0"])
def test_a_ready_timeout_no_wait_can_have_is_refused_before_anything_starts(value):
    """nan and -5 started every role, then said the system was not ready after nan s."""
    with pytest.raises(SystemExit) as exit_:
        tierserve(["up", "--model", "m.gguf", "--ready-timeout", value])
    assert exit_.value.code == 2


def test_the_demo_is_the_command_its_usage_names(capsys):
    """The demo's usage reads `tierserve demo`, but tierserve had no such command."""
    with pytest.raises(SystemExit) as exit_:
        tierserve(["demo", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tierserve demo")
