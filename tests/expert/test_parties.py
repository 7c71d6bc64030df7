"""An expert of a parties run against a fake broker (docs/parties.md): it aligns first (ALIGN
request, answer, held counts), then sends the embeddings of the rows it holds with a bitmap
and zeros elsewhere, applies gradients to its own rows only, and answers queries by id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from traci_ml import proto
from traci_ml.app.partysplit import split_run
from traci_ml.core.config import load_config
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import DataError
from traci_ml.services.reducer.aligning import LabelHolder

from .test_service import BATCH, D, Rig, make_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def parties(tmp_path: Path):
    """Digits as party files, 70% of the ids each; a parties config for expert 0."""
    path = split_run(load_config("examples/digits.yaml"), tmp_path / "files", overlap=0.7)
    data = yaml.safe_load(path.read_text())["data"]
    rigs: list[Rig] = []

    def make(**extra: str) -> Rig:
        sets = {"data.source": "parties", "data.views": str(data["views"]),
                "data.labels": str(data["labels"]), **extra}  # fmt: skip
        rigs.append(Rig(make_config(tmp_path, **sets)))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def holder_for(rig: Rig) -> LabelHolder:
    ds = load_dataset(rig.config)
    ids = np.concatenate([ds.ids_train, ds.ids_test])
    return LabelHolder(ids, "int", len(ds.y_train), len(ds.y_test), mode=rig.config.data.align,
                       run_id=rig.config.run_id, where="labels")  # fmt: skip


@pytest.mark.parametrize("mode", ["plain", "psi"])
def test_an_expert_aligns_then_sends_its_rows_with_a_bitmap(parties, mode) -> None:
    # no L2 penalty: then any change of the online net below is the lacking rows' gradient
    rig = parties(**{"data.align": mode, "expert.weight_decay": "0"})
    rig.welcome()
    request = rig.broker.expect(proto.Align)
    assert (request.expert_id, request.stage, request.detail) == (0, mode, "int")
    assert request.counts == (len(rig.expert.data.ids),)
    rig.broker.send(proto.Align(0, proto.ALIGN_WAIT, "no reducer yet"))  # asked again soon
    again = rig.broker.expect(proto.Align, timeout=5)
    assert again.stage == mode
    rig.broker.send(holder_for(rig).answer(again))
    held = rig.broker.expect(proto.Align)
    rows = rig.expert.rows
    assert held.stage == "held" and held.counts == (*rows.held(), len(rig.expert.data.ids))
    emb = rig.broker.expect(proto.Emb)
    assert emb.seq == 0
    local, present = rows.lookup("train", rig.expert.schedule.rows(rig.expert.schedule.step(0)))
    assert present is not None and not present.all()  # 70%: some rows of the batch lacked
    assert (proto.unpack_rows(emb.rows, BATCH) == present).all()
    values = emb.tensor.numpy()
    assert not values[~present].any() and values[present].any()
    # standardised on its own training rows
    table = rig.expert.data.table[rows.train_rows()]
    assert np.abs(table.mean(axis=0)).max() < 1e-4

    # the gradient of a lacking row is never applied: a GRAD that is zero on held rows and
    # huge on the others leaves the online net as it was
    before = [p.detach().clone() for p in rig.expert.online.parameters()]
    grad = np.zeros((BATCH, D), np.float32)
    grad[~present] = 1e3
    rig.broker.send(proto.Grad(0, 0, (proto.Tensor.from_numpy(grad),)))
    rig.broker.expect(proto.Emb)  # the next step: the GRAD was taken
    after = list(rig.expert.online.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_refused_alignment_ends_the_expert_with_a_data_error(parties) -> None:
    rig = parties()
    rig.welcome()
    rig.broker.expect(proto.Align)
    rig.broker.send(proto.Align(0, "error", "expert 0 holds int ids but L holds str ids"))
    with pytest.raises(DataError, match="refused the alignment: expert 0 holds int ids"):
        rig.join()
    assert not rig.expert.ckpt_path.exists()  # nothing trained, nothing saved


def test_queries_by_id_look_up_own_rows_and_mask_the_rest(parties) -> None:
    rig = parties()
    rig.welcome()
    rig.broker.send(holder_for(rig).answer(rig.broker.expect(proto.Align)))
    rig.broker.expect(proto.Align)  # held
    own = rig.expert.data.ids
    missing = sorted(set(range(1797)) - set(own.tolist()))[:2]
    ids = (int(own[0]), missing[0], int(own[5]), missing[1])
    rig.broker.send(proto.Query(7, (), (), ids))
    answer = None
    while not isinstance(answer, proto.QEmb):
        answer = rig.broker.next(5)
    assert answer.status == proto.SERVE_OK and answer.qid == 7
    mask = proto.unpack_rows(answer.rows, 4)
    assert mask.tolist() == [True, False, True, False]
    emb = answer.tensors[0].numpy()
    assert not emb[[1, 3]].any() and emb[[0, 2]].any()
    with torch.no_grad():
        want = rig.expert.target(rig.expert.table[[0]]).numpy()
    np.testing.assert_allclose(emb[0], want[0], rtol=1e-6, atol=1e-6)
