"""`traci export`: the whole model (expert target nets, reducer, preprocessing) in one
TorchScript or ONNX file that reproduces `traci predict` on raw feature rows."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_predict import Built, make_run

from traci_ml.app import predict as P
from traci_ml.app.cli import main
from traci_ml.app.export import ExportError, export

pytestmark = pytest.mark.timeout(300)


class Plain(torch.nn.Module):
    """A user-supplied expert module that traces: tensor in, tensor out."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 8) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(in_dim, width), torch.nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class Branchy(Plain):
    """A user-supplied expert module with a branch on tensor values: no trace can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.b(self.a(x))
        return -self.b(self.a(x))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_run(tmp_path_factory.mktemp("export") / "run")


def rows_and_expected(built: Built) -> tuple[np.ndarray, list[np.ndarray]]:
    predictor = P.load_predictor(built.path)
    x, _ = P.split_rows(built.config, predictor.preprocess, "test")
    out = P.predict_array(predictor, x)
    probs = np.stack([out[f"prob_{c}"] for c in predictor.preprocess.classes], axis=1)
    return x, [built.logits().numpy(), probs]


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"traci.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.13
        module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra["traci.json"])


def test_torchscript_round_trip(digits: Built, tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.pt"
    args = ["export", "--run", str(digits.path), "--format", "torchscript", "--output", str(path)]
    assert main(args) == 0
    assert f"wrote {path}" in capsys.readouterr().err
    module, meta = load_torchscript(path)
    x, (want_logits, want_probs) = rows_and_expected(digits)
    with torch.no_grad():
        logits, probs = module(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.numpy(), want_probs, rtol=1e-5, atol=1e-7)
    assert meta["columns"] == [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    assert meta["outputs"] == {"logits": ["batch", 10], "probabilities": ["batch", 10]}
    assert meta["classes"] == [str(k) for k in range(10)] and meta["run_id"] == "predict-test"


def test_export_says_each_step_as_it_begins(digits: Built, tmp_path: Path, capsys) -> None:
    """Not a terminal: one line per step on stderr, then where the time went."""
    path = tmp_path / "m.onnx"
    args = ["export", "--run", str(digits.path), "--format", "onnx", "--output", str(path)]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("traci export: ")]
    assert steps == [
        "traci export: loading torch",
        f"traci export: loading {digits.path}",
        "traci export: loading the ONNX exporter (onnx, onnxscript)",
        "traci export: exporting the model with torch.export and translating it to ONNX "
        "(the slow part: tens of seconds)",
        "traci export: writing the ONNX file",
        "traci export: checking it against the model with onnxruntime",
    ]
    assert re.fullmatch(
        rf"wrote {re.escape(str(path))} \([\d,]+ bytes\) in [\d.]+s: loading torch [\d.]+s, "
        r".*exporting the model with torch.export and translating it to ONNX [\d.]+s, .*",
        err[-1],
    )


def test_onnx_round_trip(digits: Built) -> None:
    path = export(digits.path, "onnx")
    assert path == digits.path / "model.onnx"
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["features"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    meta = json.loads({p.key: p.value for p in model.metadata_props}["traci.json"])
    assert meta["inputs"] == {"features": ["batch", 64]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, (want_logits, want_probs) = rows_and_expected(digits)
    logits, probs = session.run(None, {"features": x})
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    one = session.run(None, {"features": x[:1]})[1]  # any batch size
    np.testing.assert_allclose(one, want_probs[:1], rtol=1e-5, atol=1e-6)


def test_regression_exports_the_prediction_in_label_units(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(0, 2, (100, 3)).round(3)
    data = tmp_path / "d.csv"
    lines = ["u,v,w,y"] + [f"{a},{b},{c},{10 + a - 3 * c}" for a, b, c in x]
    data.write_text("\n".join(lines) + "\n")
    views = "[{name: one, columns: [u]}, {name: two, columns: [v, w]}]"
    built = make_run(
        tmp_path / "run", **{"data.source": "csv", "data.path": str(data), "data.label": "y",
                             "data.task": "regression", "data.views": views},
    )  # fmt: skip
    predictor = P.load_predictor(built.path)
    rows, _ = P.split_rows(built.config, predictor.preprocess, "test")
    want = P.predict_array(predictor, rows)["prediction"]
    module, meta = load_torchscript(export(built.path, "torchscript"))
    assert meta["outputs"] == {"logits": ["batch", 1], "prediction": ["batch"]}
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(rows))[1].numpy(), want, rtol=1e-5)
    session = ort.InferenceSession(str(export(built.path, "onnx")))
    np.testing.assert_allclose(session.run(None, {"features": rows})[1], want, rtol=1e-5)


def test_a_traceable_user_module_exports(tmp_path: Path) -> None:
    built = make_run(tmp_path / "run", **{"expert.model.module": "test_export:Plain"})
    module, _ = load_torchscript(export(built.path, "torchscript"))
    x, (want_logits, _) = rows_and_expected(built)
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.from_numpy(x))[0].numpy(), want_logits, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_untraceable_user_module_is_named(tmp_path: Path, fmt: str, capsys) -> None:
    built = make_run(tmp_path / "run", **{"expert.model.module": "test_export:Branchy"})
    with pytest.raises(ExportError) as info:
        export(built.path, fmt)
    msg = str(info.value)
    assert "user-supplied expert module test_export:Branchy (expert.model.module)" in msg
    assert f"cannot be exported to {fmt}" in msg and "control flow on tensor values" in msg
    assert not (built.path / f"model.{'torchscript.pt' if fmt == 'torchscript' else fmt}").exists()
    code = main(["export", "--run", str(built.path), "--format", fmt])
    assert code == 2 and "test_export:Branchy" in capsys.readouterr().err


def test_export_of_a_run_without_checkpoints_fails_cleanly(tmp_path: Path, capsys) -> None:
    assert main(["export", "--run", str(tmp_path), "--format", "onnx"]) == 2
    assert "holds no config.json or launch.yaml" in capsys.readouterr().err
