"""Id alignment without sockets (traci_ml/core/align.py, the experts' Aligner, the reducer's
LabelHolder): global rows, row maps, plain and psi answers, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from traci_ml import proto
from traci_ml.core.align import (
    ABSENT,
    IdIndex,
    RowMap,
    global_rows,
    ids_from_tensors,
    ids_tensors,
    positions,
    split_order,
)
from traci_ml.core.config import validate
from traci_ml.core.data import expert_count, fit_positions, load_dataset, load_expert_data
from traci_ml.core.errors import ConfigError, DataError
from traci_ml.services.expert.aligning import Aligner
from traci_ml.services.reducer.aligning import LabelHolder
from traci_ml.services.reducer.serving import absent_rows


def wire(msg: proto.Message) -> proto.Message:
    """Through encode and decode, as the broker relays it."""
    return proto.decode([bytes(f) for f in proto.encode(msg)])


def test_global_rows_ignore_the_files_row_order_and_match_the_one_table_split():
    ids = np.arange(1000, dtype=np.int64)
    rows = global_rows(ids, 3, 0.2)
    train, test = split_order(1000, 3, 0.2)
    assert (rows.train_ids == train).all() and (rows.test_ids == test).all()
    shuffled = np.random.default_rng(1).permutation(ids)
    again = global_rows(shuffled, 3, 0.2)
    assert (again.ids == rows.ids).all()
    assert (shuffled[again.source] == again.ids).all()  # source: rows of the file
    words = np.array([f"id-{i}" for i in range(50)])
    assert sorted(global_rows(words, 0, 0.2).ids.tolist()) == sorted(words.tolist())


def test_positions_and_id_index_find_values_never_types():
    ref = np.array([40, 10, 30, 20], dtype=np.int64)
    assert positions(ref, np.array([20, 99, 40, 10])).tolist() == [3, ABSENT, 0, 1]
    assert positions(ref, np.array([], dtype=np.int64)).tolist() == []
    assert IdIndex(ref).find(np.array(["20", "40"])).tolist() == [ABSENT, ABSENT]
    text = np.array(["b", "a", "c"])
    assert IdIndex(text).find(np.array(["c", "z", "a"])).tolist() == [2, ABSENT, 1]
    assert IdIndex(text).find(np.array([1, 2])).tolist() == [ABSENT, ABSENT]


def test_row_map_from_positions():
    pos = np.array([4, ABSENT, 0, 2, ABSENT])  # local row -> global row (3 train, 2 test)
    rows = RowMap.from_positions(pos, 3, 2)
    assert rows.train.tolist() == [2, ABSENT, 3] and rows.test.tolist() == [ABSENT, 0]
    local, present = rows.lookup("train", np.array([0, 1, 2]))
    assert local.tolist() == [2, 0, 3] and present.tolist() == [True, False, True]
    local, present = rows.lookup("eval", np.array([1]))
    assert local.tolist() == [0] and present is None  # all present: no mask
    assert rows.held() == (2, 1) and sorted(rows.train_rows().tolist()) == [2, 3]
    with pytest.raises(DataError, match="outside"):
        RowMap.from_positions(np.array([5]), 3, 2)
    with pytest.raises(DataError, match="two of this party's rows"):
        RowMap.from_positions(np.array([1, 1]), 3, 2)


@pytest.mark.parametrize("ids", [np.array([5, -3, 1 << 40]), np.array(["a", "é", "x,y"])])
def test_ids_travel_as_align_tensors(ids):
    kind = "int" if ids.dtype.kind == "i" else "str"
    msg = wire(proto.Align(0, "plain", kind, (len(ids),), ids_tensors(ids)))
    assert ids_from_tensors(msg.tensors, kind).tolist() == ids.tolist()
    with pytest.raises(DataError):
        ids_from_tensors(msg.tensors, "str" if kind == "int" else "int")


def test_broken_text_ids_are_refused():
    offsets = proto.Tensor.from_numpy(np.array([0, 5, 3], dtype=np.int64))
    data = proto.Tensor.from_numpy(np.frombuffer(b"abc", dtype=np.uint8))
    with pytest.raises(DataError, match="offsets"):
        ids_from_tensors((offsets, data), "str")
    offsets = proto.Tensor.from_numpy(np.array([0, 2], dtype=np.int64))
    data = proto.Tensor.from_numpy(np.frombuffer(b"\xff\xfe", dtype=np.uint8))
    with pytest.raises(DataError, match="UTF-8"):
        ids_from_tensors((offsets, data), "str")


def holder(ids: np.ndarray, mode: str, n_train: int | None = None) -> LabelHolder:
    kind = "int" if ids.dtype.kind in "iu" else "str"
    n_train = len(ids) - 2 if n_train is None else n_train
    return LabelHolder(ids, kind, n_train, len(ids) - n_train, mode=mode, run_id="t", where="L")


@pytest.mark.parametrize("mode", ["plain", "psi"])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_alignment_gives_each_own_row_its_global_position(mode, kind):
    rng = np.random.default_rng(5)
    universe = np.arange(3000, dtype=np.int64) * 11
    if kind == "str":
        universe = np.array([f"u{u}" for u in universe])
    labelled = rng.permutation(universe)[:2000]
    own = rng.permutation(universe)[:1500]
    label_holder = holder(labelled, mode, 1600)
    aligner = Aligner(2, own, kind, mode, "t")
    answer = wire(label_holder.answer(wire(aligner.request())))
    assert answer.stage == "answer" and answer.counts[:2] == (1600, 400)
    rows = aligner.rows(answer)
    truth = positions(labelled, own)
    for g in range(2000):
        local = rows.train[g] if g < 1600 else rows.test[g - 1600]
        want = np.flatnonzero(truth == g)
        assert local == (want[0] if len(want) else ABSENT)


def test_the_label_holder_refuses_a_downgrade_a_type_mismatch_and_garbage():
    ids = np.arange(100, dtype=np.int64)
    psi_holder = holder(ids, "psi")
    plain = Aligner(0, ids, "int", "plain", "t").request()
    refused = psi_holder.answer(plain)
    assert refused.stage == "error" and "'psi'" in refused.detail and "refused" in refused.detail
    words = Aligner(1, np.array(["a", "b"]), "str", "plain", "t").request()
    refused = holder(ids, "plain").answer(words)
    assert refused.stage == "error" and "holds str ids but L holds int ids" in refused.detail
    junk = proto.Tensor.from_numpy(np.zeros((3, 32), np.uint8))  # not group elements
    refused = psi_holder.answer(proto.Align(0, "psi", "int", (3,), (junk,)))
    assert refused.stage == "error" and "not a valid group element" in refused.detail
    shape = proto.Tensor.from_numpy(np.zeros((3, 31), np.uint8))
    refused = psi_holder.answer(proto.Align(0, "psi", "int", (3,), (shape,)))
    assert refused.stage == "error" and "one uint8[n, 32]" in refused.detail


def test_the_expert_refuses_broken_answers():
    ids = np.arange(10, dtype=np.int64)
    aligner = Aligner(0, ids, "int", "plain", "t")
    aligner.request()
    short = proto.Tensor.from_numpy(np.zeros(9, np.int64))
    with pytest.raises(DataError, match="want int64"):
        aligner.rows(proto.Align(0, "answer", "", (8, 2), (short,)))
    with pytest.raises(DataError, match="split sizes"):
        aligner.rows(proto.Align(0, "answer", "", (), (short,)))
    same = proto.Tensor.from_numpy(np.zeros(10, np.int64))  # every row claims global row 0
    with pytest.raises(DataError, match="two of this party's rows"):
        aligner.rows(proto.Align(0, "answer", "", (8, 2), (same,)))


def test_absent_rows_from_bitmaps():
    bits = proto.pack_rows(np.array([True, False, True]))
    absent = absent_rows((True, False, True), (bits, b""), 3, torch.device("cpu"))
    assert absent.tolist() == [[False, True, False], [True, True, False], [False, True, False]]
    plain = absent_rows((True, False), (), 2, torch.device("cpu"))
    assert plain.tolist() == [[False, True], [False, True]]


# ---- config and data of the parties source ----------------------------------------------


def parties_raw(tmp_path: Path, **data) -> dict:
    labels = tmp_path / "labels.csv"
    pacsv.write_csv(pa.table({"id": [1, 2, 3, 4, 5, 6], "label": ["a", "b"] * 3}), labels)
    party = tmp_path / "p0.csv"
    pacsv.write_csv(pa.table({"key": [6, 5, 4, 3, 9], "f": [1.0, 2.0, 3.0, 4.0, 5.0]}), party)
    return {"data": {"source": "parties", "labels": {"path": str(labels), "label": "label"},
                     "views": [{"name": "p0", "path": str(party), "id": "key",
                                "columns": ["f"]}], "test_fraction": 0.34, **data}}  # fmt: skip


def test_parties_config_names_the_missing_key(tmp_path):
    raw = parties_raw(tmp_path)
    validate(raw)
    no_labels = {"data": {**raw["data"], "labels": None}}
    with pytest.raises(ConfigError, match="data.labels"):
        validate(no_labels)
    view = {k: v for k, v in raw["data"]["views"][0].items() if k != "path"}
    with pytest.raises(ConfigError, match=r"data.views\[0\].path"):
        validate({"data": {**raw["data"], "views": [view]}})
    with pytest.raises(ConfigError, match="only for data.source 'parties'"):
        validate(
            {
                "data": {
                    "source": "csv",
                    "path": "x.csv",
                    "label": "y",
                    "views": [{"name": "a", "columns": ["f"], "path": "p.csv"}],
                }
            }
        )
    with pytest.raises(ConfigError, match="lists the id column"):
        validate({"data": {**raw["data"], "views": [{**raw["data"]["views"][0],
                                                     "columns": ["key"]}]}})  # fmt: skip
    with pytest.raises(ConfigError, match="data.align"):
        validate({"data": {**raw["data"], "align": "maybe"}})


def test_the_reducer_reads_labels_and_an_expert_its_own_file(tmp_path):
    cfg = validate(parties_raw(tmp_path))
    assert expert_count(cfg) == 1
    ds = load_dataset(cfg)  # the labels only
    assert ds.x_train.shape == (4, 0) and len(ds.y_test) == 2 and ds.classes == ("a", "b")
    assert sorted([*ds.ids_train.tolist(), *ds.ids_test.tolist()]) == [1, 2, 3, 4, 5, 6]
    data = load_expert_data(cfg, 0)
    assert data.ids.tolist() == [6, 5, 4, 3, 9] and data.rows is None
    pos = positions(np.concatenate([ds.ids_train, ds.ids_test]), data.ids)
    fit = fit_positions(4, cfg)  # the train rows less the validation rows
    data.align(RowMap.from_positions(pos, 4, 2), fit)
    local = data.rows.train[fit]
    held = local[local >= 0]  # standardised on the own rows among those training fits on
    assert np.allclose(data.table[held].mean(), 0, atol=1e-6)
    assert data.mean is not None and data.std is not None


def test_an_expert_holding_no_labelled_training_row_is_a_data_error(tmp_path):
    data = load_expert_data(validate(parties_raw(tmp_path)), 0)
    with pytest.raises(DataError, match="zero overlap"):
        data.align(RowMap.from_positions(np.full(5, ABSENT), 4, 2), np.arange(4))
