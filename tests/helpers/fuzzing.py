"""Malformed TRACI messages for the fuzz tests, each labelled with its category and the
rejection reason the receiving service must count.

Two layers of bad input::

    garbage(rng, base)       a valid message, then corrupted so that ``proto.decode`` refuses it
                             (random bytes, truncated or extra frames, wrong version, ...)
    TARGETS[target][i].make  a well-formed message the receiver must refuse on meaning
                             (impersonation, replay, a step that does not exist, ...)

A *target* is one socket of one service, as the fuzzer reaches it::

    broker/experts            raw DEALERs on the broker's expert port (never registered)
    broker/reducer            raw DEALERs on the broker's reducer port
    broker/experts(as peer)   injected upstream on a registered expert's own connection
    broker/reducer(as peer)   injected upstream on the registered reducer's connection
    expert                    injected downstream into an expert (the proxy plays the broker)
    reducer                   injected downstream into the reducer

Generators are pure functions of a seeded ``random.Random`` and a ``PeerView`` (what the proxy
has seen of that peer's real traffic), so a run is reproducible up to thread timing. Semantic
generators only produce messages that can never be mistaken for good traffic: a valid-looking
BATCH for a future step, a DROP for a step in flight or a WELCOME would be obeyed, correctly.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from traci_ml import proto

BROKER_EXPERTS = "broker/experts"
BROKER_REDUCER = "broker/reducer"
VIA_EXPERT = "broker/experts(as peer)"
VIA_REDUCER = "broker/reducer(as peer)"
EXPERT = "expert"
REDUCER = "reducer"
BROKER_TARGETS = (BROKER_EXPERTS, BROKER_REDUCER, VIA_EXPERT, VIA_REDUCER)

FAR = 1_000_000  # seqs at least this far beyond the schedule can never be a real step


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What every process of the run agrees on (from the config and the schedule)."""

    run_id: str
    embed_dim: int
    dtype: str
    n_experts: int
    batch_size: int
    total: int  # seqs in the schedule


@dataclass(slots=True)
class PeerView:
    """What the proxy has seen of one peer's real traffic (empty for raw broker targets)."""

    expert_id: int = -1  # the expert behind this connection; -1 for the reducer
    inbound: deque[list[bytes]] = field(default_factory=lambda: deque(maxlen=32))
    outbound: deque[list[bytes]] = field(default_factory=lambda: deque(maxlen=32))
    unanswered: dict[int, str] = field(default_factory=dict)  # expert: seq -> phase in flight
    last_batch_seq: int = -1  # reducer: highest BATCH seq forwarded to it
    all_live: bool = False  # every expert and the reducer registered and training


@dataclass(frozen=True, slots=True)
class Fuzz:
    """One malformed message. ``expect``: the reasons the receiver may count it under
    (one, except where a race decides between two). ``decodes``: it passes ``proto.decode``
    and must be refused by the service's own checks. ``swallow``: the receiver's answer to it
    (a refusal WELCOME, or the reducer's DROP for seq ``seq``) must not be forwarded, since
    the peer or broker on the other side would rightly obey it."""

    category: str
    frames: list[bytes]
    expect: tuple[str, ...]
    decodes: bool = False
    swallow: bool = False
    seq: int = -1


Make = Callable[[random.Random, RunFacts, PeerView], "Fuzz | None"]


@dataclass(frozen=True, slots=True)
class Generator:
    category: str
    weight: float
    make: Make


# ---- valid messages to start from ----------------------------------------------------------


def frames_of(msg: proto.Message) -> list[bytes]:
    return [bytes(f) for f in proto.encode(msg)]


def tensor(rng: random.Random, shape: tuple[int, ...], dtype: str = "float32") -> proto.Tensor:
    gen = np.random.default_rng(rng.getrandbits(32))
    array = gen.standard_normal(shape).astype(proto.DTYPES[dtype][1] or np.float32)
    return proto.Tensor.from_numpy(array)


def emb(rng: random.Random, run: RunFacts, seq: int, expert_id: int, **kw: Any) -> list[bytes]:
    shape = kw.get("shape", (run.batch_size, run.embed_dim))
    t = tensor(rng, shape, kw.get("dtype", run.dtype))
    return frames_of(proto.Emb(seq, expert_id, kw.get("phase", "train"), t))


def grad(rng: random.Random, run: RunFacts, seq: int, expert_id: int, n: int, **kw: Any):
    shape = kw.get("shape", (run.batch_size, run.embed_dim))
    tensors = tuple(tensor(rng, shape, kw.get("dtype", run.dtype)) for _ in range(n))
    return frames_of(proto.Grad(seq, expert_id, tensors))


def batch(rng: random.Random, run: RunFacts, seq: int, **kw: Any) -> list[bytes]:
    present = kw.get("present", (True,) * run.n_experts)
    shape = kw.get("shape", (run.batch_size, run.embed_dim))
    tensors = tuple(tensor(rng, shape, kw.get("dtype", run.dtype)) for p in present if p)
    return frames_of(proto.Batch(seq, kw.get("phase", "train"), tuple(present), tensors))


def far_seq(rng: random.Random, run: RunFacts) -> int:
    return rng.choice([run.total + FAR + rng.randrange(FAR), (1 << 53) - 1])


def reason_of(frames: list[bytes]) -> str | None:
    """The reason ``proto.decode`` refuses ``frames`` with, or None if it accepts them."""
    try:
        proto.decode(frames)
    except proto.wire.ProtocolError as exc:
        return exc.reason
    return None


# ---- decode-level garbage: a valid message, corrupted ---------------------------------------

Corrupt = Callable[[random.Random, dict[str, Any], list[bytes]], "tuple[list[bytes], str]"]


def pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _random_bytes(rng, header, tensors):
    while True:  # random bytes are as good as never a valid message; draw again if they are
        frames = [rng.randbytes(rng.randrange(200)) for _ in range(rng.randint(1, 4))]
        if (reason := reason_of(frames)) is not None:
            return frames, reason


def _truncated_header(rng, header, tensors):
    raw = pack(header)
    return [raw[: rng.randrange(1, len(raw))], *tensors], "bad_header"


def _header_trailing_bytes(rng, header, tensors):
    return [pack(header) + rng.randbytes(rng.randint(1, 8)), *tensors], "bad_header"


def _header_not_a_map(rng, header, tensors):
    value = rng.choice([[1, "EMB"], 7, "HELLO", None, 1.5, [header]])
    return [pack(value), *tensors], "bad_header"


def _non_string_key(rng, header, tensors):
    raw = msgpack.packb({**header, rng.randrange(100): 1}, use_bin_type=True)
    return [raw, *tensors], "bad_header"


def _oversize_header(rng, header, tensors):
    pad = "x" * (proto.MAX_HEADER_BYTES + rng.randrange(1, 4096))
    return [pack({**header, "pad": pad}), *tensors], "header_size"


def _too_many_frames(rng, header, tensors):
    n = proto.wire.MAX_TENSORS + 1 + rng.randint(1, 8)
    return [pack(header), *([b""] * n)], "too_many_frames"


def _wrong_version(rng, header, tensors):
    version = rng.choice([0, 2, 3, 255, -1, "1", 1.0, True, None, [1]])
    new = {**header, "v": version}
    if rng.random() < 0.1:
        del new["v"]
    return [pack(new), *tensors], "version"


def _unknown_kind(rng, header, tensors):
    kind = rng.choice(["FOO", "emb", "", "BATCHES", "Grad", 3, None, [], "HELLO "])
    new = {**header, "k": kind}
    if rng.random() < 0.1:
        del new["k"]
    return [pack(new), *tensors], "unknown_kind"


def _bad_field(rng, header, tensors):
    fields = proto.KINDS[header["k"]].FIELDS
    new = dict(header)
    name = rng.choice(sorted(fields))
    typ = fields[name]
    choice = rng.randrange(6)
    if choice == 0:  # a value of the wrong type
        wrong = {int: ["3", 3.0, True, None, [3]], str: [3, None, b"train", ["x"]],
                 list: ["all", 4, None], bool: [1, "yes", None]}[typ]  # fmt: skip
        new[name] = rng.choice(wrong)
    elif choice == 1:
        new["zz_" + rng.choice(["x", "seq", "admin"])] = 1  # an unknown field
    elif choice == 2:
        del new[name]  # a missing field (every field is required outside HELLO)
    elif choice == 3 and typ is int:
        new[name] = rng.choice([-2, -(1 << 40), 1 << 53, (1 << 64) - 1])  # out of range
    elif choice == 4 and "seq" in fields:
        new["seq"] = -1
    elif "phase" in fields:
        new["phase"] = rng.choice(["test", "TRAIN", "", "eval "])
    else:
        new["zz"] = None
    return [pack(new), *tensors], "bad_field"


def _bad_tensor_spec(rng, header, tensors):
    if rng.random() < 0.3:
        t = rng.choice(["x", {"a": 1}, 5, None, b"t"])  # not a list at all
    else:  # as many specs as frames, one of them not [dtype, shape]
        t = [list(s) for s in header["t"]]
        dtype, shape = t[0]
        t[rng.randrange(len(t))] = rng.choice(
            [dtype, [dtype], [dtype, 5], [dtype, "64x64"], [dtype, shape, 3], None, {}]
        )
    return [pack({**header, "t": t}), *tensors], "bad_header"


def _frame_count(rng, header, tensors):
    choice = rng.randrange(3)
    if choice == 0:
        return [pack(header), *tensors[:-1]], "frame_count"
    if choice == 1:
        return [pack(header), *tensors, rng.choice(tensors)], "frame_count"
    return [pack({k: v for k, v in header.items() if k != "t"}), *tensors], "frame_count"


def _unsupported_dtype(rng, header, tensors):
    t = [list(s) for s in header["t"]]
    dtype = rng.choice(["float64", "int4", "uint8", "int32", "complex64", "bool", "", "f4", 7])
    t[rng.randrange(len(t))][0] = dtype
    return [pack({**header, "t": t}), *tensors], "dtype"


def _bad_shape(rng, header, tensors):
    t = [list(s) for s in header["t"]]
    i = rng.randrange(len(t))
    b, d = t[i][1]
    t[i][1] = rng.choice(
        [
            [1, 1, 1, 1, b * d],  # rank 5
            [-b, -d],
            [str(b), d],
            [True, b * d],
            [float(b), d],
            [(1 << 31) + 1, 0],
            [b * d],  # the right bytes, but not [B, d]
            [b, d, 1],
            [d, b] if b != d else [b * 2, d // 2],  # for BATCH: tensors of different shapes
        ]
    )
    if t[i][1] in ([d, b], [b * 2, d // 2]) and len(t) == 1:
        t[i][1] = [b * d]
    return [pack({**header, "t": t}), *tensors], "bad_shape"


def _oversize_tensor(rng, header, tensors):
    t = [list(s) for s in header["t"]]
    t[rng.randrange(len(t))][1] = rng.choice([[1 << 20, 1 << 10], [1 << 31, 2], [1 << 30, 1 << 30]])
    return [pack({**header, "t": t}), *tensors], "oversize"


def _size_mismatch(rng, header, tensors):
    t = [list(s) for s in header["t"]]
    frames = list(tensors)
    i = rng.randrange(len(t))
    choice = rng.randrange(4)
    if choice == 0:
        frames[i] = frames[i][: rng.randrange(len(frames[i]))]  # truncated tensor
    elif choice == 1:
        frames[i] = frames[i] + rng.randbytes(rng.randint(1, 64))  # oversize tensor frame
    elif choice == 2:
        t[i][1] = [t[i][1][0] - 1, t[i][1][1]]  # one row fewer than the frame holds
    else:
        t[i][0] = "bfloat16" if t[i][0] == "float32" else "float32"  # itemsize disagrees
    return [pack({**header, "t": t}), *frames], "size_mismatch"


def _huge_frame(rng, header, tensors):
    frames = list(tensors)
    frames[rng.randrange(len(frames))] = bytes(rng.randint(1, 4) << 20)  # MiBs, not [B, d]
    return [pack(header), *frames], "size_mismatch"


def _non_finite(rng, header, tensors):
    t = [list(s) for s in header["t"]]
    frames = list(tensors)
    i = rng.randrange(len(t))
    np_dtype = proto.DTYPES[t[i][0]][1]
    if np_dtype is None or rng.random() < 0.25:  # bfloat16: exponent bits all ones
        t[i][0] = "bfloat16"
        bits = np.zeros(math.prod(t[i][1]), dtype="<u2")
        bits[rng.randrange(len(bits))] = rng.choice([0x7FC0, 0x7F80, 0xFF80, 0x7F81])
        frames[i] = bits.tobytes()
    else:
        values = np.frombuffer(frames[i], dtype=np_dtype).copy()
        values[rng.randrange(len(values))] = rng.choice([np.nan, np.inf, -np.inf])
        frames[i] = values.tobytes()
    return [pack({**header, "t": t}), *frames], "non_finite"


GARBAGE: dict[str, Corrupt] = {
    "random_bytes": _random_bytes,
    "truncated_header": _truncated_header,
    "header_trailing_bytes": _header_trailing_bytes,
    "header_not_a_map": _header_not_a_map,
    "non_string_key": _non_string_key,
    "oversize_header": _oversize_header,
    "too_many_frames": _too_many_frames,
    "wrong_version": _wrong_version,
    "unknown_kind": _unknown_kind,
    "bad_field": _bad_field,
    "bad_tensor_spec": _bad_tensor_spec,
    "frame_count": _frame_count,
    "unsupported_dtype": _unsupported_dtype,
    "bad_shape": _bad_shape,
    "oversize_tensor": _oversize_tensor,
    "size_mismatch": _size_mismatch,
    "huge_frame": _huge_frame,
    "non_finite": _non_finite,
}
RARE = {"oversize_header": 0.2, "too_many_frames": 0.2, "huge_frame": 0.1}  # heavy on the wire


def garbage(rng: random.Random, base: list[bytes]) -> Fuzz:
    """``base`` (a valid message carrying tensors) corrupted one way, chosen at random."""
    names = list(GARBAGE)
    category = rng.choices(names, weights=[RARE.get(n, 1.0) for n in names])[0]
    header = msgpack.unpackb(base[0], raw=False)
    frames, reason = GARBAGE[category](rng, header, list(base[1:]))
    return Fuzz(category, frames, (reason,))


# ---- well-formed messages the receiver must refuse on meaning -----------------------------


def _other_expert(rng: random.Random, run: RunFacts, mine: int) -> int:
    return rng.choice([i for i in range(run.n_experts) if i != mine] or [mine + 1])


def _semantic(category: str, frames: list[bytes], *expect: str, **kw: Any) -> Fuzz:
    return Fuzz(category, frames, expect, decodes=True, **kw)


def _refused_hello(rng: random.Random, run: RunFacts, role: str) -> list[bytes]:
    """A HELLO the broker refuses on its config alone (no state is touched)."""
    hello = {"role": role, "run_id": run.run_id, "embed_dim": run.embed_dim, "dtype": run.dtype,
             "expert_id": rng.randrange(run.n_experts) if role == "expert" else -1,
             "n_experts": run.n_experts if role == "reducer" else 0}  # fmt: skip
    wrong = rng.choice(["run_id", "embed_dim", "dtype", "id", "role"])
    if wrong == "run_id":
        hello["run_id"] = rng.choice([run.run_id + "-x", "", "other", run.run_id.upper() + "_"])
    elif wrong == "embed_dim":
        hello["embed_dim"] = run.embed_dim + rng.randint(1, 64)
    elif wrong == "dtype":
        hello["dtype"] = rng.choice([d for d in proto.DTYPES if d != run.dtype])
    elif wrong == "id" and role == "expert":
        hello["expert_id"] = rng.randint(run.n_experts, proto.MAX_EXPERTS - 1)
    elif wrong == "id":
        hello["n_experts"] = run.n_experts + rng.randint(1, 8)
    else:  # the other role's HELLO on this socket
        other = "reducer" if role == "expert" else "expert"
        hello.update(role=other, expert_id=0 if other == "expert" else -1,
                     n_experts=run.n_experts if other == "reducer" else 0)  # fmt: skip
    return frames_of(proto.Hello(**hello))


def _live_hello(rng: random.Random, run: RunFacts, role: str) -> list[bytes]:
    """A HELLO with every field right, for an id that a live peer holds: refused ``held``
    (it carries no secret of that registration)."""
    if role == "expert":
        msg = proto.Hello("expert", run.run_id, run.embed_dim, run.dtype,
                          expert_id=rng.randrange(run.n_experts))  # fmt: skip
    else:
        msg = proto.Hello("reducer", run.run_id, run.embed_dim, run.dtype, n_experts=run.n_experts)
    return frames_of(msg)


def _wrong_kind(rng: random.Random, run: RunFacts, kinds: str) -> tuple[str, list[bytes]]:
    kind = rng.choice(kinds.split())
    seq = far_seq(rng, run)
    build = {
        "BATCH": lambda: batch(rng, run, seq),
        "WELCOME": lambda: frames_of(proto.Welcome(ok=rng.random() < 0.5, start_seq=seq)),
        "GRAD": lambda: grad(rng, run, seq, rng.randrange(run.n_experts), 1),
        "ACK": lambda: frames_of(proto.Ack(seq)),
        "DROP": lambda: frames_of(proto.Drop(seq, "fuzz")),
        "EMB": lambda: emb(rng, run, seq, rng.randrange(run.n_experts)),
        "HELLO": lambda: _live_hello(rng, run, rng.choice(["expert", "reducer"])),
    }
    return kind, build[kind]()


# broker, expert socket, from routing ids that never registered


def raw_expert_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return emb(rng, run, rng.randrange(run.total), rng.randrange(run.n_experts))


def _emb_unregistered(rng, run, peer):
    seq = rng.choice([rng.randrange(run.total), far_seq(rng, run)])
    frames = emb(rng, run, seq, rng.randrange(run.n_experts), phase=rng.choice(proto.PHASES))
    return _semantic("emb_from_unregistered", frames, "unregistered")


def _beat_unregistered(rng, run, peer):
    msg = proto.Heartbeat() if rng.random() < 0.5 else proto.Goodbye(rng.choice(["done", "x"]))
    return _semantic("heartbeat_goodbye_unregistered", frames_of(msg), "unregistered")


def _expert_hello_refused(rng, run, peer):
    return _semantic("hello_wrong_config", _refused_hello(rng, run, "expert"), "refused")


def _expert_hello_live(rng, run, peer):
    if not peer.all_live:  # before every expert holds its id, this HELLO would take one
        return None
    return _semantic("hello_impersonation", _live_hello(rng, run, "expert"), "held")


def _expert_wrong_socket(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "BATCH WELCOME GRAD ACK DROP")
    return _semantic("kind_for_other_socket", frames, "unexpected_kind")


# broker, reducer socket, from routing ids that never registered


def raw_reducer_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return grad(rng, run, rng.randrange(run.total), -1, run.n_experts)


def _reply_unregistered(rng, run, peer):
    seq = rng.randrange(run.total)
    frames = rng.choice(
        [
            lambda: grad(rng, run, seq, -1, rng.randint(1, run.n_experts)),
            lambda: frames_of(proto.Ack(seq)),
            lambda: frames_of(proto.Drop(seq, "fuzz")),
            lambda: frames_of(proto.Heartbeat()),
            lambda: frames_of(proto.Goodbye("done")),
        ]
    )()
    return _semantic("reply_from_unregistered", frames, "unregistered")


def _reducer_hello_refused(rng, run, peer):
    return _semantic("hello_wrong_config", _refused_hello(rng, run, "reducer"), "refused")


def _reducer_hello_live(rng, run, peer):
    if not peer.all_live:
        return None
    return _semantic("hello_second_reducer", _live_hello(rng, run, "reducer"), "held")


def _reducer_wrong_socket(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "EMB BATCH WELCOME")
    return _semantic("kind_for_other_socket", frames, "unexpected_kind")


# broker, expert socket, on a registered expert's own connection


def via_expert_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return emb(rng, run, far_seq(rng, run), _other_expert(rng, run, peer.expert_id))


def _emb_impersonation(rng, run, peer):
    seq = rng.choice([rng.randrange(run.total), far_seq(rng, run)])
    frames = emb(rng, run, seq, _other_expert(rng, run, peer.expert_id))
    return _semantic("emb_impersonation", frames, "impersonation")


def _emb_replayed(rng, run, peer):
    if not peer.outbound:
        return None
    # In flight at the broker: duplicate; already answered: late (and a DROP comes back).
    return _semantic("emb_replayed", list(rng.choice(peer.outbound)), "duplicate", "late")


def _emb_far_future(rng, run, peer):
    frames = emb(rng, run, far_seq(rng, run), peer.expert_id)
    return _semantic("emb_far_future", frames, "too_far_ahead")


def _via_expert_hello(rng, run, peer):
    frames = _refused_hello(rng, run, "expert")
    return _semantic("hello_wrong_config", frames, "refused", swallow=True)


def _via_expert_wrong_kind(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "BATCH WELCOME GRAD ACK DROP")
    return _semantic("kind_for_other_socket", frames, "unexpected_kind")


# broker, reducer socket, on the registered reducer's own connection


def via_reducer_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return grad(rng, run, far_seq(rng, run), -1, run.n_experts)


def _reply_unknown_step(rng, run, peer):
    seq = far_seq(rng, run)
    frames = rng.choice(
        [
            lambda: grad(rng, run, seq, -1, rng.randint(1, run.n_experts)),
            lambda: frames_of(proto.Ack(seq)),
            lambda: frames_of(proto.Drop(seq, "fuzz")),
        ]
    )()
    return _semantic("reply_for_no_step", frames, "unknown_step")


def _reply_replayed(rng, run, peer):
    if not peer.outbound:  # the reducer's real GRAD/ACKs, each already answered its step
        return None
    return _semantic("reply_replayed", list(rng.choice(peer.outbound)), "unknown_step")


def _via_reducer_hello(rng, run, peer):
    frames = _refused_hello(rng, run, "reducer")
    return _semantic("hello_wrong_config", frames, "refused", swallow=True)


def _via_reducer_wrong_kind(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "EMB BATCH WELCOME")
    return _semantic("kind_for_other_socket", frames, "unexpected_kind")


# an expert's socket, as if from its broker


def expert_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return grad(rng, run, far_seq(rng, run), peer.expert_id, 1)


def _grad_misrouted(rng, run, peer):
    seq = rng.choice([*peer.unanswered, far_seq(rng, run)])
    frames = grad(rng, run, seq, _other_expert(rng, run, peer.expert_id), 1)
    return _semantic("grad_misrouted", frames, "misrouted")


def _reply_for_no_step(rng, run, peer):
    seq = far_seq(rng, run)
    frames = rng.choice(
        [
            lambda: grad(rng, run, seq, peer.expert_id, 1),
            lambda: frames_of(proto.Ack(seq)),
            lambda: frames_of(proto.Drop(seq, "fuzz")),
        ]
    )()
    return _semantic("reply_for_no_step", frames, "unknown_step")


def _expert_reply_replayed(rng, run, peer):
    if not peer.inbound:  # real GRAD/ACKs this expert has already been given
        return None
    return _semantic("reply_replayed", list(rng.choice(peer.inbound)), "unknown_step")


def _grad_wrong_shape(rng, run, peer):
    if not peer.unanswered:
        return None
    seq = rng.choice(list(peer.unanswered))
    if peer.unanswered[seq] == "eval":  # an eval step is answered by ACK, never GRAD
        return _semantic("grad_for_eval_step", grad(rng, run, seq, peer.expert_id, 1),
                         "unexpected_kind")  # fmt: skip
    b, d = run.batch_size, run.embed_dim
    shape = rng.choice([(b - 1, d), (b + 1, d), (b, d + 1), (b, d - 1), (1, d)])
    frames = grad(rng, run, seq, peer.expert_id, 1, shape=shape)
    return _semantic("grad_wrong_shape", frames, "conflict")


def _expert_wrong_kind(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "BATCH HELLO EMB")
    return _semantic("kind_not_for_experts", frames, "unexpected_kind")


# the reducer's socket, as if from its broker


def reducer_base(rng: random.Random, run: RunFacts, peer: PeerView) -> list[bytes]:
    return batch(rng, run, far_seq(rng, run))


def _batch_replayed(rng, run, peer):
    if not peer.inbound:  # real BATCHes the reducer has already been given
        return None
    return _semantic("batch_replayed", list(rng.choice(peer.inbound)), "replay")


def _batch_far_future(rng, run, peer):
    frames = batch(rng, run, far_seq(rng, run), phase=rng.choice(proto.PHASES))
    return _semantic("batch_beyond_schedule", frames, "unknown_step")


def _batch_conflict(rng, run, peer):
    """A BATCH for a step still to come that cannot match the schedule. The reducer answers
    DROP(seq); the proxy keeps that from the broker, which would drop the real step."""
    seq = peer.last_batch_seq + 1 + rng.randrange(8)
    if seq >= run.total:
        return None
    n, b, d = run.n_experts, run.batch_size, run.embed_dim
    wrong = rng.choice(["more", "fewer", "width", "dtype"])
    kw: dict[str, Any] = {"phase": rng.choice(proto.PHASES)}
    if wrong == "more":
        kw["present"] = (True,) * (n + 1)
    elif wrong == "fewer":
        kw["present"] = (True,) * max(1, n - 1)
    elif wrong == "width":
        kw["shape"] = (b, d + rng.randint(1, 8))
    else:
        kw["dtype"] = rng.choice([x for x in proto.DTYPES if x != run.dtype and x != "bfloat16"])
    return _semantic("batch_conflict", batch(rng, run, seq, **kw), "conflict", swallow=True,
                     seq=seq)  # fmt: skip


def _reducer_wrong_kind(rng, run, peer):
    _, frames = _wrong_kind(rng, run, "WELCOME ACK GRAD DROP EMB HELLO")
    return _semantic("kind_not_for_reducer", frames, "unexpected_kind")


def _garbage_on(base: Callable[[random.Random, RunFacts, PeerView], list[bytes]]) -> Make:
    return lambda rng, run, peer: garbage(rng, base(rng, run, peer))


GARBAGE_WEIGHT = 6.0  # against 1.0 per semantic category
TARGETS: dict[str, list[Generator]] = {
    BROKER_EXPERTS: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(raw_expert_base)),
        Generator("emb_from_unregistered", 1.0, _emb_unregistered),
        Generator("heartbeat_goodbye_unregistered", 0.5, _beat_unregistered),
        Generator("hello_wrong_config", 1.0, _expert_hello_refused),
        Generator("hello_impersonation", 0.1, _expert_hello_live),
        Generator("kind_for_other_socket", 0.5, _expert_wrong_socket),
    ],
    BROKER_REDUCER: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(raw_reducer_base)),
        Generator("reply_from_unregistered", 1.5, _reply_unregistered),
        Generator("hello_wrong_config", 1.0, _reducer_hello_refused),
        Generator("hello_second_reducer", 0.1, _reducer_hello_live),
        Generator("kind_for_other_socket", 0.5, _reducer_wrong_socket),
    ],
    VIA_EXPERT: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(via_expert_base)),
        Generator("emb_impersonation", 1.0, _emb_impersonation),
        Generator("emb_replayed", 1.0, _emb_replayed),
        Generator("emb_far_future", 1.0, _emb_far_future),
        Generator("hello_wrong_config", 0.3, _via_expert_hello),
        Generator("kind_for_other_socket", 0.5, _via_expert_wrong_kind),
    ],
    VIA_REDUCER: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(via_reducer_base)),
        Generator("reply_for_no_step", 1.0, _reply_unknown_step),
        Generator("reply_replayed", 1.0, _reply_replayed),
        Generator("hello_wrong_config", 0.3, _via_reducer_hello),
        Generator("kind_for_other_socket", 0.5, _via_reducer_wrong_kind),
    ],
    EXPERT: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(expert_base)),
        Generator("grad_misrouted", 1.0, _grad_misrouted),
        Generator("reply_for_no_step", 1.0, _reply_for_no_step),
        Generator("reply_replayed", 1.0, _expert_reply_replayed),
        Generator("grad_wrong_shape", 1.0, _grad_wrong_shape),
        Generator("kind_not_for_experts", 0.5, _expert_wrong_kind),
    ],
    REDUCER: [
        Generator("garbage", GARBAGE_WEIGHT, _garbage_on(reducer_base)),
        Generator("batch_replayed", 1.0, _batch_replayed),
        Generator("batch_beyond_schedule", 1.0, _batch_far_future),
        Generator("batch_conflict", 1.0, _batch_conflict),
        Generator("kind_not_for_reducer", 0.5, _reducer_wrong_kind),
    ],
}


def draw(
    rng: random.Random,
    target: str,
    run: RunFacts,
    peer: PeerView,
    *,
    skip: frozenset[str] = frozenset(),
) -> Fuzz:
    """One malformed message for ``target``; generators in ``skip`` or not applicable to what
    the peer has seen so far are passed over (garbage always applies)."""
    generators = [g for g in TARGETS[target] if g.category not in skip]
    while True:
        gen = rng.choices(generators, weights=[g.weight for g in generators])[0]
        fuzz = gen.make(rng, run, peer)
        if fuzz is not None:
            return fuzz
