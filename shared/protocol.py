"""Every message tierserve processes and clients exchange, defined once.

A message is a typed dataclass. On the wire it is a multipart ZeroMQ message:
frame 0 is a msgpack map {"v": version, "kind": ..., fields...}; each tensor field
is replaced in the map by {"__tensor__": i, "dtype": ..., "shape": [...]} and its
bytes travel as frame 1 + i, zero-copy, never pickled.

`decode` checks everything a peer could get wrong (bytes that are not msgpack,
unknown kinds, missing fields, wrong types, a different protocol version) and
raises ProtocolError with a code and a message naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Union

import msgpack

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


MESSAGES: dict[str, type[Message]] = {}
_TENSOR = "torch.Tensor"  # a tensor field's annotation, as a string under `from __future__ import annotations`


@dataclass
class Message:
    KIND: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, hint in cls.__annotations__.items():
            # tensor fields are told by this exact annotation (_TENSOR), torch being imported only when one travels
            if "torch" in str(hint) and hint != _TENSOR:
                raise TypeError(f"{cls.__name__}.{name}: a tensor field is annotated {_TENSOR}, not {hint}")
        if cls.KIND:
            MESSAGES[cls.KIND] = cls


# --- client API (client <-> coordinator, tcp ROUTER) ------------------------------------------------


@dataclass
class Generate(Message):
    """Exactly one of prompt / messages / token_ids."""

    KIND: ClassVar[str] = "generate"
    request_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0


@dataclass
class Cancel(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass
class Health(Message):
    KIND: ClassVar[str] = "health"


@dataclass
class Stats(Message):
    KIND: ClassVar[str] = "stats"


@dataclass
class TokenEvent(Message):
    KIND: ClassVar[str] = "token"
    request_id: str
    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[list] | None = None  # [[token_id, logprob], ...], best first


@dataclass
class FinalEvent(Message):
    KIND: ClassVar[str] = "final"
    request_id: str
    finish_reason: str  # length | stop | cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float
    total_s: float
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class ErrorEvent(Message):
    KIND: ClassVar[str] = "error"
    request_id: str | None
    code: str
    message: str


@dataclass
class HealthReply(Message):
    KIND: ClassVar[str] = "health_reply"
    status: str  # starting | ready | draining
    members: list[dict] = field(default_factory=list)


@dataclass
class StatsReply(Message):
    KIND: ClassVar[str] = "stats_reply"
    stats: dict = field(default_factory=dict)


# --- engine (coordinator <-> gpu_worker) -------------------------------------------------------------


@dataclass
class EngineGenerate(Message):
    KIND: ClassVar[str] = "engine_generate"
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    logprobs: int
    stop_token_ids: list[int]
    # The last output_offset prompt tokens are the request's own, streamed before its worker was lost: its seeded
    # draws go on from there.
    output_offset: int = 0


@dataclass
class EngineCancel(Message):
    KIND: ClassVar[str] = "engine_cancel"
    request_id: str


@dataclass
class EngineStarted(Message):
    """The worker admitted the request (its KV cache reserved) and runs its prompt next. Lost with the worker from
    then on, the request counts as resumed: one that only waited in the worker's queue cannot be what crashed it."""

    KIND: ClassVar[str] = "engine_started"
    request_id: str


@dataclass
class EngineToken(Message):
    KIND: ClassVar[str] = "engine_token"
    request_id: str
    token_id: int
    logprob: float
    top_logprobs: list[list]
    finish_reason: str | None = None


@dataclass
class EngineError(Message):
    KIND: ClassVar[str] = "engine_error"
    request_id: str
    code: str
    message: str
    member_id: str = ""  # the process whose failure or stop ended the request, where the worker knows it


@dataclass
class EngineFinished(Message):
    """A request the engine ended without a token (cancelled); frees the coordinator's state."""

    KIND: ClassVar[str] = "engine_finished"
    request_id: str
    finish_reason: str


# --- control plane (every process <-> coordinator) ---------------------------------------------------


@dataclass
class Heartbeat(Message):
    """Every process sends one each heartbeat interval; it doubles as the join request.

    The coordinator answers with Welcome whenever `placement_version` is not the current one
    (a new or restarted process reports 0), so start order does not matter; and with Superseded
    when another process has taken this one's member id over since.
    """

    KIND: ClassVar[str] = "heartbeat"
    member_id: str  # gpu-worker, expert-host-N
    role: str  # gpu_worker | expert_host
    # random, made once as the process starts: two processes under one member id (or one restarted under the
    # same pid, as in a container) never share it
    incarnation: str
    pid: int
    host: str  # the machine's host name, for the logs of a process started twice under one member id
    metrics_port: int
    placement_version: int  # the placement this process has fully applied
    model: str  # the model it serves (gguf_file.file_identity): a member of another model is not ready
    load: dict = field(default_factory=dict)


@dataclass
class Welcome(Message):
    """The coordinator's answer to a Heartbeat with a stale placement: what this process must hold."""

    KIND: ClassVar[str] = "welcome"
    placement: dict


@dataclass
class Superseded(Message):
    """The coordinator's answer to a Heartbeat from a process whose member id another process has taken over: the
    two were started under one id, and this one, sent no more work, must stop."""

    KIND: ClassVar[str] = "superseded"
    member_id: str
    pid: int  # of the process that holds the member id now
    host: str  # where it runs


@dataclass
class Refused(Message):
    """The coordinator's answer to a Heartbeat from a process that is no member of its system (an expert host whose
    configuration has more hosts than the coordinator's): it must stop."""

    KIND: ClassVar[str] = "refused"
    reason: str


# --- data plane (gpu_worker <-> expert host) ---------------------------------------------------------


@dataclass
class ExpertWork(Message):
    """One layer's cold work for one host: `hidden` rows are grouped by expert, counts[i] rows for expert_ids[i]."""

    KIND: ClassVar[str] = "expert_work"
    step: int
    layer: int
    expert_ids: list[int]
    counts: list[int]
    hidden: torch.Tensor


@dataclass
class ExpertResult(Message):
    KIND: ClassVar[str] = "expert_result"
    step: int
    layer: int
    output: torch.Tensor
    compute_s: float


@dataclass
class ExpertFailure(Message):
    KIND: ClassVar[str] = "expert_failure"
    step: int
    layer: int
    code: str
    message: str


# --- encoding ----------------------------------------------------------------------------------------


def _torch() -> types.ModuleType:
    """torch, imported on the first tensor: `tierserve up` and clients send none, and importing torch took each of them
    about a second of CPU at start."""
    import torch

    return torch


@functools.cache
def _wire_dtypes() -> tuple[dict[torch.dtype, str], dict[str, torch.dtype]]:
    """(wire name of each dtype, dtype of each wire name). numpy has no bfloat16: such tensors travel as their raw
    16-bit patterns."""
    torch = _torch()
    names = {torch.float32: "f4", torch.float16: "f2", torch.bfloat16: "bf16", torch.int32: "i4",
             torch.int64: "i8", torch.uint8: "u1", torch.int8: "i1"}
    return names, {name: dtype for dtype, name in names.items()}


def encode(msg: Message) -> list[Any]:
    """Frames of one message: msgpack header, then one buffer per tensor (send with copy=False)."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": msg.KIND}
    frames: list[Any] = [None]
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.type == _TENSOR:
            torch, wire_names = _torch(), _wire_dtypes()[0]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{msg.KIND}.{f.name} must be a tensor, not {type(value).__name__}")
            t = value.detach().contiguous()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.dtype not in wire_names:
                raise ValueError(f"{msg.KIND}.{f.name}: dtype {t.dtype} cannot travel")
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            header[f.name] = {"__tensor__": len(frames) - 1, "dtype": wire_names[t.dtype], "shape": list(t.shape)}
            frames.append(memoryview(raw.numpy()).cast("B") if raw.numel() else b"")
        else:
            header[f.name] = value
    try:
        frames[0] = msgpack.packb(header, use_bin_type=True)
    except OverflowError:
        for name, value in header.items():
            try:
                msgpack.packb(value, use_bin_type=True)
            except OverflowError:
                raise ValueError(f"{msg.KIND}.{name} holds an integer outside -2**63..2**64-1, which msgpack cannot "
                                 f"carry") from None
        raise
    return frames


def _tensor_from(spec: Any, frames: list[Any], where: str) -> torch.Tensor:
    if not isinstance(spec, dict) or "__tensor__" not in spec:
        raise ProtocolError("bad_field", f"{where} must be a tensor")
    torch, dtypes = _torch(), _wire_dtypes()[1]
    index, dtype_name, shape = spec.get("__tensor__"), spec.get("dtype"), spec.get("shape")
    # a dtype that is a list or map is unhashable: tested as a key, it raised TypeError, which no receiver caught
    if (not isinstance(dtype_name, str) or dtype_name not in dtypes or type(index) is not int
            or not isinstance(shape, list)):
        raise ProtocolError("bad_field", f"{where}: malformed tensor header")
    if not all(type(d) is int and d >= 0 for d in shape):  # bool is an int, but no size
        raise ProtocolError("bad_field", f"{where}: tensor shape {shape} is not a list of sizes >= 0")
    if not 0 <= index < len(frames) - 1:
        raise ProtocolError("bad_field", f"{where}: tensor frame {index} is missing")
    buf = frames[1 + index]
    buf = buf.buffer if hasattr(buf, "buffer") else buf
    dtype = dtypes[dtype_name]
    n = math.prod(shape)  # exact: numpy's int64 product wrapped round for huge sizes
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(memoryview(buf)) != n * itemsize:
        got = len(memoryview(buf))
        raise ProtocolError("bad_field", f"{where}: tensor frame has {got} bytes, shape needs {n * itemsize}")
    if n == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except (RuntimeError, TypeError) as e:  # sizes past what torch can count, beside a 0
            raise ProtocolError("bad_field", f"{where}: tensor shape {shape} is too large") from e
    with warnings.catch_warnings():  # frames are read-only; receivers never write into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype).view(shape)


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message says more
            _check_type(value, real[0], where)
            return
        for option in options:
            if option is type(None):
                continue
            try:
                _check_type(value, option, where)
                return
            except ProtocolError:
                pass
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise ProtocolError("bad_field", f"{where} must be {names}, got {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError("bad_field", f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            _check_type(v, item, f"{where}[{i}]")
        return
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError("bad_field", f"{where} must be a map, got {type(value).__name__}")
        return
    if hint is Any:
        return
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        list: isinstance(value, list),
    }.get(hint)
    if ok is None:
        raise TypeError(f"protocol field type {hint} is not supported")
    if not ok:
        raise ProtocolError("bad_field", f"{where} must be {hint.__name__}, got {type(value).__name__}")


_HINTS: dict[type, dict[str, Any]] = {}


def decode(frames: list[Any], expected: tuple[type[Message], ...] = ()) -> Message:
    """Parse and check a multipart message; raises ProtocolError naming what is wrong. With `expected`, a message of
    another kind is refused as unexpected_kind before its fields are read: they are not the sender's to get right."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    first = frames[0]
    try:
        header = msgpack.unpackb(first.buffer if hasattr(first, "buffer") else first, raw=False)
    except UnicodeDecodeError as e:  # valid msgpack, whose strings must be UTF-8
        raise ProtocolError("malformed", f"a string in the message is not valid UTF-8 ({e.reason} at its byte "
                                         f"{e.start})") from e
    except Exception as e:  # msgpack raises several unrelated exception types for garbage
        if isinstance(e, ValueError) and "map key" in str(e):  # valid msgpack, a key refused by strict_map_key
            raise ProtocolError("bad_field", f"map keys must be strings ({e})") from e
        raise ProtocolError("malformed", f"message is not valid msgpack ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"message must be a msgpack map, got {type(header).__name__}")
    if type(header.get("v")) is not int or header["v"] != PROTOCOL_VERSION:  # true and 1.0 equal 1
        raise ProtocolError(
            "bad_version", f"protocol version {header.get('v')!r} is not supported (expected {PROTOCOL_VERSION})"
        )
    kind = header.get("kind")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_kind", f"unknown message kind {kind!r}")
    if expected and cls not in expected:
        raise ProtocolError("unexpected_kind",
                            f"{kind!r} is not expected here: send one of {', '.join(c.KIND for c in expected)}")
    hints = _HINTS.get(cls)
    if hints is None:
        tensors = any(f.type == _TENSOR for f in dataclasses.fields(cls))
        hints = _HINTS[cls] = typing.get_type_hints(cls, localns={"torch": _torch()} if tensors else None)
    names = [key for key in header if not isinstance(key, str)]
    if names:
        raise ProtocolError("bad_field", f"{kind}: field names must be strings, not {names[0]!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(header) - known - {"v", "kind"})
    if extra:
        raise ProtocolError("bad_field", f"{kind}: unknown field(s) {', '.join(map(str, extra))}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        where = f"{kind}.{f.name}"
        if f.name not in header:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError("missing_field", f"{kind}: missing field {f.name!r}")
            continue
        value = header[f.name]
        if f.type == _TENSOR:
            value = _tensor_from(value, frames, where)
        else:
            _check_type(value, hints[f.name], where)
            if type(value) is int and _wants_float(hints[f.name]):
                value = float(value)  # every reader gets the float asked for: torch.tensor([2**64 - 1]) overflows
        values[f.name] = value
    tensors = sum(f.type == _TENSOR and f.name in header for f in dataclasses.fields(cls))
    if len(frames) != 1 + tensors:  # a stray frame is a sender's mistake, not something to skip over
        raise ProtocolError("malformed", f"{kind}: {len(frames) - 1} frame(s) after the header, where its tensors "
                                         f"take {tensors}")
    return cls(**values)


def _wants_float(hint: Any) -> bool:
    """Whether a field of this type takes a float and not an int (float, or float | None)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return float in options and int not in options


def recover_fields(frames: list[Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Those of `names` that the header of a message that fails to decode has, when the header is a readable map: a
    refusal can then name what it refuses. Reads key by key and skips values, so a huge payload costs nothing."""
    found: dict[str, Any] = {}
    if not frames:
        return found
    first = frames[0]
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=0)  # 0: no limit but the frame's own size
    try:
        unpacker.feed(first.buffer if hasattr(first, "buffer") else first)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in names:
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types for garbage
        pass  # what was read before the garbage still counts
    return found
