"""The reducer with per-row presence (parties, docs/parties.md): BATCH.rows masks a token
per row and expert, rows no expert holds are left out and counted, train_rows shared, and
its side of ALIGN (answers, refusals, a flood throttled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from traci_ml import proto
from traci_ml.app.partysplit import split_run
from traci_ml.core.config import load_config

from .test_service import ALL, BATCH, N_EXPERTS, Rig, make_config

pytestmark = pytest.mark.timeout(60)


def bits(mask: list[bool]) -> bytes:
    return proto.pack_rows(np.array(mask, dtype=bool))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    running = Rig(make_config(tmp_path))
    yield running
    running.close()


@pytest.fixture
def parties_rig(tmp_path: Path) -> Rig:
    """The same rig on a parties run: the digits as four files and a label file."""
    parties = split_run(load_config("examples/digits.yaml"), tmp_path / "files")
    import yaml

    data = yaml.safe_load(parties.read_text())["data"]
    config = make_config(tmp_path, **{"data.source": "parties", "data.views": str(data["views"]),
                                      "data.labels": str(data["labels"])})  # fmt: skip
    running = Rig(config)
    yield running
    running.close()


def test_a_row_an_expert_lacks_masks_its_token_for_that_row_only(rig: Rig) -> None:
    rig.welcome()
    held = [True] * BATCH
    held[3] = held[7] = False  # expert 1 lacks rows 3 and 7
    batch = rig.batch(0)
    rig.broker.send(proto.Batch(0, "train", ALL, batch.tensors, (b"", bits(held), b"", b"")))
    grad = rig.broker.expect(proto.Grad)
    g = [t.numpy() for t in grad.tensors]
    assert not g[1][[3, 7]].any()  # a masked token gets no gradient
    assert g[1][[0, 1, 2, 4]].any() and g[0][[3, 7]].any()  # the others do


def test_a_row_no_expert_holds_is_left_out_and_counted(rig: Rig) -> None:
    rig.welcome()
    nobody = [True] * BATCH
    nobody[5] = False
    batch = rig.batch(0)
    rig.broker.send(proto.Batch(0, "train", ALL, batch.tensors, (bits(nobody),) * N_EXPERTS))
    grad = rig.broker.expect(proto.Grad)
    assert all(not t.numpy()[5].any() for t in grad.tensors)
    assert rig.service.rows_skipped == {"train/no_expert": 1}
    value = rig.service.metrics.registry.get_sample_value(
        "traci_reducer_rows_skipped_total", {"phase": "train", "reason": "no_expert"})  # fmt: skip
    assert value == 1
    # a step none of whose rows any expert holds: dropped, never applied
    rig.broker.send(proto.Batch(1, "train", ALL, rig.batch(1).tensors,
                                (bits([False] * BATCH),) * N_EXPERTS))  # fmt: skip
    assert rig.broker.expect(proto.Drop) == proto.Drop(1, "no_rows")
    assert rig.service.train_steps == 1


def test_shared_rows_only_trains_on_rows_every_expert_holds(tmp_path: Path) -> None:
    running = Rig(make_config(tmp_path, **{"data.train_rows": "shared"}))
    try:
        running.welcome()
        held = [True] * BATCH
        held[:4] = [False] * 4
        batch = running.batch(0)
        running.broker.send(proto.Batch(0, "train", ALL, batch.tensors,
                                        (bits(held), b"", b"", b"")))  # fmt: skip
        grad = running.broker.expect(proto.Grad)
        assert all(not t.numpy()[:4].any() for t in grad.tensors)  # rows 0-3 not shared
        assert running.service.rows_skipped == {"train/not_shared": 4}
    finally:
        running.close()


def test_align_in_a_one_table_run_is_answered_with_an_error(rig: Rig) -> None:
    rig.welcome()
    ids = proto.Tensor.from_numpy(np.arange(5, dtype=np.int64))
    rig.broker.send(proto.Align(2, "plain", "int", (5,), (ids,)))
    answer = rig.broker.expect(proto.Align)
    assert (answer.expert_id, answer.stage) == (2, "error") and "'digits'" in answer.detail


def test_the_label_holder_answers_counts_held_and_throttles_a_flood(parties_rig: Rig) -> None:
    rig = parties_rig
    rig.welcome()
    ids = proto.Tensor.from_numpy(np.array([5, 17, 10**9], dtype=np.int64))
    rig.broker.send(proto.Align(1, "plain", "int", (3,), (ids,)))
    rig.service.aligning.open_barrier("test")  # (the start barrier: its own test)
    answer = rig.broker.expect(proto.Align)
    assert answer.stage == "answer" and answer.counts == (1438, 359)
    pos = answer.tensors[0].numpy()
    everyone = np.concatenate([rig.dataset.ids_train, rig.dataset.ids_test])
    assert everyone[pos[0]] == 5 and everyone[pos[1]] == 17 and pos[2] == -1
    rig.broker.send(proto.Align(1, "held", "plain", (1000, 250, 1300)))
    rig.broker.send(proto.Align(9, "held", "plain", (1, 1, 1)))  # no such expert
    for _ in range(8):  # a flood: a burst is answered, the rest refused and counted
        rig.broker.send(proto.Align(1, "plain", "int", (3,), (ids,)))
    answered = 0
    while (msg := rig.broker.next(1.0)) is not None:
        answered += isinstance(msg, proto.Align)
    # a burst of 4 (one spent above), one at a time: the rest refused and counted
    assert 1 <= answered <= 3 and answered + rig.rejections("align_throttled") == 8
    assert rig.rejections("bad_field") == 1
    assert rig.service.aligning.overlap["top_right"]["overlap"] == pytest.approx(1250 / 1797)


def test_the_start_barrier_answers_every_expert_together(parties_rig: Rig) -> None:
    """Requests wait until every expert has asked, then all answers go out together; after
    that (an expert restarted) a request is answered as it comes."""
    rig = parties_rig
    rig.welcome()
    ids = proto.Tensor.from_numpy(np.array([5, 17], dtype=np.int64))
    for eid in (2, 0, 3):
        rig.broker.send(proto.Align(eid, "plain", "int", (2,), (ids,)))
    assert rig.broker.next(0.6) is None  # expert 1 has not asked yet
    rig.broker.send(proto.Align(1, "plain", "int", (2,), (ids,)))
    answered = {rig.broker.expect(proto.Align).expert_id for _ in range(4)}
    assert answered == {0, 1, 2, 3}
    rig.broker.send(proto.Align(2, "plain", "int", (2,), (ids,)))  # a restarted expert
    assert rig.broker.expect(proto.Align).expert_id == 2


def test_the_start_barrier_opens_when_training_begins(parties_rig: Rig) -> None:
    rig = parties_rig
    rig.welcome()
    ids = proto.Tensor.from_numpy(np.array([5], dtype=np.int64))
    rig.broker.send(proto.Align(3, "plain", "int", (1,), (ids,)))
    assert rig.broker.next(0.4) is None
    rig.broker.send(rig.batch(0))  # the other experts are training: no more waiting
    kinds = {type(rig.broker.next(5)) for _ in range(2)}
    assert kinds == {proto.Align, proto.Grad}
