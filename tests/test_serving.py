"""Served prediction without processes: the `serve` config section, the served kinds' checks
in `proto.decode`, the expert's column picking and standardisation, the reducer's answer
(eval mode restored, probabilities, de-standardised values) and the client's input checks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from traci_ml import proto
from traci_ml.app.client import ServeError, _as_rows
from traci_ml.app.serving import read_rows
from traci_ml.core.config import ReducerConfig, load_config
from traci_ml.core.errors import ConfigError, ProtocolError
from traci_ml.core.models.reducer import Reducer
from traci_ml.services.expert.serving import QueryView
from traci_ml.services.reducer.serving import ServeSpec, answer


def config(**sets: str):
    return load_config(overrides=sets, env={})


def test_serve_section_defaults_and_validation() -> None:
    cfg = config()
    assert cfg.network.serve_port == 5557 and cfg.serve.max_wait_ms == 2.0
    assert config(**{"network.serve_port": "0"}).network.serve_port == 0  # off
    for key, value, words in (
        ("network.serve_port", "5555", "serve_port must differ"),
        ("serve.max_batch_rows", "0", "serve.max_batch_rows"),
        ("serve.max_wait_ms", "-1", "serve.max_wait_ms"),
        ("serve.timeout", "0", "serve.timeout"),
        ("serve.max_wait", "3", "unknown config key 'serve.max_wait'"),
    ):
        with pytest.raises(ConfigError, match=words):
            config(**{key: value})
    env = {"TRACI_SERVE__MAX_WAIT_MS": "7.5"}
    assert load_config(env=env).serve.max_wait_ms == 7.5


def frames(header: dict, *tensors: bytes) -> list[bytes]:
    return [msgpack.packb({"v": 1, **header}), *tensors]


ROWS = np.ones((2, 2), np.float32).tobytes()


@pytest.mark.parametrize(
    ("header", "tensors", "reason"),
    [
        ({"k": "QUERY", "qid": 1, "columns": ["a", "a"], "t": [["float32", [2, 2]]]}, [ROWS],
         "bad_field"),
        ({"k": "QUERY", "qid": 1, "columns": ["a", 3], "t": [["float32", [2, 2]]]}, [ROWS],
         "bad_field"),
        ({"k": "QUERY", "qid": 1, "columns": ["a", "b", "c"], "t": [["float32", [2, 2]]]}, [ROWS],
         "bad_shape"),
        ({"k": "QUERY", "qid": 1, "columns": ["a", "b"], "t": [["float16", [2, 4]]]}, [ROWS],
         "dtype"),
        ({"k": "QUERY", "qid": -1, "columns": ["a", "b"], "t": [["float32", [2, 2]]]}, [ROWS],
         "bad_field"),
        ({"k": "QUERY", "qid": 1, "columns": ["a", "b"]}, [], "frame_count"),
        ({"k": "QEMB", "qid": 1, "expert_id": 0, "status": "ok", "detail": ""}, [],
         "frame_count"),
        ({"k": "QOUT", "qid": 1, "status": "conflict", "detail": "", "task": "", "classes": [],
          "t": [["float32", [2, 2]]]}, [ROWS], "frame_count"),
        ({"k": "QBATCH", "qid": 1, "present": [1, 0], "t": [["float32", [2, 2]]]}, [ROWS],
         "bad_field"),
        ({"k": "REPLY", "qid": 1, "status": "x", "detail": "", "task": "", "classes": [],
          "experts": [0], "expert_names": [], "batch_rows": 0}, [], "bad_field"),
    ],
)  # fmt: skip
def test_served_kinds_are_checked_like_the_others(header, tensors, reason) -> None:
    with pytest.raises(ProtocolError) as exc:
        proto.decode(frames(header, *tensors))
    assert exc.value.reason == reason


def test_query_view_picks_by_name_and_standardises_as_training() -> None:
    view = QueryView(("b", "d"), np.array([1.0, 10.0]), np.array([2.0, 5.0]))
    rows = np.array([[0, 3, 0, 20], [0, 5, 0, 0]], np.float32)
    pick = view.pick(("a", "b", "c", "d"))
    assert np.array_equal(view.inputs(rows, pick), [[1.0, 2.0], [2.0, -2.0]])
    assert view.pick(("a", "b")) == ["d"]  # what is missing


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_reducer_answer_is_eval_mode_without_grad_and_restores_train_mode(task: str) -> None:
    torch.manual_seed(0)
    cfg = ReducerConfig(layers=1, heads=2, ff=16, dropout=0.5)
    out_dim = 3 if task == "classification" else 1
    model = Reducer(n_experts=3, d=8, out_dim=out_dim, cfg=cfg).train()
    classes = ("a", "b", "c") if task == "classification" else ()
    spec = ServeSpec(3, 8, "float32", task, classes, y_mean=10.0, y_std=2.0)
    tokens = [torch.randn(5, 8) for _ in range(2)]
    msg = proto.QBatch(
        4, (True, False, True), tuple(proto.Tensor.from_numpy(t.numpy()) for t in tokens)
    )
    out = answer(model, msg, spec, torch.device("cpu"))
    assert model.training  # restored
    assert out.status == proto.SERVE_OK and out.classes == classes and out.qid == 4
    model.eval()
    absent = torch.tensor([[False, True, False]]).expand(5, 3)
    with torch.no_grad():
        logits, _ = model(torch.stack([tokens[0], torch.zeros(5, 8), tokens[1]], 1), absent)
    want = logits.softmax(-1) if task == "classification" else logits * 2.0 + 10.0
    np.testing.assert_allclose(out.tensors[0].numpy(), want.numpy(), atol=1e-6)
    bad = proto.QBatch(4, (True, True), tuple(proto.Tensor.from_numpy(t.numpy()) for t in tokens))
    assert answer(model, bad, spec, torch.device("cpu")).status == "conflict"


def test_client_input_checks() -> None:
    x, names = _as_rows({"a": [1, 2], "b": [3, 4]}, None)
    assert names == ("a", "b") and x.tolist() == [[1, 3], [2, 4]] and x.dtype == np.float32
    x, names = _as_rows([1.0, 2.0], ["a", "b"])  # one row
    assert x.shape == (1, 2)
    cols = {f"c{j}": np.arange(3.0) * j for j in range(256)}  # many 1-D columns: one copy
    x, _ = _as_rows(cols, None)
    assert x.flags.c_contiguous and x.tolist() == np.column_stack(list(cols.values())).tolist()
    x, _ = _as_rows({"a": [[1], [2]], "b": [3, 4]}, None)  # an (R, 1) column as before
    assert x.tolist() == [[1, 3], [2, 4]]
    with pytest.raises(ServeError, match="bad_request|not numeric"):
        _as_rows({"a": [1, 2], "b": [3, 4, 5]}, None)  # columns of different lengths
    for rows, columns in (([[1, 2]], ["a"]), ([[1, 2]], None), ([["x", 2]], ["a", "b"])):
        with pytest.raises(ServeError) as exc:
            _as_rows(rows, columns)
        assert exc.value.status == "bad_request"


def test_request_reads_the_numeric_columns_of_a_csv(tmp_path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,label,b\n1,cat,2\n3,dog,4\n")
    x, columns = read_rows(str(path), None)
    assert columns == ["a", "b"] and x.tolist() == [[1, 2], [3, 4]]
    x, columns = read_rows(str(path), ["b"])
    assert x.tolist() == [[2], [4]]
