"""`traci predict` and traci_ml.predict on small run directories built in-process through the
services' own code paths (Expert.save, ReducerService.save, the reducer's config/preprocess
files), with target weights moved away from the online ones so "uses the target" is tested."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from traci_ml import predict as P
from traci_ml.cli import main
from traci_ml.config import Config, load_config
from traci_ml.data import load_dataset
from traci_ml.errors import CheckpointError, DataError
from traci_ml.services.expert.model import polyak_update
from traci_ml.services.expert.worker import Expert
from traci_ml.services.reducer.records import write_json_atomic
from traci_ml.services.reducer.worker import ReducerService

pytestmark = pytest.mark.timeout(120)
SMALL = {
    "run_id": "predict-test", "embed_dim": "16", "expert.model.hidden": "[32]",
    "reducer.layers": "1", "reducer.heads": "2", "reducer.ff": "32", "expert.device": "cpu",
    "reducer.device": "cpu", "metrics.broker_port": "0", "metrics.reducer_port": "0",
    "metrics.expert_base_port": "0",
}  # fmt: skip


class Built:
    """A run directory and the live nets its checkpoints were written from."""

    def __init__(self, config: Config, experts: list[Expert], reducer: ReducerService) -> None:
        self.config, self.path = config, config.run_path
        self.targets = [e.target for e in experts]
        self.onlines = [e.online for e in experts]
        self.reducer = reducer.model.eval()

    @torch.no_grad()
    def logits(self, split: str = "test", *, online: bool = False) -> torch.Tensor:
        """What the cluster's evaluation computes on the run's own split."""
        ds = load_dataset(self.config)
        nets = self.onlines if online else self.targets
        tokens = torch.stack(
            [net.eval()(torch.from_numpy(ds.view(i, split))) for i, net in enumerate(nets)]
        )  # (N, B, d), as the reducer assembles a BATCH
        if self.config.expert.dtype != "float32":
            tokens = tokens.to(getattr(torch, self.config.expert.dtype)).float()
        absent = torch.zeros(tokens.shape[1], tokens.shape[0], dtype=torch.bool)
        return self.reducer(tokens.transpose(0, 1), absent)[0]


def make_run(run_dir: Path, *, preprocess: bool = True, **extra: str) -> Built:
    config = load_config(overrides={**SMALL, "run_dir": str(run_dir), **extra}, env={})
    ctx = zmq.Context()
    gen = torch.Generator().manual_seed(7)
    try:
        experts = []
        for i in range(len(load_dataset(config).views)):
            expert = Expert(config, i, context=ctx)
            with torch.no_grad():  # as if trained: online moved, target halfway behind
                for p in expert.online.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            polyak_update(expert.target, expert.online, 0.5)
            expert.save()
            experts.append(expert)
        reducer = ReducerService(config, context=ctx)
        with torch.no_grad():
            for p in reducer.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        reducer.save()
        reducer.records.close()
    finally:
        ctx.term()
    write_json_atomic(config.run_path / "config.json", config.to_dict())  # as ReducerService.run
    if preprocess:
        P.write_preprocess(config, config.run_path)
    return Built(config, experts, reducer)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_run(tmp_path_factory.mktemp("digits") / "run")


def write_csv(path: Path, columns: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def read_out(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def probs(rows: list[dict[str, str]], classes: tuple[str, ...]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])


# -- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_derived_standardisation_is_exactly_trainings(source: str) -> None:
    extra = {"data.source": "synthetic", "data.views": "even", "data.synthetic.rows": "300"}
    config = load_config(overrides=extra if source == "synthetic" else {}, env={})
    prep, ds = P.derive_preprocess(config), load_dataset(config)
    for split, want in (("test", ds.x_test), ("train", ds.x_train)):
        x, labels = P.split_rows(config, prep, split)
        np.testing.assert_array_equal((x - prep.mean) / prep.std, want)  # bit for bit
        assert labels == [ds.classes[k] for k in (ds.y_test if split == "test" else ds.y_train)]
    assert prep.columns == ds.columns and [n for n, _ in prep.views] == [v.name for v in ds.views]


def test_preprocess_json_round_trips_exactly(digits: Built) -> None:
    saved = P.load_preprocess(digits.path, digits.config)
    fresh = P.derive_preprocess(digits.config)
    np.testing.assert_array_equal(saved.mean, fresh.mean)
    np.testing.assert_array_equal(saved.std, fresh.std)
    assert saved.mean.dtype == np.float32 and saved.columns == fresh.columns


# -- the model ----------------------------------------------------------------------------


def test_split_test_is_the_clusters_eval_computation_with_target_nets(digits: Built) -> None:
    predictor = P.load_predictor(digits.path)
    x, _ = P.split_rows(digits.config, predictor.preprocess, "test")
    with torch.no_grad():
        logits, probabilities = predictor(torch.from_numpy(x))
    want = digits.logits("test")
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probabilities, want.softmax(-1), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(logits, digits.logits("test", online=True), atol=1e-3)


def test_load_model_takes_the_views(digits: Built) -> None:
    model = P.load_model(digits.path)
    ds = load_dataset(digits.config)
    views = [torch.from_numpy(ds.view(i, "test")) for i in range(ds.n_experts)]
    with torch.no_grad():
        torch.testing.assert_close(model(*views), digits.logits(), rtol=1e-5, atol=1e-5)


def test_predict_frame_takes_a_mapping_of_columns(digits: Built) -> None:
    prep = P.load_preprocess(digits.path, digits.config)
    x, _ = P.split_rows(digits.config, prep, "test")
    frame = {"id": list(range(5)), **{c: x[:5, j].tolist() for j, c in enumerate(prep.columns)}}
    out = P.predict_frame(digits.path, frame)
    want = digits.logits()[:5]
    assert out["prediction"] == [prep.classes[k] for k in want.argmax(-1)]
    np.testing.assert_allclose(out["prob_3"], want.softmax(-1)[:, 3].numpy(), rtol=1e-6, atol=1e-7)


def test_float16_wire_rounding_is_reproduced(tmp_path: Path) -> None:
    built = make_run(tmp_path / "run", **{"expert.dtype": "float16"})
    predictor = P.load_predictor(built.path)
    x, _ = P.split_rows(built.config, predictor.preprocess, "test")
    with torch.no_grad():
        torch.testing.assert_close(predictor(torch.from_numpy(x))[0], built.logits())


# -- the command --------------------------------------------------------------------------


def test_cli_split_test_writes_classes_and_probabilities(digits: Built, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--run", str(digits.path), "--split", "test", "--output", str(out)]) == 0
    )
    rows = read_out(out)
    classes = tuple(str(k) for k in range(10))
    assert list(rows[0]) == ["row", "label", "prediction", *(f"prob_{c}" for c in classes)]
    want = digits.logits()
    np.testing.assert_allclose(
        probs(rows, classes), want.softmax(-1).numpy(), rtol=1e-6, atol=1e-7
    )  # float32 rounding: the reference batches its rows differently
    assert [r["prediction"] for r in rows] == [str(int(k)) for k in want.argmax(-1)]
    hits = sum(r["prediction"] == r["label"] for r in rows)
    assert f"test accuracy {hits / len(rows):.4f} ({hits}/359)" in capsys.readouterr().err


def test_cli_input_csv_in_any_column_order_to_stdout(digits: Built, tmp_path, capsys):
    prep = P.load_preprocess(digits.path, digits.config)
    x, labels = P.split_rows(digits.config, prep, "test")
    columns = ["note", *reversed(prep.columns), "label"]  # extra columns are ignored
    body = [["r", *reversed(row.tolist()), lab] for row, lab in zip(x[:20], labels, strict=False)]
    path = write_csv(tmp_path / "rows.csv", columns, body)
    assert main(["predict", "--run", str(digits.path), "--input", str(path)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["row"] for r in rows] == [str(k) for k in range(20)]
    assert [r["label"] for r in rows] == labels[:20]
    want = digits.logits()[:20].softmax(-1).numpy()
    np.testing.assert_allclose(probs(rows, prep.classes), want, rtol=1e-6, atol=1e-7)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_missing_columns_are_listed(digits: Built, tmp_path, capsys) -> None:
    columns = [
        f"pixel_{r}_{c}" for r in range(8) for c in range(8) if (r, c) not in {(0, 1), (7, 7)}
    ]
    path = write_csv(tmp_path / "rows.csv", columns, [[0] * len(columns)])
    code, err = run_cli(["predict", "--run", str(digits.path), "--input", str(path)], capsys)
    assert code == 2
    assert "lacks 2 feature column(s): pixel_0_1, pixel_7_7" in err


@pytest.mark.parametrize("bad", ["abc", "nan", "", "1e999"])
def test_a_bad_value_names_line_row_and_column(digits: Built, tmp_path, capsys, bad) -> None:
    prep = P.load_preprocess(digits.path, digits.config)
    rows = [[1.0] * 64, [2.0] * 64]
    rows[1][9] = bad  # type: ignore[call-overload]
    path = write_csv(tmp_path / "rows.csv", list(prep.columns), rows)
    code, err = run_cli(["predict", "--run", str(digits.path), "--input", str(path)], capsys)
    assert code == 2
    assert f"rows.csv line 3 (row 1): column {prep.columns[9]!r} value {bad!r}" in err


def test_a_short_line_is_named(digits: Built, tmp_path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b,c\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match=r"line 3: 2 fields, the header has 3"):
        P.read_csv(path, ("a", "b"))


def test_no_run_no_checkpoints(tmp_path: Path, digits: Built, capsys) -> None:
    code, err = run_cli(["predict", "--run", str(tmp_path / "nope"), "--split", "test"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    write_json_atomic(tmp_path / "empty" / "config.json", digits.config.to_dict())
    code, err = run_cli(["predict", "--run", str(tmp_path / "empty"), "--split", "test"], capsys)
    assert code == 2 and "has no checkpoints: train it first" in err


def copy_run(built: Built, dest: Path) -> Path:
    import shutil

    shutil.copytree(built.path, dest)
    return dest


def test_checkpoint_of_another_format_or_run_or_shape(digits: Built, tmp_path: Path) -> None:
    run = copy_run(digits, tmp_path / "fmt")
    state = torch.load(run / "checkpoints" / "expert-2.pt", weights_only=False)
    torch.save({**state, "format": 99}, run / "checkpoints" / "expert-2.pt")
    with pytest.raises(CheckpointError, match=r"expert-2.pt has an unknown format"):
        P.load_predictor(run)

    run = copy_run(digits, tmp_path / "other")
    state = torch.load(run / "checkpoints" / "reducer.pt", weights_only=False)
    torch.save({**state, "run_id": "someone-else"}, run / "checkpoints" / "reducer.pt")
    with pytest.raises(CheckpointError, match=r"run_id='someone-else', not 'predict-test'"):
        P.load_predictor(run)

    run = copy_run(digits, tmp_path / "shape")  # config says hidden [48], weights are [32]
    cfg = json.loads((run / "config.json").read_text())
    cfg["expert"]["model"]["hidden"] = [48]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"expert-0.pt does not fit the run's config"):
        P.load_predictor(run)

    run = copy_run(digits, tmp_path / "lack")
    (run / "checkpoints" / "expert-3.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks expert-3.pt"):
        P.load_predictor(run)


def test_without_preprocess_json_it_is_derived(tmp_path: Path, digits: Built) -> None:
    built = make_run(tmp_path / "run", preprocess=False)
    assert not (built.path / P.PREPROCESS_FILE).exists()
    predictor = P.load_predictor(built.path)
    np.testing.assert_array_equal(predictor.preprocess.mean, P.derive_preprocess(built.config).mean)


# -- a csv regression run ------------------------------------------------------------------


def test_csv_regression_is_destandardised_and_survives_the_data_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, (80, 4)).round(3)
    y = x @ [1.0, -2.0, 0.5, 3.0] + 40.0
    data = write_csv(tmp_path / "data.csv", ["a", "b", "price", "c", "d"],
                     [[*r[:2], v, *r[2:]] for r, v in zip(x, y, strict=True)])  # fmt: skip
    views = "[{name: left, columns: [a, b]}, {name: right, columns: [d, c]}]"
    built = make_run(
        tmp_path / "run", **{"data.source": "csv", "data.path": str(data), "data.label": "price",
                             "data.task": "regression", "data.views": views},
    )  # fmt: skip
    ds = load_dataset(built.config)
    predictor = P.load_predictor(built.path)
    assert predictor.preprocess.columns == ("a", "b", "c", "d")
    rows, _ = P.split_rows(built.config, predictor.preprocess, "test")
    out = P.predict_array(predictor, rows)
    want = built.logits()[:, 0] * ds.y_std + ds.y_mean
    np.testing.assert_allclose(out["prediction"], want.numpy(), rtol=1e-5)

    data.unlink()  # the statistics live in the run directory: --input still works
    frame = {c: rows[:, j] for j, c in enumerate(predictor.preprocess.columns)}
    np.testing.assert_array_equal(
        P.predict_frame(built.path, frame)["prediction"], out["prediction"]
    )
    with pytest.raises(DataError, match=r"--split needs the training file .*data.csv"):
        P.split_rows(built.config, predictor.preprocess, "test")
    write_csv(data, ["a", "b", "price", "c", "d"], [[1, 2, 3, 4, 5]] * 10)
    with pytest.raises(DataError, match=r"data.csv changed since training"):
        P.split_rows(built.config, predictor.preprocess, "test")


# -- the reducer's final-eval dump ----------------------------------------------------------


def test_eval_predictions_file_lists_each_row_with_masked_experts(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from traci_ml.services.reducer.records import EvalRound, write_eval_predictions

    rnd = EvalRound("classification", 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]])
    absent = torch.tensor([[False, False, False], [False, True, False], [True, False, True]])
    rnd.add(
        logits[:2], torch.tensor([0, 0]), torch.ones(2, 3), absent[:2], rows=torch.tensor([0, 1])
    )
    rnd.add(logits[2:], torch.tensor([1]), torch.ones(1, 3), absent[2:], rows=torch.tensor([2]))
    ds = SimpleNamespace(task="classification", classes=("no", "yes"), y_mean=0.0, y_std=1.0)
    write_eval_predictions(tmp_path / "e.csv", rnd, ds)
    rows = read_out(tmp_path / "e.csv")
    assert list(rows[0]) == ["row", "label", "prediction", "prob_no", "prob_yes", "absent"]
    assert [(r["row"], r["label"], r["prediction"], r["absent"]) for r in rows] == [
        ("0", "no", "no", ""), ("1", "no", "yes", "1"), ("2", "yes", "yes", "0 2"),
    ]  # fmt: skip
    np.testing.assert_allclose(probs(rows, ("no", "yes")), logits.softmax(-1).numpy(), rtol=1e-7)

    reg = EvalRound("regression", 1)
    reg.add(torch.tensor([[0.5]]), torch.tensor([-1.0]), torch.ones(1, 1), absent[:1, :1],
            rows=torch.tensor([4]))  # fmt: skip
    write_eval_predictions(tmp_path / "r.csv", reg, SimpleNamespace(task="regression", classes=(),
                           y_mean=10.0, y_std=2.0))  # fmt: skip
    assert read_out(tmp_path / "r.csv") == [
        {"row": "4", "label": "8", "prediction": "11", "absent": ""}
    ]
