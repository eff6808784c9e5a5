"""The worker's side of the data plane: one exchange per expert host per layer.

To a host on this machine the rows go through the shared-memory mailbox the host made (shared/mailbox.py):
the worker gathers them straight into it and spins on the answer. A worker on a GPU page-locks the mailbox
first, so its rows are copied by DMA from the device into the mailbox and the answer from the mailbox onto the
device: one synchronization per exchange (the rows must be in the mailbox before they are posted), and the
answer's copy is queued behind the GPU's work without waiting for it. To a host elsewhere, to one without a
mailbox, or when a batch does not fit the mailbox, they go as a ZeroMQ message on the worker's DEALER for that
host. A host's mailbox is found by the name its endpoint gives (mailbox_path) and looked up again at most every
RECHECK_S, so the worker follows a host that restarts (a new mailbox file) long before it can serve again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import zmq

from gpu_worker.step_profile import section
from shared.mailbox import Mailbox, MailboxError
from shared.protocol import ExpertFailure, ExpertResult, ExpertWork, ProtocolError, decode, encode
from shared.run_files import identity_at, mailbox_path

RECHECK_S = 0.05
KEEP_ALIVE_S = 0.25  # a wait on a host is cut into slices this long, with the worker's keep-alive between them
log = logging.getLogger(__name__)


class ExpertHostError(RuntimeError):
    def __init__(self, host: int, code: str, message: str) -> None:
        super().__init__(f"expert host {host}: {message}")
        self.host, self.code = host, code


class RemoteExperts:
    def __init__(self, ctx: zmq.Context, endpoints: list[str], timeout_s: float) -> None:
        self.ctx, self.endpoints, self.timeout_s = ctx, endpoints, timeout_s
        self.sockets = [self._connect(e) for e in endpoints]
        self.mailboxes: list[Mailbox | None] = [None] * len(endpoints)
        self.retired: list[Mailbox] = []  # replaced mailboxes, closed by close_retired
        self._seen: list[tuple[int, int] | None] = [None] * len(endpoints)  # file identity last looked at
        self._recheck_at = [0.0] * len(endpoints)
        # (mailbox, request sequence number, device of the rows sent); None: sent over ZeroMQ
        self._in_flight: list[tuple[Mailbox, int, torch.device] | None] = [None] * len(endpoints)
        self._sent_shape: list[tuple[int, int]] = [(0, 0)] * len(endpoints)  # (rows, width) of the work in flight
        self.step = 0
        # run while waiting on a host: the worker's heartbeat must not stop because a host is slow to answer
        self.keep_alive: Callable[[], None] = lambda: None

    def _connect(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _mailbox(self, host: int) -> Mailbox | None:
        now = time.monotonic()
        if now < self._recheck_at[host]:
            return self.mailboxes[host]
        self._recheck_at[host] = now + RECHECK_S
        path = mailbox_path(self.endpoints[host])
        identity = identity_at(path)
        if identity == self._seen[host]:
            return self.mailboxes[host]
        self._seen[host] = identity
        if self.mailboxes[host] is not None:  # closed once the step is done: the device may still use its memory
            self.retired.append(self.mailboxes[host])  # type: ignore[arg-type]
            self.mailboxes[host] = None
        if identity is not None:
            try:
                self.mailboxes[host] = mailbox = Mailbox.attach(path)
                self._seen[host] = mailbox.identity
                log.info("expert host %d: activations through shared memory %s", host, path)
            except FileNotFoundError:
                pass  # replaced while we looked; the next check finds the new one
            except MailboxError as e:
                log.warning("expert host %d: %s; activations go over ZeroMQ", host, e)
        return self.mailboxes[host]

    def lane_mailbox(self, host: int, device: torch.device) -> Mailbox | None:
        """The host's mailbox for its lane (gpu_worker/crossing.py), page-locked and mapped for a GPU `device`
        first; None where there is none, or it cannot be mapped."""
        mailbox = self._mailbox(host)
        if mailbox is None or device.type == "cpu":
            return mailbox
        if mailbox.dma is None:
            self._register(host, mailbox)
        return mailbox if mailbox.dma else None

    def begin_step(self) -> None:
        self.step += 1

    def send(self, host: int, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor,
             tokens: torch.Tensor | None = None) -> None:
        """Send rows hidden[tokens] (all of hidden without tokens), grouped by expert: counts[i] for experts[i]."""
        with section("cold_send"):
            rows = hidden.shape[0] if tokens is None else tokens.shape[0]
            self._sent_shape[host] = (rows, hidden.shape[1])
            mailbox = self._mailbox(host)
            if mailbox is not None and mailbox.fits(rows, hidden.shape[1], hidden.dtype, len(experts)):
                area = mailbox.request_rows(rows, hidden.shape[1], hidden.dtype)
                if hidden.device.type == "cpu":
                    if tokens is None:
                        area.copy_(hidden)
                    else:
                        torch.index_select(hidden, 0, tokens, out=area)
                else:  # gathered on the device, then one copy into the mailbox
                    if mailbox.dma is None:
                        self._register(host, mailbox)
                    area.copy_(hidden if tokens is None else hidden.index_select(0, tokens), non_blocking=True)
                    torch.cuda.current_stream(hidden.device).synchronize()  # in the mailbox before it is posted
                seq = mailbox.post(self.step, layer, experts, counts, area)
                self._in_flight[host] = (mailbox, seq, hidden.device)
                return
            self._in_flight[host] = None
            rows_sent = hidden if tokens is None else hidden[tokens]
            msg = ExpertWork(step=self.step, layer=layer, expert_ids=experts, counts=counts, hidden=rows_sent)
            self.sockets[host].send_multipart(encode(msg), copy=False)

    def _register(self, host: int, mailbox: Mailbox) -> None:
        err = mailbox.register_for_dma()
        if err:
            log.warning("expert host %d: cannot page-lock the mailbox (CUDA driver error %d); activations are "
                        "staged through pageable memory", host, err)

    def answered(self, host: int) -> bool:
        """Whether the host's answer to the work in flight is already there (without waiting for it)."""
        in_flight = self._in_flight[host]
        if in_flight is None:
            return bool(self.sockets[host].poll(0))
        mailbox, seq, _ = in_flight
        return mailbox.wait_answer(seq, 0.0)

    def receive(self, host: int, layer: int) -> tuple[torch.Tensor, float]:
        """The host's output for this step's layer, on the device the rows came from, and the compute seconds it
        reports. Output of a CPU worker that came through the mailbox is a view of it: use it before the next
        send to this host (a GPU worker's copy out of it is queued before that send's synchronization)."""
        with section("cold_wait"):
            in_flight = self._in_flight[host]
            if in_flight is None:
                return self._receive_message(host, layer)
            mailbox, seq, device = in_flight
            self.wait_for(host, time.monotonic() + self.timeout_s, lambda s: mailbox.wait_answer(seq, s))
            try:
                answer = mailbox.answer()
            except MailboxError as e:
                raise ExpertHostError(host, "bad_output", str(e)) from e
            if answer.failure is not None:
                raise ExpertHostError(host, *answer.failure)
            output, compute_s = self._checked(host, answer.output, answer.compute_s)  # type: ignore[arg-type]
            return (output if device.type == "cpu" else output.to(device, non_blocking=True)), compute_s

    def _receive_message(self, host: int, layer: int) -> tuple[torch.Tensor, float]:
        sock = self.sockets[host]
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.wait_for(host, deadline, lambda s: bool(sock.poll(int(s * 1000) + 1)))
            try:
                msg = decode(sock.recv_multipart(copy=False))
            except ProtocolError as e:
                raise ExpertHostError(host, e.code, e.message) from e
            if (getattr(msg, "step", None), getattr(msg, "layer", None)) != (self.step, layer):
                continue  # an answer to work a timed-out step sent
            if isinstance(msg, ExpertFailure):
                raise ExpertHostError(host, msg.code, msg.message)
            if isinstance(msg, ExpertResult):
                return self._checked(host, msg.output, msg.compute_s)

    def _checked(self, host: int, output: torch.Tensor, compute_s: float) -> tuple[torch.Tensor, float]:
        """The answer, if it is one to the work sent: a row of floats for each row, and a time the cost model can
        learn from. (A wrong one failed the step as a bug of the worker's, an internal_error naming no host; a
        NaN time would have reached every later estimate of the host's speed.)"""
        rows, width = self._sent_shape[host]
        if tuple(output.shape) != (rows, width) or not output.is_floating_point():
            raise ExpertHostError(host, "bad_output", f"answered {tuple(output.shape)} {output.dtype} to "
                                                      f"{rows} rows of width {width}")
        if not 0.0 <= compute_s < math.inf:  # NaN too
            raise ExpertHostError(host, "bad_output", f"reported a compute time of {compute_s!r} s")
        return output, compute_s

    def wait_for(self, host: int, deadline: float, ready: Callable[[float], bool]) -> None:
        """Until `ready(seconds)` (waiting at most that long) says the answer is there, in slices of KEEP_ALIVE_S
        with the keep-alive between; past the deadline the host is reset and the wait fails."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.reset(host)
                raise ExpertHostError(host, "timeout", f"no answer within {self.timeout_s:.1f} s")
            if ready(min(remaining, KEEP_ALIVE_S)):
                return
            if self._replaced(host):  # killed and restarted: its successor will never answer this work
                self.reset(host)
                raise ExpertHostError(host, "restarted", "the host restarted with this step's work unanswered")
            self.keep_alive()

    def _replaced(self, host: int) -> bool:
        """Whether a new mailbox took the place of this host's: a host makes its mailbox once, as it starts. (Waits
        on a restarted host lasted the whole expert timeout, 10 s by default, while its successor served.)"""
        mailbox = self.mailboxes[host]
        if mailbox is None:
            return False
        now = identity_at(mailbox_path(self.endpoints[host]))
        return now is not None and now != mailbox.identity  # None: removed by its successor, not made yet

    def reset(self, host: int) -> None:
        """Drop whatever is queued to or from a host that stopped answering; reconnect fresh and look for its
        mailbox again at the next send (a mailbox holds nothing queued: a late answer is told apart by its
        sequence number)."""
        self.sockets[host].close(linger=0)
        self.sockets[host] = self._connect(self.endpoints[host])
        self._recheck_at[host] = 0.0

    def close_retired(self) -> None:
        """Close the mailboxes of hosts that were replaced, between steps (the device done with their memory). Each
        is let go before it is closed: one whose close fails is not tried again at every later step."""
        while self.retired:
            self.retired.pop().close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        for mailbox in self.mailboxes:
            if mailbox is not None:
                mailbox.close()
        self.close_retired()
