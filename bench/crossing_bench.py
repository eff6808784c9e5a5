"""Crossing latency between the gpu_worker and an expert host, and what it does to decode.

1. Round trip of one activation between two processes, measured in one run over each data path as tierserve
   uses it: ZeroMQ ipc and tcp (DEALER -> ROUTER, ExpertWork out, ExpertResult back, shared.protocol framing)
   and the shared-memory mailbox (rows copied into the request area, posted, answered into the response area).
   The other end answers with the rows it got, so only the crossing is timed.
2. Decode tokens/s of the tiny model through the whole system (`tierserve up`: coordinator, gpu_worker, two
   expert hosts holding every expert), one client, greedy, with data_plane zmq and shm, shm with decode steps
   crossing through the mailboxes' lanes from the device (decode_crossings), and with every expert on the worker
   (no crossing) for reference.

    python -m bench.crossing_bench [--iters 5000] [--runs 3] [--out bench/crossing_bench.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

from shared.client import Client
from shared.launcher import RunningSystem, free_tcp_port
from shared.mailbox import Backoff, Mailbox
from shared.make_model import make_model
from shared.protocol import ExpertResult, ExpertWork, decode, encode

HIDDEN = 2048  # Qwen3-30B-A3B's hidden size: one fp32 row is 8 KiB
SIZES = {"8 KiB": 1, "256 KiB": 32}  # rows of HIDDEN fp32
# Forked before the parent makes a ZeroMQ context, from a parent held to one torch thread: an OpenMP pool does
# not survive fork, and a copy split over two threads waits for a core the spinning peer holds.
FORK = multiprocessing.get_context("fork")
DECODE_TOKENS = 64
REQUESTS = 3


def serve_zmq(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    for _ in range(n):
        frames = sock.recv_multipart(copy=False)
        work = decode(frames[1:])
        reply = ExpertResult(step=work.step, layer=work.layer, output=work.hidden, compute_s=0.0)
        sock.send_multipart([frames[0], *encode(reply)], copy=False)
    sock.close(linger=100)
    ctx.term()


def serve_mailbox(path: str, n: int) -> None:
    mailbox = Mailbox.create(path, max(SIZES.values()) * HIDDEN * 4, 8)
    backoff = Backoff(max_sleep_s=1e-3)
    try:
        for _ in range(n):
            if not backoff.wait(mailbox.pending, time.monotonic() + 60):
                return
            backoff.reset()
            mailbox.reply(mailbox.take().hidden, 0.0)
    finally:
        mailbox.close()
        os.unlink(path)


def zmq_round_trips(endpoint: str, rows: int, n: int) -> list[float]:
    server = FORK.Process(target=serve_zmq, args=(endpoint, n), daemon=True)
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    x = torch.randn(rows, HIDDEN)
    times = []
    for step in range(n):
        start = time.perf_counter()
        sock.send_multipart(encode(ExpertWork(step=step, layer=0, expert_ids=[0], counts=[rows], hidden=x)),
                            copy=False)
        result = decode(sock.recv_multipart(copy=False))
        times.append(time.perf_counter() - start)
        assert result.output.shape == x.shape
    sock.close(linger=0)
    ctx.term()
    server.join()
    return times


def mailbox_round_trips(rows: int, n: int) -> list[float]:
    path = f"/dev/shm/tierserve-bench-{os.getpid()}"
    server = FORK.Process(target=serve_mailbox, args=(path, n), daemon=True)
    server.start()
    while not os.path.exists(path):
        time.sleep(0.001)
    mailbox = Mailbox.attach(path)
    x = torch.randn(rows, HIDDEN)
    times = []
    for step in range(n):
        start = time.perf_counter()
        area = mailbox.request_rows(rows, HIDDEN, x.dtype)
        area.copy_(x)
        seq = mailbox.post(step, 0, [0], [rows], area)
        assert mailbox.wait_answer(seq, 10)
        output = mailbox.answer().output
        times.append(time.perf_counter() - start)
        assert output.shape == x.shape
    mailbox.close()
    server.join()
    return times


def percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_table(iters: int) -> list[str]:
    paths: dict[str, Callable[[int], list[float]]] = {
        "ZeroMQ ipc": lambda rows: zmq_round_trips(f"ipc://{tempfile.gettempdir()}/tierserve-bench-{os.getpid()}.sock",
                                                   rows, iters),
        "ZeroMQ tcp": lambda rows: zmq_round_trips(f"tcp://127.0.0.1:{free_tcp_port()}", rows, iters),
        "shared-memory mailbox": lambda rows: mailbox_round_trips(rows, iters),
    }
    lines = ["| path | size | p50 µs | p99 µs | mean µs |", "|---|---|---|---|---|"]
    for name, measure in paths.items():
        for size, rows in SIZES.items():
            times = measure(rows)[iters // 10:]  # the first tenth warms up
            lines.append(f"| {name} | {size} | {percentile(times, 0.5) * 1e6:.1f} | "
                         f"{percentile(times, 0.99) * 1e6:.1f} | {statistics.mean(times) * 1e6:.1f} |")
            print(lines[-1], flush=True)
    return lines


def long_prompt(client: Client) -> list[int]:
    """A prompt whose greedy continuation runs DECODE_TOKENS tokens without reaching end-of-text."""
    for first in range(1, 200):
        prompt = list(range(first, first + 8))
        if client.complete(token_ids=prompt, max_tokens=DECODE_TOKENS).finish_reason == "length":
            return prompt
    raise RuntimeError(f"no prompt decodes {DECODE_TOKENS} tokens")


def decode_table(runs: int) -> list[str]:
    """Rounds alternate the configurations (each a fresh system, a warm-up request, then REQUESTS timed ones),
    so load from outside the benchmark lands on all of them alike."""
    configs = {
        "zmq": ("--expert-hosts", "2", "--hot-experts", "0", "--data-plane", "zmq", "--decode-crossings", "false"),
        "shm": ("--expert-hosts", "2", "--hot-experts", "0", "--data-plane", "shm", "--decode-crossings", "false"),
        "shm, decode crossing from the device (lanes)": ("--expert-hosts", "2", "--hot-experts", "0",
                                                         "--data-plane", "shm", "--decode-crossings", "true"),
        "no crossing (every expert on the worker)": ("--expert-hosts", "0", "--hot-experts", "8"),
    }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, list[int]] = {}
    prompts: dict[str, list[int]] = {}  # per configuration: a GPU worker's bf16 hot experts change the tokens
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny.gguf"
        make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=1)
        for _ in range(runs):
            for name, options in configs.items():
                with RunningSystem(str(model), "--log-level", "WARNING", *options) as system, \
                        Client(system.endpoint) as client:
                    prompt = prompts[name] = prompts.get(name) or long_prompt(client)
                    client.complete(token_ids=prompt, max_tokens=DECODE_TOKENS)  # warm-up
                    for _ in range(REQUESTS):
                        result = client.complete(token_ids=prompt, max_tokens=DECODE_TOKENS)
                        assert len(result.token_ids) == DECODE_TOKENS
                        assert tokens.setdefault(name, result.token_ids) == result.token_ids
                        rates[name].append(result.timings["decode_tok_s"])
                print(name, [f"{r:.0f}" for r in rates[name]], f"load {os.getloadavg()[0]:.1f}", flush=True)
    assert tokens["zmq"] == tokens["shm"] == tokens["shm, decode crossing from the device (lanes)"], \
        "the data plane changed the tokens"
    lines = ["| data plane | decode tok/s, median | min | max |", "|---|---|---|---|"]
    for name, got in rates.items():
        lines.append(f"| {name} | {statistics.median(got):.1f} | {min(got):.1f} | {max(got):.1f} |")
    return lines


def machine() -> str:
    cpus = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")]
    return f"{cpus[0] if cpus else platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, " \
           f"Python {platform.python_version()}, torch {torch.__version__}, pyzmq {zmq.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=5000, help="round trips per path and size")
    parser.add_argument("--runs", type=int, default=3, help="rounds of decode runs (fresh systems each)")
    parser.add_argument("--out", default="bench/crossing_bench.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    latency = latency_table(args.iters)
    decode_rates = decode_table(args.runs)
    report = [
        "# Crossing latency: ZeroMQ vs the shared-memory mailbox", "",
        f"    python -m bench.crossing_bench --iters {args.iters} --runs {args.runs}", "",
        f"Machine: {machine()}.", "",
        f"Round trip of one activation ({HIDDEN}-wide fp32 rows) between two processes, {args.iters} per row "
        "(the first tenth dropped as warm-up); the far end answers with the rows it got:", "",
        *latency, "",
        f"Decode of the tiny model (qwen3moe preset tiny, f32: 4 layers, 8 experts, top-2) through `tierserve up` "
        f"with 2 expert hosts holding every expert, so each token crosses to a host in every layer (and, for "
        f"reference, with every expert on the worker); one client, greedy, an 8-token prompt, {DECODE_TOKENS} new "
        f"tokens, decode tok/s as the final event reports it; {args.runs} rounds x {REQUESTS} requests, each round "
        f"a fresh system per configuration. The worker runs on "
        f"{torch.cuda.get_device_name() + ' in bf16' if torch.cuda.is_available() else 'the CPU in fp32'}.", "",
        *decode_rates, "",
        f"Load average (1 min) before the run {load_before:.1f}, after {os.getloadavg()[0]:.1f}: the machine is shared "
        "with other work, so absolute numbers move between runs; the rows of one run are comparable.", "",
    ]
    Path(args.out).write_text("\n".join(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
