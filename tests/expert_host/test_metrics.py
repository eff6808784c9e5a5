"""A real expert host's metrics read over its /metrics endpoint while it serves work."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import zmq

from shared.config import Config
from shared.protocol import ExpertFailure, ExpertWork, decode, encode

ROOT = Path(__file__).resolve().parents[2]


def sample(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_queue_depth_is_back_to_zero_once_the_work_received_is_answered(expert_models, tmp_path):
    config = Config(model=str(expert_models["f32"]), run_dir=str(tmp_path / "run"), metrics_port=0)
    log = tmp_path / "host.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "expert_host", "--model", config.model, "--run-dir",
                                    config.run_dir, "--metrics-port", "0", "--host-id", "0"], cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(config.expert_host_endpoint(0))
    try:
        for step in range(3):
            sock.send_multipart(encode(ExpertWork(step=step, layer=0, expert_ids=[0], counts=[1],
                                                  hidden=torch.zeros(1, 64))))
            assert isinstance(decode(sock.recv_multipart()), ExpertFailure)  # no placement: nothing is held
        port = int(re.search(r"metrics on :(\d+)", log.read_text()).group(1))
        time.sleep(0.2)  # idle now: nothing received is waiting
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert sample(text, 'tierserve_expert_host_work_total{outcome="error"}') == 3
        assert sample(text, "tierserve_expert_host_queue_depth") == 0
    finally:
        process.terminate()
        process.wait(timeout=30)
        sock.close(linger=0)
        ctx.term()
