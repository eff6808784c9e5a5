"""A real expert host answers malformed work with an error naming the problem and goes on serving: no message a
worker (or anything else on its socket) sends may take it, and the experts it holds, down. Stopped by SIGTERM, it
answers what it was asked before the signal."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from shared.config import Config
from shared.protocol import ExpertFailure, ExpertWork, decode, encode

ROOT = Path(__file__).resolve().parents[2]


def work(shape: list, dtype: str = "f4", payload: bytes = bytes(256)) -> list[bytes]:
    header = {"v": 1, "kind": "expert_work", "step": 3, "layer": 0, "expert_ids": [0], "counts": [1],
              "hidden": {"__tensor__": 0, "dtype": dtype, "shape": shape}}
    return [msgpack.packb(header), payload]


@pytest.fixture
def host(expert_models, tmp_path):
    config = Config(model=str(expert_models["f32"]), run_dir=str(tmp_path), metrics_port=0)
    process = subprocess.Popen([sys.executable, "-m", "expert_host", "--model", config.model, "--run-dir",
                                config.run_dir, "--metrics-port", "0", "--host-id", "0"], cwd=ROOT)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(config.expert_host_endpoint(0))

    def ask(frames: list[bytes]):
        sock.send_multipart(frames)
        return decode(sock.recv_multipart())

    yield ask, process, sock
    process.terminate()
    process.wait(timeout=30)
    sock.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("frames, code, text", [
    (work([-1, -64]), "bad_field", r"shape \[-1, -64\] is not a list of sizes"),
    (work([1.5, 64]), "bad_field", "is not a list of sizes"),
    (work(["a", 64]), "bad_field", "is not a list of sizes"),
    (work([True, 64]), "bad_field", "is not a list of sizes"),
    (work([2**32, 2**32], payload=b""), "bad_field", "shape needs 73786976294838206464"),
    (work([2**40, 2**40, 0], payload=b""), "bad_field", "is too large"),
    (work([64], "i4"), "bad_work", "expected floats of shape"),
    (work([], "f4", bytes(4)), "bad_work", "expected floats of shape"),
    (work([1, 64]), "bad_work", r"experts \[0\] are not held by this host"),
    (work([1, 64], [1]), "bad_field", "malformed tensor header"),  # ended the host: TypeError, unhashable
    # another kind, answered by name as every other role answers it (was "unexpected", at step and layer -1)
    ([msgpack.packb({"v": 1, "kind": "health", "step": 3, "layer": 0})], "unexpected_kind",
     "'health' is not expected here: send one of expert_work"),
])
def test_malformed_work_is_answered_with_an_error_and_the_host_serves_on(host, frames, code, text):
    ask, process, _ = host
    failure = ask(frames)
    assert isinstance(failure, ExpertFailure) and failure.code == code
    # the work's own step and layer, read from its header, which the worker waits for; under -1 it waited it out
    assert (failure.step, failure.layer) == (3, 0)
    assert re.search(text, failure.message), failure.message
    # still serving: a well-formed item for experts it does not hold (no placement yet) is refused by name
    again = ask(encode(ExpertWork(step=4, layer=0, expert_ids=[0], counts=[1], hidden=torch.zeros(1, 64))))
    assert isinstance(again, ExpertFailure) and again.step == 4 and "not held" in again.message
    assert process.poll() is None


def test_sigterm_answers_the_work_already_sent(host):
    ask, process, sock = host
    ask(work([1, 64]))  # joined: its socket is connected and serving
    items = 300
    rows = torch.zeros(256, 64)  # 20 MB in all: some of it still on its way through ZeroMQ at the signal
    for step in range(items):
        sock.send_multipart(encode(ExpertWork(step=step, layer=0, expert_ids=[0], counts=[256], hidden=rows)))
    process.send_signal(signal.SIGTERM)
    answered = {decode(sock.recv_multipart()).step for _ in range(items)}
    assert answered == set(range(items))
    assert process.wait(timeout=30) == 0
