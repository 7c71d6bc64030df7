"""Issue 14, item 6: each row's attention per expert. ``traci predict --attention`` on a run
written by the services' own code (tests/test_predict.py's ``make_run``): each row sums to 1
and the expert columns are the reducer's own attention, computed here directly; the served
answer through a real front door (broker, experts and reducer in serve mode, in threads
over loopback TCP) is the same per row."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tests.helpers.support import free_ports
from tests.test_predict import SMALL, Built, Parties, make_run, pick_ids
from traci_ml.app import predict as P
from traci_ml.app.cli import main
from traci_ml.app.client import Client, ServeError
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import load_dataset
from traci_ml.services.broker.service import BrokerService
from traci_ml.services.expert.service import ExpertService
from traci_ml.services.reducer.service import ReducerService

pytestmark = pytest.mark.timeout(120)
EXPERTS = ["top_left", "top_right", "bottom_left", "bottom_right"]  # digits' views
ATT = ["attn_cls", *(f"attn_{n}" for n in EXPERTS)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_run(tmp_path_factory.mktemp("attention") / "run")


def predict(args: list[str], out: Path) -> list[dict[str, str]]:
    assert main(["predict", *args, "--output", str(out), "--log-level", "WARNING"]) == 0
    return list(csv.DictReader(out.read_text().splitlines()))


def table(lines: list[dict[str, str]], columns: list[str] = ATT) -> np.ndarray:
    return np.array([[float(r[c]) for c in columns] for r in lines])


@torch.no_grad()
def direct(built: Built) -> np.ndarray:
    """The reducer's own [CLS] -> expert attention (``Reducer.forward``'s second output) on
    the test split, the target nets' tokens as the cluster's evaluation assembles them:
    (rows, experts)."""
    ds = load_dataset(built.config)
    tokens = torch.stack([net.eval()(torch.from_numpy(ds.view(i, "test")))
                          for i, net in enumerate(built.targets)], dim=1)  # fmt: skip
    absent = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    return built.reducer(tokens, absent)[1].numpy()


def test_split_rows_sum_to_one_and_are_the_reducers_own_attention(digits: Built, tmp_path):
    plain = predict(["--run", str(digits.path), "--split", "test"], tmp_path / "plain.csv")
    lines = predict(["--run", str(digits.path), "--split", "test", "--attention"],
                    tmp_path / "att.csv")  # fmt: skip
    assert list(lines[0]) == [*plain[0], *ATT]  # today's columns first, unchanged
    assert [{k: r[k] for k in plain[0]} for r in lines] == plain
    att = table(lines)
    np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-6)
    assert (att >= 0).all() and (att[:, 1:] > 0).all()
    want = direct(digits)
    np.testing.assert_allclose(att[:, 1:], want, rtol=1e-6, atol=1e-7)
    assert np.abs(att[:, 1:] - att[:, 1:].mean(0)).max() > 1e-4  # per row, not one mean


def test_input_rows_and_ids_give_the_same_attention(digits: Built, tmp_path):
    predictor = P.load_predictor(digits.path)
    x, _ = P.split_rows(digits.config, predictor.preprocess, "test")
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(predictor.preprocess.columns)
        writer.writerows(x[:25].tolist())
    by_input = table(predict(["--run", str(digits.path), "--input", str(path), "--attention"],
                             tmp_path / "input.csv"))  # fmt: skip
    split = table(predict(["--run", str(digits.path), "--split", "test", "--attention"],
                          tmp_path / "split.csv"))  # fmt: skip
    np.testing.assert_allclose(by_input, split[:25], rtol=1e-6, atol=1e-7)
    ids = P.load_id_predictor(digits.path).splits["test"][:7].tolist()
    by_ids = predict(["--run", str(digits.path), "--ids", ",".join(map(str, ids)),
                      "--attention"], tmp_path / "ids.csv")  # fmt: skip
    np.testing.assert_allclose(table(by_ids), split[:7], rtol=1e-6, atol=1e-7)


class LiveServe:
    """`traci serve` in one process: the broker, every expert and the reducer in serve mode,
    each in a thread, over loopback TCP on fresh ports, with a real front door."""

    def __init__(self, built: Built) -> None:
        ports = free_ports(3)
        sets = {**SMALL, "run_dir": str(built.path), "network.expert_port": str(ports[0]),
                "network.reducer_port": str(ports[1]), "network.serve_port": str(ports[2]),
                "network.heartbeat_interval": "0.2"}  # fmt: skip
        self.config: Config = load_config(overrides=sets, env={})
        self.endpoint = f"tcp://127.0.0.1:{ports[2]}"
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        self.broker = BrokerService(self.config, context=self.ctx, stop=self.stop, serve=True)
        peers = [ExpertService(self.config, i, context=self.ctx, stop=self.stop, serve=True)
                 for i in range(len(EXPERTS))]  # fmt: skip
        peers.append(ReducerService(self.config, context=self.ctx, stop=self.stop, serve=True))
        self.threads = [threading.Thread(target=s.run, daemon=True) for s in [self.broker, *peers]]
        for thread in self.threads:
            thread.start()

    def ask(self, client: Client, x: np.ndarray, columns: list[str], **kw):  # noqa: ANN201
        deadline = time.monotonic() + 60
        while True:
            try:
                return client.predict(x, columns, timeout=5, **kw)
            except ServeError as exc:  # until every service has registered
                if exc.status not in ("no_expert", "no_reducer", "timeout"):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        self.broker.stop()
        for thread in self.threads:
            thread.join(20)
        self.ctx.term()


def test_served_attention_equals_predict_attention(digits: Built, tmp_path):
    lines = predict(["--run", str(digits.path), "--split", "test", "--attention"],
                    tmp_path / "split.csv")  # fmt: skip
    predictor = P.load_predictor(digits.path)
    columns = list(predictor.preprocess.columns)
    x, _ = P.split_rows(digits.config, predictor.preprocess, "test")
    rows_csv, out = tmp_path / "rows.csv", tmp_path / "served.csv"
    with rows_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows([columns, *x[:40].tolist()])
    live = LiveServe(digits)
    try:
        with Client(live.endpoint) as client:
            plain = live.ask(client, x[:40], columns)
            asked = live.ask(client, x[:40], columns, attention=True)
        assert main(["request", "--endpoint", live.endpoint, "--input", str(rows_csv),
                     "--attention", "--output", str(out), "--log-level", "ERROR"]) == 0  # fmt: skip
    finally:
        live.close()
    by_cli = list(csv.DictReader(out.read_text().splitlines()))
    assert list(by_cli[0]) == ["row", "prediction", *(f"prob_{c}" for c in range(10)), *ATT]
    np.testing.assert_allclose(table(by_cli), table(lines[:40]), rtol=1e-5, atol=1e-6)
    assert plain.attention is None and plain.attention_cls is None  # not asked: none
    assert asked.experts == (0, 1, 2, 3) and asked.expert_names == tuple(EXPERTS)
    np.testing.assert_array_equal(asked.outputs, plain.outputs)
    offline = table(lines[:40])
    np.testing.assert_allclose(asked.attention_cls, offline[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(asked.attention, offline[:, 1:], rtol=1e-5, atol=1e-6)
    probs = table(lines[:40], [f"prob_{c}" for c in range(10)])
    np.testing.assert_allclose(asked.outputs, probs, rtol=1e-5, atol=1e-6)


# -- a parties run: an expert that lacks a row weighs 0 there, offline as served -------------


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    from traci_ml.app.partysplit import split_run

    base = tmp_path_factory.mktemp("parties")
    yaml_path = split_run(load_config(env={}), base / "files", overlap=0.7, labelled=0.9)
    config = load_config(yaml_path, overrides={**SMALL, "run_dir": str(base / "run")}, env={})
    return Parties(config)


def served_attention(parties: Parties, ids: list) -> np.ndarray:
    """The reducer's served answer (``serving.answer``) to the QBATCH the broker joins from
    every expert's QEMB of ``ids`` (as ``Parties.served``), asking for attention: [R, 1 + N]."""
    from traci_ml import proto
    from traci_ml.services.reducer.serving import answer

    ctx = zmq.Context()
    try:
        qembs = []
        for i in range(parties.ds.n_experts):
            expert = ExpertService(parties.config, i, context=ctx, serve=True)
            sent: list = []
            expert.link.send = sent.append  # type: ignore[method-assign]
            expert.on_query_ids(proto.Query(1, (), (), tuple(ids)), 0.0)
            qembs.append(sent[0])
        reducer = ReducerService(parties.config, context=ctx, serve=True)
        reducer.records.close()
    finally:
        ctx.term()
    batch = proto.QBatch(1, (True,) * len(qembs), tuple(q.tensors[0] for q in qembs),
                         tuple(q.rows for q in qembs), attention=True)  # fmt: skip
    out = answer(reducer.model, batch, reducer.serve_spec, torch.device("cpu"))
    assert out.status == proto.SERVE_OK and len(out.tensors) == 2, out
    return out.tensors[1].numpy()


def test_parties_masked_experts_weigh_zero_offline_as_served(parties: Parties, tmp_path):
    ids = pick_ids(parties)
    lines = predict(["--run", str(parties.path), "--ids", ",".join(map(str, ids)),
                     "--attention"], tmp_path / "ids.csv")  # fmt: skip
    names = [c for c in lines[0] if c.startswith("attn_")]
    assert names[0] == "attn_cls" and len(names) == 1 + parties.ds.n_experts
    att = table(lines, names)
    np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-6)
    for row, line in zip(att, lines, strict=True):
        masked = [int(i) for i in line["absent"].split()]
        assert all(row[1 + i] == 0.0 for i in masked)
        assert all(row[1 + i] > 0.0 for i in range(len(names) - 1) if i not in masked)
    assert att[-1].tolist() == [1.0] + [0.0] * (len(names) - 1)  # nobody holds it: [CLS] alone
    np.testing.assert_allclose(att, served_attention(parties, ids), rtol=1e-5, atol=1e-6)
