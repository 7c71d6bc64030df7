"""The Open Inference Protocol's tensors (app/http_tensors.py): JSON and binary inputs to the
front door's rows or ids, outputs as JSON or binary, and the refusals (HTTP 400)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from traci_ml.app.http_tensors import BadTensor, decode_request, encode_response, read_inputs


def test_json_columns_become_rows_and_ids_stay_ids() -> None:
    a = {"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]}
    b = {"name": "b", "datatype": "INT64", "shape": [2, 1], "data": [[3], [4]]}
    req = {"inputs": [a, b]}
    rows, ids = read_inputs(req, b"")
    assert ids is None and list(rows) == ["a", "b"]
    assert rows["b"].tolist() == [3.0, 4.0]
    by_id = {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]}]}
    assert read_inputs(by_id, b"") == (None, ["x", "y"])


def test_binary_inputs_follow_the_json_header() -> None:
    head = {"inputs": [
        {"name": "a", "datatype": "FP64", "shape": [2], "parameters": {"binary_data_size": 16}},
        {"name": "b", "datatype": "FP32", "shape": [2], "data": [5, 6]},
    ]}  # fmt: skip
    text = json.dumps(head).encode()
    body = text + np.array([1.5, 2.5], "<f8").tobytes()
    request, blobs = decode_request(body, len(text))
    rows, _ = read_inputs(request, blobs)
    assert rows["a"].tolist() == [1.5, 2.5]
    ids = struct.pack("<I", 2) + b"id" + struct.pack("<I", 1) + b"z"
    head = {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [2],
                        "parameters": {"binary_data_size": len(ids)}}]}  # fmt: skip
    text = json.dumps(head).encode()
    assert read_inputs(*decode_request(text + ids, len(text))) == (None, ["id", "z"])


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ([], "non-empty"),
        ([{"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}], "shape"),
        ([{"name": "a", "datatype": "FP32", "shape": [3], "data": [1, 2]}], "values"),
        ([{"name": "a", "datatype": "FP8", "shape": [1], "data": [1]}], "datatype"),
        ([{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["1"]}], "numeric"),
        ([{"name": "a", "datatype": "FP32", "shape": [1], "data": ["x"]}], "FP32"),
        ([{"name": "a", "datatype": "FP32", "shape": [1]}], "no 'data'"),
        ([{"name": "id", "datatype": "FP32", "shape": [1], "data": [1]}], "INT64 or BYTES"),
        ([{"name": "id", "datatype": "INT64", "shape": [1], "data": [1]},
          {"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}], "alone"),
        ([{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},
          {"name": "b", "datatype": "FP32", "shape": [2], "data": [1, 2]}], "different numbers"),
        # hostile but well-formed: a JSON true as a dimension, values FP32 cannot hold (sent
        # on they would be inf), a null, parameters that are not an object
        ([{"name": "a", "datatype": "FP32", "shape": [True], "data": [1]}], "shape"),
        ([{"name": "a", "datatype": "FP32", "shape": [1], "data": [1e300]}], "beyond FP32"),
        ([{"name": "a", "datatype": "FP32", "shape": [1], "data": [10**47]}], "beyond FP32"),
        ([{"name": "a", "datatype": "FP64", "shape": [1], "data": [None]}], "NaN"),
        ([{"name": "a", "datatype": "FP32", "shape": [1], "data": [1], "parameters": [1]}],
         "'parameters' is not a JSON object"),
    ],
)  # fmt: skip
def test_refusals(inputs: list, words: str) -> None:
    with pytest.raises(BadTensor, match=words):
        read_inputs({"inputs": inputs}, b"")


def test_outputs_json_binary_and_unknown() -> None:
    probs = np.array([[0.25, 0.75]], np.float32)
    outputs = {"probabilities": probs, "label": ["b"]}
    body, headers = encode_response("m", {"id": "7"}, outputs, {})
    answer = json.loads(body)
    assert headers["content-type"] == "application/json" and answer["id"] == "7"
    assert answer["outputs"][0] == {"name": "probabilities", "datatype": "FP32",
                                    "shape": [1, 2], "data": [0.25, 0.75]}  # fmt: skip
    asked = {"outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
    body, headers = encode_response("m", asked, outputs, {})
    n = int(headers["inference-header-content-length"])
    assert json.loads(body[:n])["outputs"][0]["parameters"] == {"binary_data_size": 5}
    assert body[n:] == struct.pack("<I", 1) + b"b"
    with pytest.raises(BadTensor, match="unknown output"):
        encode_response("m", {"outputs": [{"name": "logits"}]}, outputs, {})
    for bad in ({"parameters": [1]}, {"outputs": [{"name": "label", "parameters": 5}]}):
        with pytest.raises(BadTensor, match="'parameters' is not a JSON object"):
            encode_response("m", bad, outputs, {})


def _checked(req: dict) -> dict:
    """The same request through the input-by-input path (an empty ``parameters`` on every
    input leaves the one-conversion path)."""
    slow = {"inputs": [{**t, "parameters": {}} for t in req["inputs"]]}
    rows, ids = read_inputs(slow, b"")
    assert ids is None
    return rows


@pytest.mark.parametrize(
    "inputs",
    [
        [{"name": f"x{j}", "datatype": "FP32", "shape": [1], "data": [0.1 * j + 1e-9]}
         for j in range(256)],
        [{"name": c, "datatype": "FP64", "shape": [3, 1], "data": [1, 2.5, -1e300]}
         for c in "abc"],
        [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]},
         {"name": "b", "datatype": "INT64", "shape": [2], "data": [3, 4]}],  # mixed: checked
        [{"name": "a", "datatype": "FP32", "shape": [0], "data": []}],
    ],
)  # fmt: skip
def test_plain_json_columns_read_as_the_checked_path_reads_them(inputs: list) -> None:
    rows, ids = read_inputs({"inputs": inputs}, b"")
    want = _checked({"inputs": inputs})
    assert ids is None and list(rows) == list(want)
    for name in want:
        assert rows[name].dtype == np.float64 and np.array_equal(rows[name], want[name])


@pytest.mark.parametrize(
    ("value", "words"), [(True, "not FP32 values"), ("1.5", "not FP32 values")]
)
def test_a_bool_or_a_string_among_plain_numbers_is_still_refused(value, words: str) -> None:
    inputs = [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0, value]}]
    with pytest.raises(BadTensor, match=words):
        read_inputs({"inputs": inputs}, b"")


@pytest.mark.parametrize(
    ("body", "words"),
    [(b"{", "not JSON"), (b'{"inputs": [{"name": "a", "data": [NaN]}]}', "not JSON"),
     (b'{"inputs": Infinity}', "not JSON"), (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
     (b"\xff\xfe", "not JSON"), (b"[1, 2]", "a JSON object")],
)  # fmt: skip
def test_bodies_that_are_not_strict_json_objects(body: bytes, words: str) -> None:
    """RFC 8259 JSON only (no NaN / Infinity literals), at most 1024 deep, an object."""
    with pytest.raises(BadTensor, match=words):
        decode_request(body, None)


def test_a_header_length_that_is_no_byte_count_is_named() -> None:
    """http_v2 passes -1 for an Inference-Header-Content-Length that is not digits ("abc",
    "-3"): before, int("abc")'s own message was the answer."""
    for length, words in ((-1, "is not a byte count"), (99, "99 is not in the body")):
        with pytest.raises(BadTensor, match=f"Inference-Header-Content-Length {words}"):
            decode_request(b"{}", length)
