"""The compressed wire dtype int8 (proto/codec.py, docs/compression.md): per-row float32
scales then int8 values; its size rule, round trip, and what a hostile peer may not send."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traci_ml import proto
from traci_ml.core.errors import ProtocolError
from traci_ml.proto import codec, fast, wire

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def int8_tensor(x: np.ndarray) -> proto.Tensor:
    return proto.Tensor("int8", tuple(x.shape), bytes(codec.quantize(x)))


def raw_frame(scales: list[float], values: np.ndarray) -> bytes:
    return np.asarray(scales, "<f4").tobytes() + np.asarray(values, "i1").tobytes()


def emb_frames(frame: bytes, shape: list[int]) -> list[Any]:
    header = {"v": 1, "k": "EMB", "seq": 0, "expert_id": 0, "phase": "train",
              "t": [["int8", shape]]}  # fmt: skip
    return [msgpack.packb(header), frame]


def verdict(decoder: Any, frames: list[Any], **kw: Any) -> tuple[str, Any]:
    try:
        return "ok", decoder(frames, **kw)
    except ProtocolError as exc:
        return "rejected", exc.reason


# ---- the size rule: one function ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (3, 8), (64, 64), (5,), ()])
def test_frame_size_is_scales_then_one_byte_per_value(shape: tuple[int, ...]) -> None:
    rows, width = codec.rows_of(shape)
    want = 4 * rows + rows * width
    assert proto.frame_nbytes("int8", shape) == want
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert len(codec.quantize(x)) == want == int8_tensor(x).nbytes


def test_plain_dtypes_keep_their_size_rule() -> None:
    assert proto.frame_nbytes("float32", (3, 8)) == 96
    assert proto.frame_nbytes("float16", (3, 8)) == proto.frame_nbytes("bfloat16", (3, 8)) == 48
    assert proto.frame_nbytes("int64", (5,)) == 40


def test_int8_is_about_a_quarter_of_float32() -> None:
    b, d = 64, 64
    assert proto.frame_nbytes("float32", (b, d)) / proto.frame_nbytes("int8", (b, d)) >= 3.7


# ---- round trip ---------------------------------------------------------------------------


@FAST
@given(
    st.integers(0, 6),
    st.integers(1, 40),
    st.floats(1e-6, 1e4),
    st.integers(0, 2**32 - 1),
)
def test_round_trip_is_within_half_a_step_per_value(b: int, d: int, size: float, seed: int) -> None:
    x = (np.random.default_rng(seed).standard_normal((b, d)) * size).astype(np.float32)
    t = int8_tensor(x)
    scales, values = codec.split(t.buffer, t.shape)
    assert np.all(scales >= 0) and np.all(np.abs(values.astype(int)) <= 127)
    np.testing.assert_allclose(scales, np.abs(x).max(axis=1) / 127 if b else [], rtol=1e-6)
    back = t.numpy()
    assert back.dtype == np.float32 and back.shape == (b, d)
    slack = scales[:, None] * (0.5 + 1e-4) + 1e-30  # float32 rounding of the division
    assert np.all(np.abs(back - x) <= slack)
    # the decoders accept it, and agree
    frames = emb_frames(bytes(t.buffer), [b, d])
    assert verdict(fast.decode, frames) == verdict(wire.decode, frames)
    assert fast.decode(frames).tensor.numpy().tobytes() == back.tobytes()


def test_a_row_of_zeros_has_scale_zero_and_comes_back_zero() -> None:
    x = np.zeros((3, 5), np.float32)
    x[1] = [1, -2, 3, -4, 127]
    t = int8_tensor(x)
    scales, values = codec.split(t.buffer, t.shape)
    assert scales[0] == scales[2] == 0.0 and scales[1] == 1.0
    assert values[1].tolist() == [1, -2, 3, -4, 127]
    assert np.array_equal(t.numpy(), x)
    assert proto.value_problem((t,), 127.0) is None


def test_non_finite_input_gives_a_non_finite_scale_the_checks_refuse() -> None:
    x = np.ones((2, 4), np.float32)
    x[1, 2] = np.nan
    t = int8_tensor(x)
    assert not proto.is_finite(t)
    assert proto.value_problem((t,), 1e6)[0] == "non_finite"
    assert verdict(wire.decode, emb_frames(bytes(t.buffer), [2, 4]))[1] == "non_finite"


def test_torch_round_trip_through_tensors() -> None:
    torch = pytest.importorskip("torch")
    from traci_ml.core.tensors import copy_into, from_wire, to_wire

    x = torch.randn(16, 8) * 3
    t = to_wire(x, "int8")
    assert t.dtype == "int8" and t.shape == (16, 8) and t.nbytes == 16 * 4 + 16 * 8
    back = from_wire(t, torch.device("cpu"))
    assert back.dtype == torch.float32
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((back - x).abs() <= scale * 0.5001).all())
    dest = torch.empty(2, 16, 8)
    copy_into(dest[1], t)
    assert torch.equal(dest[1], back)


# ---- what a hostile peer may not send -----------------------------------------------------


@pytest.mark.parametrize(
    "scale,reason",
    [
        (float("nan"), "non_finite"),
        (float("inf"), "non_finite"),
        (float("-inf"), "non_finite"),
        (-0.5, "bad_scale"),
    ],  # fmt: skip
)
def test_decode_refuses_bad_scales_with_their_reason(scale: float, reason: str) -> None:
    frames = emb_frames(raw_frame([0.5, scale], np.ones(6)), [2, 3])
    assert verdict(wire.decode, frames) == ("rejected", reason)
    assert verdict(fast.decode, frames) == ("rejected", reason)
    assert fast.quick(frames) is None


def test_negative_scale_is_refused_even_without_the_finite_check() -> None:
    frames = emb_frames(raw_frame([-1.0], np.ones(3)), [1, 3])
    assert verdict(fast.decode, frames, check_finite=False) == ("rejected", "bad_scale")
    nan = emb_frames(raw_frame([float("nan")], np.ones(3)), [1, 3])
    msg = fast.decode(nan, check_finite=False)  # the service's value check decides
    assert proto.value_problem((msg.tensor,), 1e6)[0] == "non_finite"


@pytest.mark.parametrize("size", [0, 6, 7, 9, 13, 14, 24, 100])
def test_decode_refuses_wrong_frame_sizes(size: int) -> None:
    frames = emb_frames(bytes(size), [2, 3])  # 2 scales + 6 values = 14 bytes
    want = "ok" if size == 14 else "rejected"
    got = verdict(wire.decode, frames)
    assert got[0] == want and (size == 14 or got[1] == "size_mismatch")
    assert verdict(fast.decode, frames)[0] == want


def test_value_bound_holds_for_the_dequantized_values() -> None:
    ok = proto.Tensor("int8", (1, 2), raw_frame([1.0], [127, -127]))  # values +-127
    assert proto.value_problem((ok,), 127.0) is None
    reason, detail = proto.value_problem((ok,), 100.0)
    assert reason == "too_large" and "bound" in detail
    # a scale beyond max_abs / 127 is refused even if its values are small
    small = proto.Tensor("int8", (1, 2), raw_frame([1.0], [1, 0]))
    assert proto.value_problem((small,), 100.0)[0] == "too_large"
    # -128 (never sent by us) reads as 128 * scale: held to the bound too
    edge = proto.Tensor("int8", (1, 2), raw_frame([1.0], [-128, 0]))
    assert proto.value_problem((edge,), 127.5)[0] == "too_large"
    assert proto.value_problem((edge,), 128.0) is None
    assert np.abs(edge.numpy()).max() == 128.0


def test_hello_may_name_int8_and_batches_carry_it() -> None:
    hello = proto.Hello(role="expert", run_id="r", embed_dim=4, dtype="int8", expert_id=0)
    assert proto.decode(proto.encode(hello)) == hello
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    batch = proto.Batch(5, "train", (True, False, True), (int8_tensor(x), int8_tensor(-x)))
    frames = [bytes(f) for f in proto.encode(batch)]
    assert proto.decode(frames) == wire.decode(frames)
    grad = proto.Grad(5, -1, (int8_tensor(x), int8_tensor(x)))
    assert proto.decode([bytes(f) for f in proto.encode(grad)]).tensors[1].numpy().shape == (3, 4)


def test_mixed_int8_and_float32_tensors_are_refused_in_one_batch() -> None:
    x = np.ones((2, 3), np.float32)
    batch = proto.Batch(1, "train", (True, True), (int8_tensor(x), proto.Tensor.from_numpy(x)))
    frames = [bytes(f) for f in proto.encode(batch)]
    assert verdict(proto.decode, frames) == ("rejected", "bad_shape")


def test_torch_wire_round_matches_the_codec_bit_for_bit() -> None:
    torch = pytest.importorskip("torch")
    from traci_ml.core.tensors import from_wire, to_wire, wire_round

    x = torch.randn(257, 33) * torch.logspace(-3, 3, 257)[:, None]
    x[5] = 0.0
    via_wire = from_wire(to_wire(x, "int8"), torch.device("cpu"))
    assert torch.equal(wire_round(x, "int8"), via_wire)
    assert torch.equal(wire_round(x, "float16"), x.half().float())
