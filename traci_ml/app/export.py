"""``traci export``: a trained run's whole model (every expert's target net, the reducer and
the preprocessing) in one TorchScript or ONNX file.

The file takes ``features``: (batch, F) float32 raw feature rows, columns in the training
order (``preprocess.columns``, also stored in the file's metadata), and returns
``(logits, probabilities)`` for classification or ``(logits, prediction)`` for regression
(``prediction`` in the label's units). Before a file is written it is loaded back and checked
against the eager model on probe rows, so a model that traced wrongly is never handed out.
See docs/predict.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import traci_ml
import traci_ml.services
from traci_ml.app.predict import Predictor, load_predictor
from traci_ml.app.steps import Steps
from traci_ml.core.errors import ExportError, TraciError  # noqa: F401 (API)
from traci_ml.core.files import replacing

log = logging.getLogger(__name__)
FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
META_FILE = "traci.json"  # TorchScript extra file / ONNX metadata key
RTOL, ATOL = 1e-4, 1e-5  # the exported file against the eager model


def metadata(predictor: Predictor) -> dict:
    prep = predictor.preprocess
    second = "probabilities" if prep.task == "classification" else "prediction"
    return {
        "run_id": predictor.config.run_id,
        "task": prep.task,
        "inputs": {"features": ["batch", len(prep.columns)]},
        "outputs": {"logits": ["batch", prep.out_dim], second: ["batch", prep.out_dim]}
        if second == "probabilities"
        else {"logits": ["batch", 1], second: ["batch"]},
        "columns": list(prep.columns),
        "classes": list(prep.classes),
        "views": [{"name": n, "columns": list(c)} for n, c in prep.views],
    }


def output_names(predictor: Predictor) -> list[str]:
    return list(metadata(predictor)["outputs"])


def probe_rows(predictor: Predictor, n: int, seed: int = 0) -> torch.Tensor:
    """Plausible raw rows: the training mean plus Gaussian noise of the training spread."""
    prep = predictor.preprocess
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(prep.columns))).astype(np.float32)
    return torch.from_numpy(prep.mean + z * prep.std)


def export(
    run_dir: str | Path, fmt: str, output: str | Path | None = None, *,
    checkpoint: str | None = None, steps: Steps | None = None,
) -> Path:  # fmt: skip
    """Write the run's model as ``fmt`` (torchscript | onnx); returns the file's path.
    ``checkpoint``: "best", "last" or None (the best where the run has it). ``steps``: says
    each step as it begins (``traci export``: an ONNX export is tens of seconds)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    steps = steps or Steps.quiet()
    with steps.step(f"loading {run_dir}"):
        predictor = load_predictor(run_dir, checkpoint=checkpoint)
    path = Path(output) if output else Path(run_dir) / FORMATS[fmt]
    with replacing(path) as tmp, _guard(predictor, fmt):
        (export_torchscript if fmt == "torchscript" else export_onnx)(predictor, tmp, steps)
    return path


# Code whose TracerWarnings are known (TRACI's package and services) or not the user's (torch).
OURS = tuple(
    str(Path(m.__file__).resolve().parent) + "/" for m in (traci_ml, traci_ml.services, torch)
)


@contextlib.contextmanager
def _guard(predictor: Predictor, fmt: str) -> Iterator[None]:
    """Turn a tracing/export failure into an error that says whose code could not be traced.

    The exporters' warnings are swallowed, except a ``TracerWarning`` raised from code outside
    TRACI and torch (a user's expert module): it means the trace may hold one branch of a
    data-dependent ``if``, so the export is refused. TRACI's own (fixed-shape tuple unpacking,
    a size turned into a float) are benign, and every export is checked against the model."""
    config = predictor.config
    modules = {  # the user-supplied expert modules, by the config key that names them
        config.expert_model(i).module: config.expert_model_key(i)
        for i in range(predictor.n_views)
        if config.expert_model(i).module
    }
    module = next(iter(modules), None)
    key = modules.get(module, "expert.model") if module else "expert.model"
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except Exception as exc:
        failure: Exception | None = exc
    else:
        failure = None
    suspect = next(
        (
            f"{w.filename}:{w.lineno}: {str(w.message).split('.')[0]}"
            for w in caught
            if issubclass(w.category, torch.jit.TracerWarning)
            and not str(Path(w.filename).resolve()).startswith(OURS)
        ),
        None,
    )
    if failure is None and suspect is None:
        return
    if isinstance(failure, ExportError):
        what = str(failure)
    elif failure is not None:
        while failure.__cause__ is not None:  # the exporters wrap the real reason
            failure = failure.__cause__  # type: ignore[assignment]
        what = f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0]}"
    else:
        what = ""
    if module is None:
        raise ExportError(f"export to {fmt} failed: {what or suspect}") from None
    raise ExportError(f"{_blame(module, key, fmt)}; {suspect or what}") from None


def _blame(module: str, key: str, fmt: str) -> str:
    how = "torch.jit.trace" if fmt == "torchscript" else "torch.export"
    return (
        f"the user-supplied expert module {module} ({key}.module) cannot be exported to "
        f"{fmt}: it must be traceable by {how} (no Python control flow on tensor values, "
        "tensor in, tensor out)"
    )


def _check(predictor: Predictor, run, fmt: str) -> None:  # noqa: ANN001
    """The exported file, loaded back, against the eager model on probe rows of a batch size
    it was not traced with."""
    x = probe_rows(predictor, 7, seed=1)
    with torch.no_grad():
        want = [t.numpy() for t in predictor(x)]
    got = run(x.numpy())
    for name, a, b in zip(output_names(predictor), got, want, strict=True):
        if a.shape != b.shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            diff = float(np.abs(a - b).max()) if a.shape == b.shape else f"shape {a.shape}"
            raise ExportError(
                f"the {fmt} export disagrees with the model on {name!r} (max diff {diff})"
            )


def export_torchscript(predictor: Predictor, path: Path, steps: Steps | None = None) -> None:
    steps = steps or Steps.quiet()
    with steps.step("tracing the model with torch.jit.trace"):
        traced = torch.jit.trace(predictor, probe_rows(predictor, 3), check_trace=False)
    with steps.step("writing the TorchScript file and loading it back"):
        extra = {META_FILE: json.dumps(metadata(predictor))}
        torch.jit.save(traced, str(path), _extra_files=extra)
        loaded = torch.jit.load(str(path))

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in loaded(torch.from_numpy(x))]

    with steps.step("checking it against the model"):
        _check(predictor, run, "torchscript")


def export_onnx(predictor: Predictor, path: Path, steps: Steps | None = None) -> None:
    steps = steps or Steps.quiet()
    try:
        with steps.step("loading the ONNX exporter (onnx, onnxscript)"):
            import onnx
            import onnxscript  # noqa: F401 -- torch.onnx.export(dynamo=True) imports it
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages") from None
    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with (
            steps.step("exporting the model with torch.export and translating it to ONNX "
                       "(the slow part: tens of seconds)"),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # fmt: skip
            program = torch.onnx.export(
                predictor,
                (probe_rows(predictor, 3),),
                dynamo=True,
                input_names=["features"],
                output_names=output_names(predictor),
                dynamic_shapes={"features": {0: torch.export.Dim("batch")}},
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    if program is None:
        raise ExportError("the ONNX exporter returned no program")
    with steps.step("writing the ONNX file"):
        program.save(str(path), external_data=False)
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_FILE, json.dumps(metadata(predictor))
        onnx.save(proto, str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: %s is not checked", path)
        return
    with steps.step("checking it against the model with onnxruntime"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _check(predictor, lambda x: session.run(None, {"features": x}), "onnx")
