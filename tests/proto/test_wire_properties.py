"""Property tests of the wire protocol: decode never fails but with ProtocolError, and valid
tensor messages survive a round trip."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from traci_ml import proto
from traci_ml.core.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Header keys decode knows, plus a stranger; values of every msgpack type, nested a little.
KEYS = st.sampled_from(
    [
        "v",
        "k",
        "t",
        "seq",
        "expert_id",
        "phase",
        "present",
        "role",
        "run_id",
        "embed_dim",
        "dtype",
        "n_experts",
        "window",
        "ok",
        "reason",
        "start_seq",
        "zzz",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from([1, "EMB", "BATCH", "GRAD", "HELLO", "ACK", "train", "float32", "bfloat16"])
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


def header_bytes(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode_or_reject(frames: list[Any]) -> None:
    """The property: a Message, or a ProtocolError with a known reason; nothing else."""
    try:
        msg = proto.decode(frames)
    except ProtocolError as exc:
        assert exc.reason in proto.REJECT_REASONS
    else:
        assert type(msg) in proto.KINDS.values()


@FAST
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_decode_or_reject(frames: list[bytes]) -> None:
    decode_or_reject(frames)


@FAST
@given(
    st.dictionaries(KEYS, VALUES, max_size=8),
    st.lists(st.binary(max_size=48), max_size=3),
)
def test_random_headers_decode_or_reject(header: dict[str, Any], frames: list[bytes]) -> None:
    decode_or_reject([header_bytes(header), *frames])


# --------------------------------------------------------------------------------------
# Valid tensor messages
# --------------------------------------------------------------------------------------


@st.composite
def tensor_lists(draw: st.DrawFn, count: int) -> tuple[proto.Tensor, ...]:
    """``count`` finite [B, d] tensors of one dtype and shape, as bytes frames."""
    dtype = draw(st.sampled_from(sorted(proto.DTYPES)))
    shape = (draw(st.integers(0, 5)), draw(st.integers(1, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = []
    for _ in range(count):
        values = rng.standard_normal(shape).astype(np.float32)
        if dtype == "bfloat16":
            raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = values.astype(proto.DTYPES[dtype][1]).tobytes()
        tensors.append(proto.Tensor(dtype, shape, raw))
    return tuple(tensors)


SEQS = st.integers(0, (1 << 53) - 1)
PHASES = st.sampled_from(proto.PHASES)
EXPERT_IDS = st.integers(0, proto.MAX_EXPERTS - 1)


@st.composite
def tensor_messages(draw: st.DrawFn) -> proto.Emb | proto.Batch | proto.Grad:
    kind = draw(st.sampled_from(["EMB", "BATCH", "GRAD_UP", "GRAD_DOWN"]))
    seq = draw(SEQS)
    if kind == "EMB":
        (tensor,) = draw(tensor_lists(1))
        return proto.Emb(seq, draw(EXPERT_IDS), draw(PHASES), tensor)
    if kind == "BATCH":
        present = tuple(draw(st.lists(st.booleans(), min_size=1, max_size=8).filter(any)))
        return proto.Batch(seq, draw(PHASES), present, draw(tensor_lists(sum(present))))
    if kind == "GRAD_UP":  # reducer -> broker: one tensor per present expert
        return proto.Grad(seq, -1, draw(tensor_lists(draw(st.integers(1, 6)))))
    return proto.Grad(seq, draw(EXPERT_IDS), draw(tensor_lists(1)))  # broker -> expert


@pytest.mark.parametrize("kind", ["EMB", "BATCH", "GRAD"])
def test_tensor_messages_draws_every_kind(kind: str) -> None:
    # Guards the strategy itself (it does not depend on decode).
    assert find(tensor_messages(), lambda msg: msg.KIND == kind).KIND == kind


@st.composite
def encoded_messages(draw: st.DrawFn) -> list[Any]:
    return proto.encode(draw(tensor_messages()))


@FAST
@given(
    encoded_messages(),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_header_byte_flips_decode_or_reject(
    frames: list[Any], flips: list[tuple[int, int]]
) -> None:
    header = bytearray(frames[0])
    for at, byte in flips:
        header[at % len(header)] = byte
    decode_or_reject([bytes(header), *frames[1:]])


@FAST
@given(encoded_messages(), st.data())
def test_header_truncation_decodes_or_rejects(frames: list[Any], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(frames[0]) - 1))
    decode_or_reject([frames[0][:cut], *frames[1:]])


@settings(max_examples=100, deadline=None)
@given(tensor_messages())
def test_tensor_messages_round_trip(msg: proto.Emb | proto.Batch | proto.Grad) -> None:
    frames = proto.encode(msg)
    decoded = proto.decode(frames)
    assert decoded == msg  # tensors compare by dtype, shape and the very frame object
    tensors = (decoded.tensor,) if isinstance(decoded, proto.Emb) else decoded.tensors
    assert [t.data for t in tensors] == frames[1:]
    assert all(t.data is f for t, f in zip(tensors, frames[1:], strict=True))
