"""The worker's side of the data plane: one DEALER per expert host, one exchange per host per layer."""

from __future__ import annotations

import time

import torch
import zmq

from shared.protocol import ExpertFailure, ExpertResult, ExpertWork, ProtocolError, decode, encode


class ExpertHostError(RuntimeError):
    def __init__(self, host: int, code: str, message: str) -> None:
        super().__init__(f"expert host {host}: {message}")
        self.host, self.code = host, code


class RemoteExperts:
    def __init__(self, ctx: zmq.Context, endpoints: list[str], timeout_s: float) -> None:
        self.ctx, self.endpoints, self.timeout_s = ctx, endpoints, timeout_s
        self.sockets = [self._connect(e) for e in endpoints]
        self.step = 0

    def _connect(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def begin_step(self) -> None:
        self.step += 1

    def send(self, host: int, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> None:
        msg = ExpertWork(step=self.step, layer=layer, expert_ids=experts, counts=counts, hidden=hidden)
        self.sockets[host].send_multipart(encode(msg), copy=False)

    def receive(self, host: int, layer: int) -> tuple[torch.Tensor, float]:
        """The host's output for this step's layer and the compute seconds it reports."""
        sock = self.sockets[host]
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                self.reset(host)
                raise ExpertHostError(host, "timeout", f"no answer within {self.timeout_s:.1f} s")
            try:
                msg = decode(sock.recv_multipart(copy=False))
            except ProtocolError as e:
                raise ExpertHostError(host, e.code, e.message) from e
            if (getattr(msg, "step", None), getattr(msg, "layer", None)) != (self.step, layer):
                continue  # an answer to work a timed-out step sent
            if isinstance(msg, ExpertFailure):
                raise ExpertHostError(host, msg.code, msg.message)
            if isinstance(msg, ExpertResult):
                return msg.output, msg.compute_s

    def reset(self, host: int) -> None:
        """Drop whatever is queued to or from a host that stopped answering; reconnect fresh."""
        self.sockets[host].close(linger=0)
        self.sockets[host] = self._connect(self.endpoints[host])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
