"""`traci predict` and traci_ml.app.predict on small run directories built in-process through the
services' own code paths (ExpertService.save, ReducerService.save, the reducer's config/preprocess
files), with target weights moved away from the online ones so "uses the target" is tested."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from traci_ml.app import predict as P
from traci_ml.app.cli import main
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import CheckpointError, DataError
from traci_ml.core.files import write_json_atomic
from traci_ml.core.models.expert import polyak_update
from traci_ml.services.expert.service import ExpertService
from traci_ml.services.reducer.service import ReducerService

pytestmark = pytest.mark.timeout(120)
SMALL = {
    "run_id": "predict-test", "embed_dim": "16", "expert.model.hidden": "[32]",
    "reducer.layers": "1", "reducer.heads": "2", "reducer.ff": "32", "expert.device": "cpu",
    "reducer.device": "cpu", "metrics.broker_port": "0", "metrics.reducer_port": "0",
    "metrics.expert_base_port": "0",
    "data.val_fraction": "0",  # checkpoints written as if trained: no round was selected
}  # fmt: skip


class Built:
    """A run directory and the live nets its checkpoints were written from."""

    def __init__(
        self, config: Config, experts: list[ExpertService], reducer: ReducerService
    ) -> None:
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


def save_as_trained(service, gen: torch.Generator) -> None:  # noqa: ANN001
    """Weights moved as if trained (an expert's target halfway behind its online net),
    then the checkpoint written."""
    with torch.no_grad():
        net = service.online if hasattr(service, "online") else service.model
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    if hasattr(service, "online"):
        polyak_update(service.target, service.online, 0.5)
    service.save()
    if hasattr(service, "records"):
        service.records.close()


def make_run(run_dir: Path, *, preprocess: bool = True, **extra: str) -> Built:
    config = load_config(overrides={**SMALL, "run_dir": str(run_dir), **extra}, env={})
    ctx = zmq.Context()
    gen = torch.Generator().manual_seed(7)
    try:
        experts = []
        for i in range(len(load_dataset(config).views)):
            expert = ExpertService(config, i, context=ctx)
            save_as_trained(expert, gen)
            experts.append(expert)
        reducer = ReducerService(config, context=ctx)
        save_as_trained(reducer, gen)
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
    assert list(rows[0]) == [
        "row", "id", "label", "prediction", *(f"prob_{c}" for c in classes), "absent"
    ]  # fmt: skip
    ds = load_dataset(digits.config)  # id: the row's number in the one table
    assert [r["id"] for r in rows] == [str(i) for i in ds.ids_test]
    assert [r["row"] for r in rows] == [str(k) for k in range(359)]
    assert {r["absent"] for r in rows} == {""}
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
    assert [r["id"] for r in rows] == [str(k) for k in range(20)]  # no id column: row number
    assert [r["label"] for r in rows] == labels[:20]
    assert list(rows[0])[:3] == ["row", "id", "label"] and list(rows[0])[-1] == "absent"
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

    from traci_ml.services.reducer.runlog import EvalRound, write_eval_predictions

    rnd = EvalRound("classification", 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]])
    absent = torch.tensor([[False, False, False], [False, True, False], [True, False, True]])
    att = torch.tensor([[0.5, 0.25, 0.125], [0.5, 0.0, 0.25], [0.0, 0.75, 0.0]])
    rnd.add(logits[:2], torch.tensor([0, 0]), att[:2], absent[:2], rows=torch.tensor([0, 1]))
    rnd.add(logits[2:], torch.tensor([1]), att[2:], absent[2:], rows=torch.tensor([2]))
    ds = SimpleNamespace(task="classification", classes=("no", "yes"), y_mean=0.0, y_std=1.0)
    write_eval_predictions(tmp_path / "e.csv", rnd, ds)
    rows = read_out(tmp_path / "e.csv")
    assert list(rows[0]) == ["row", "id", "label", "prediction", "prob_no", "prob_yes",
                             "absent", "attn_cls", "attn_0", "attn_1", "attn_2"]  # fmt: skip
    assert [(r["row"], r["id"], r["label"], r["prediction"], r["absent"]) for r in rows] == [
        ("0", "0", "no", "no", ""), ("1", "1", "no", "yes", "1"), ("2", "2", "yes", "yes", "0 2"),
    ]  # fmt: skip
    np.testing.assert_allclose(probs(rows, ("no", "yes")), logits.softmax(-1).numpy(), rtol=1e-7)
    # each row's attention: [CLS]'s own (the rest of the row's 1), then each expert's
    weights = [[float(r[f"attn_{k}"]) for k in ("cls", "0", "1", "2")] for r in rows]
    assert weights == [[0.125, 0.5, 0.25, 0.125], [0.25, 0.5, 0.0, 0.25], [0.25, 0.0, 0.75, 0.0]]

    reg = EvalRound("regression", 1)
    reg.add(torch.tensor([[0.5]]), torch.tensor([-1.0]), torch.ones(1, 1), absent[:1, :1],
            rows=torch.tensor([4]))  # fmt: skip
    write_eval_predictions(tmp_path / "r.csv", reg, SimpleNamespace(task="regression", classes=(),
                           y_mean=10.0, y_std=2.0))  # fmt: skip
    assert read_out(tmp_path / "r.csv") == [
        {"row": "4", "id": "4", "label": "8", "prediction": "11", "absent": "",
         "attn_cls": "0", "attn_0": "1"}
    ]  # fmt: skip


# -- by id: one-table runs (the id is the row's number in the table) ------------------------


def test_one_table_ids_are_row_numbers_and_equal_the_split(digits: Built, tmp_path, capsys):
    ds = load_dataset(digits.config)
    split = P.load_id_predictor(digits.path).predict_split("test")[0]
    ask = [int(i) for i in ds.ids_test[:5]] + [10**6]  # the last: no such row
    out = P.predict_ids(digits.path, ask)
    assert out["id"] == ask and out["row"] == list(range(6))
    assert out["label"][:5] == split["label"][:5] and out["label"][5] is None
    assert out["absent"] == [""] * 5 + ["0 1 2 3"]  # an unknown id: every expert masked
    for c in ("prob_0", "prob_9"):
        np.testing.assert_allclose(out[c][:5], split[c][:5], rtol=1e-6)
    assert out["prediction"][:5] == split["prediction"][:5]
    want = digits.logits()[:5].softmax(-1).numpy()
    got = np.array([[out[f"prob_{k}"][r] for k in range(10)] for r in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert sum(np.array([out[f"prob_{k}"][5] for k in range(10)])) == pytest.approx(1.0)

    ids = ",".join(str(i) for i in ask)
    assert main(["predict", "--run", str(digits.path), "--ids", ids]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["id"] for r in rows] == [str(i) for i in ask]
    assert [r["label"] for r in rows][-1] == "" and rows[-1]["absent"] == "0 1 2 3"

    code, err = run_cli(["predict", "--run", str(digits.path), "--ids", "r1,r2"], capsys)
    assert code == 2 and "are str ids ('r1', ...), but the run's ids are int" in err
    assert len(err.strip().splitlines()) == 1


def test_input_csv_id_column_is_kept(digits: Built, tmp_path, capsys) -> None:
    prep = P.load_preprocess(digits.path, digits.config)
    x, _ = P.split_rows(digits.config, prep, "test")
    path = write_csv(tmp_path / "rows.csv", ["id", *prep.columns],
                     [[f"a{k}", *x[k].tolist()] for k in range(3)])  # fmt: skip
    assert main(["predict", "--run", str(digits.path), "--input", str(path)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [(r["row"], r["id"], r["absent"]) for r in rows] == [
        ("0", "a0", ""), ("1", "a1", ""), ("2", "a2", "")
    ]  # fmt: skip


# -- id parsing -------------------------------------------------------------------------------


def test_ids_parse_as_ints_only_when_every_cell_is_a_plain_integer(tmp_path: Path) -> None:
    assert P.read_ids("12, 57,903").tolist() == [12, 57, 903]
    assert P.read_ids("12,57,903").dtype == np.int64
    assert P.read_ids("12,007").tolist() == ["12", "007"]  # "007" keeps its zeros: all str
    assert P.read_ids("r1,2").tolist() == ["r1", "2"]
    assert P.read_ids("-3,0").tolist() == [-3, 0]
    with pytest.raises(DataError, match=r"--ids: id 1 is empty"):
        P.read_ids("1,,2")
    with pytest.raises(DataError, match=r"no such file"):
        P.read_ids(str(tmp_path / "ids.csv"))
    path = write_csv(tmp_path / "ids.csv", ["name", "key"], [["a", "5"], ["b", " 7"]])
    assert P.read_ids(str(path), "key").tolist() == [5, 7]
    with pytest.raises(DataError, match=r"ids.csv: no id column 'id' \(data.id\)"):
        P.read_ids(str(path))
    path.write_text("key\n5\n\nx\n")
    assert P.read_ids(str(path), "key").tolist() == ["5", "x"]
    path.write_text("key\n5\n \n")
    with pytest.raises(DataError, match=r"ids.csv line 3: id 1 is empty"):
        P.read_ids(str(path), "key")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([3, 1], pa.int32())}), tmp_path / "i.parquet")
    assert P.read_ids(str(tmp_path / "i.parquet")).tolist() == [3, 1]
    pq.write_table(pa.table({"id": ["3", "1"]}), tmp_path / "s.parquet")  # the type decides
    assert P.read_ids(str(tmp_path / "s.parquet")).tolist() == ["3", "1"]
    assert P.as_ids([1, 2]).dtype == np.int64 and P.as_ids(np.array(["a"])).tolist() == ["a"]
    with pytest.raises(DataError, match=r"all ints or all strs"):
        P.as_ids([1, "2"])


# -- by id: parties runs ----------------------------------------------------------------------


class Parties:
    """A parties run directory written through the services' own code (each expert aligned
    on its own file and standardised on its own training rows, as ``traci up`` does), the
    label holder's rows, and each party's ids."""

    def __init__(self, config: Config) -> None:
        from traci_ml.core.align import RowMap, positions
        from traci_ml.core.data import fit_positions, load_labels

        self.config, self.path = config, config.run_path
        self.ds = ds = load_labels(config)
        assert ds.ids_train is not None and ds.ids_test is not None
        gids = np.concatenate([ds.ids_train, ds.ids_test])
        ctx = zmq.Context()
        gen = torch.Generator().manual_seed(11)
        self.held: list[set[int]] = []
        try:
            for i in range(ds.n_experts):
                expert = ExpertService(config, i, context=ctx)
                rows = RowMap.from_positions(positions(gids, expert.data.ids),
                                             len(ds.ids_train), len(ds.ids_test))  # fmt: skip
                # what ExpertService._align does once ALIGN answers
                expert.data.align(rows, fit_positions(len(ds.ids_train), config))
                expert._adopt(rows)
                save_as_trained(expert, gen)
                self.held.append(set(expert.data.ids.tolist()))
            save_as_trained(ReducerService(config, context=ctx), gen)
        finally:
            ctx.term()
        write_json_atomic(config.run_path / "config.json", config.to_dict())

    def served(self, ids: list) -> np.ndarray:
        """The served path by id: each expert restored for serving from its checkpoint
        answers QUERY(ids) (on_query_ids), the reducer answers the QBATCH the broker would
        join (serving.answer): class probabilities (R, C)."""
        from traci_ml import proto
        from traci_ml.services.reducer.serving import answer

        ctx = zmq.Context()
        try:
            qembs = []
            for i in range(self.ds.n_experts):
                expert = ExpertService(self.config, i, context=ctx, serve=True)
                sent: list = []
                expert.link.send = sent.append  # type: ignore[method-assign]
                expert.on_query_ids(proto.Query(1, (), (), tuple(ids)), 0.0)
                assert sent[0].status == proto.SERVE_OK, sent[0]
                qembs.append(sent[0])
            reducer = ReducerService(self.config, context=ctx, serve=True)
            reducer.records.close()
        finally:
            ctx.term()
        batch = proto.QBatch(1, (True,) * len(qembs), tuple(q.tensors[0] for q in qembs),
                             tuple(q.rows for q in qembs))  # fmt: skip
        out = answer(reducer.model, batch, reducer.serve_spec, torch.device("cpu"))
        assert out.status == proto.SERVE_OK, out
        return out.tensors[0].numpy()

    def absent(self, ids: list) -> list[str]:
        return [" ".join(str(i) for i, h in enumerate(self.held) if x not in h) for x in ids]


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    from traci_ml.app.partysplit import split_run

    base = tmp_path_factory.mktemp("parties")
    yaml_path = split_run(load_config(env={}), base / "files", overlap=0.7, labelled=0.9)
    config = load_config(yaml_path, overrides={**SMALL, "run_dir": str(base / "run")}, env={})
    return Parties(config)


def pick_ids(parties: Parties) -> list[int]:
    """Labelled test ids held by every party, lacked by some, lacked by all; an unlabelled id
    some party holds; an id nobody has."""
    test = [int(i) for i in parties.ds.ids_test]  # type: ignore[union-attr]
    lacking = [sum(i not in h for h in parties.held) for i in test]
    chosen = [test[lacking.index(k)] for k in (0, 1, 2, 3) if k in lacking]
    labelled = set(np.concatenate([parties.ds.ids_train, parties.ds.ids_test]).tolist())  # type: ignore[list-item]
    unlabelled = sorted(set().union(*parties.held) - labelled)
    return [*chosen, unlabelled[0], 10**9]


def test_parties_ids_are_the_served_computation_with_absent_rows_masked(parties: Parties):
    ids = pick_ids(parties)
    out = P.predict_ids(parties.path, ids)
    classes = tuple(str(k) for k in range(10))
    assert list(out) == ["row", "id", "label", "prediction", *(f"prob_{c}" for c in classes),
                         "absent"]  # fmt: skip
    assert out["id"] == ids and out["row"] == list(range(len(ids)))
    assert out["absent"] == parties.absent(ids)
    assert out["absent"][-1] == "0 1 2 3"  # no party holds it: still a line, all masked
    assert any(a and a != "0 1 2 3" for a in out["absent"])  # some parties lack some rows
    assert out["label"][-2:] == [None, None]  # unlabelled, unknown
    want = parties.served(ids)
    got = np.array([[out[f"prob_{c}"][r] for c in classes] for r in range(len(ids))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert out["prediction"] == [classes[k] for k in want.argmax(1)]


def test_parties_ids_from_a_file_and_type_mismatch(parties: Parties, tmp_path, capsys):
    ids = pick_ids(parties)
    path = write_csv(tmp_path / "ids.csv", ["note", "id"], [["x", i] for i in ids])
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(parties.path), "--ids", str(path),
                 "--output", str(out)]) == 0  # fmt: skip
    rows = read_out(out)
    assert [r["id"] for r in rows] == [str(i) for i in ids]
    assert [r["absent"] for r in rows] == parties.absent(ids)
    assert rows[-1]["label"] == ""
    direct = P.predict_ids(parties.path, ids)
    np.testing.assert_array_equal(
        np.float32([float(r["prob_3"]) for r in rows]), np.float32(direct["prob_3"])
    )  # 9 digits: float32 exactly

    path = write_csv(tmp_path / "sid.csv", ["id"], [["a1"], ["b2"]])
    code, err = run_cli(["predict", "--run", str(parties.path), "--ids", str(path)], capsys)
    assert code == 2
    assert "are str ids ('a1', ...), but the run's ids are int" in err and "labels.csv" in err
    with pytest.raises(DataError, match=r"are str ids \('7', \.\.\.\)"):
        P.predict_ids(parties.path, ["7"])


def test_parties_split_test_leaves_out_rows_no_party_holds(parties: Parties, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(parties.path), "--split", "test",
                 "--output", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    rows = read_out(out)
    test = [int(i) for i in parties.ds.ids_test]  # type: ignore[union-attr]
    kept = [k for k, i in enumerate(test) if any(i in h for h in parties.held)]
    assert [int(r["row"]) for r in rows] == kept
    assert [int(r["id"]) for r in rows] == [test[k] for k in kept]
    labels = [parties.ds.classes[int(y)] for y in parties.ds.y_test]
    assert [r["label"] for r in rows] == [labels[k] for k in kept]
    assert [r["absent"] for r in rows] == parties.absent([test[k] for k in kept])
    assert 0 < len(test) - len(kept) < 10  # overlap 0.7 of 4 parties: about 0.3^4 of them
    assert f"{len(test) - len(kept)} test row(s) held by no expert left out" in err
    hits = sum(r["label"] == r["prediction"] for r in rows)
    assert f"test accuracy {hits / len(rows):.4f} ({hits}/{len(rows)})" in err


def test_parties_runs_refuse_input_rows_and_the_one_table_model(parties: Parties, capsys):
    code, err = run_cli(["predict", "--run", str(parties.path), "--input", "x.csv"], capsys)
    assert code == 2 and "--input takes raw feature rows of a one-table run" in err
    with pytest.raises(DataError, match=r"a parties run .* has no one table"):
        P.load_predictor(parties.path)


def test_parties_needs_each_checkpoints_standardisation(parties: Parties, tmp_path) -> None:
    run = tmp_path / "run"
    import shutil

    shutil.copytree(parties.path, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["run_dir"] = str(run)
    (run / "config.json").write_text(json.dumps(cfg))
    path = run / "checkpoints" / "expert-1.pt"
    state = torch.load(path, weights_only=False)
    torch.save({**state, "mean": None, "std": None}, path)
    with pytest.raises(CheckpointError, match=r"expert-1.pt holds no standardisation"):
        P.load_id_predictor(run)
