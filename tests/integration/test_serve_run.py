"""Served prediction through real processes over loopback TCP (docs/serving.md): `traci serve`
on a finished short run (answers equal the offline model's, concurrent requests are batched,
bad requests are answered and counted, a SIGKILLed expert is masked), and serving beside a
`traci up` training run that still finishes with its step accounting intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zmq

from tests.helpers.support import free_ports
from traci_ml import Client
from traci_ml.app.client import ServeError
from traci_ml.app.predict import load_predictor, predict_array, split_rows

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
SMALL = {
    "run_id": "serve-it", "embed_dim": 16,
    "expert": {"model": {"hidden": [32]}, "device": "cpu"},
    "reducer": {"layers": 1, "heads": 2, "ff": 32, "device": "cpu"},
    "train": {"steps": 150, "batch_size": 64, "eval_every": 0, "checkpoint_every": 0},
    "network": {"heartbeat_interval": 0.2, "liveness": 2.0, "connect_timeout": 120},
    "metrics": {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0},
}  # fmt: skip
NOT_READY = ("no_expert", "no_reducer", "timeout")


def wait_served(client: Client, x: np.ndarray, columns: list[str], proc, timeout: float = 150):
    """The first ok answer, once every service has registered."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.predict(x, columns, timeout=5)
        except ServeError as exc:
            if exc.status not in NOT_READY or time.monotonic() > deadline:
                raise
        assert proc.poll() is None, f"exited with {proc.returncode}"
        time.sleep(0.5)


def scrape(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"{name}{labels} "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished short digits run (checkpoints, launch.yaml, preprocess.json)."""
    root = tmp_path_factory.mktemp("served")
    expert_port, reducer_port, serve_port = free_ports(3)
    cfg = {**SMALL, "run_dir": str(root / "run"), "network": {
        **SMALL["network"], "expert_port": expert_port, "reducer_port": reducer_port,
        "serve_port": serve_port}}  # fmt: skip
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run"


class Served:
    """`traci serve --run RUN` on fresh ports; a killed expert stays down (restart never)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        ports = free_ports(4)
        self.endpoint = f"tcp://127.0.0.1:{ports[2]}"
        self.metrics_port = ports[3]
        sets = {
            "network.expert_port": ports[0], "network.reducer_port": ports[1],
            "network.serve_port": ports[2], "metrics.broker_port": ports[3],
            "launcher.restart": "never", "serve.max_wait_ms": 50, "serve.max_request_rows": 64,
            "serve.timeout": 1.0,
        }  # fmt: skip
        argv = [*TRACI, "serve", "--run", str(run)]
        argv += [f"--set={k}={v}" for k, v in sets.items()]
        self.log = (run.parent / "serve.out").open("w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.predictor = load_predictor(run)
        self.columns = list(self.predictor.preprocess.columns)
        self.x, _ = split_rows(self.predictor.config, self.predictor.preprocess, "test")

    def offline(self, x: np.ndarray, masked: tuple[int, ...] = ()) -> np.ndarray:
        """Probabilities of the one-process model (``traci predict``), experts masked."""
        if not masked:
            out = predict_array(self.predictor, x)
            return np.stack([out[f"prob_{c}"] for c in self.predictor.preprocess.classes], 1)
        p = self.predictor
        with torch.no_grad():
            xs = (torch.from_numpy(x) - p.mean) / p.std
            views = [xs.index_select(1, getattr(p, f"view_{i}")) for i in range(p.n_views)]
            nets = zip(p.model.experts, views, strict=True)
            tokens = torch.stack([net(v) for net, v in nets], dim=1)
            absent = torch.zeros(tokens.shape[:2], dtype=torch.bool)
            absent[:, list(masked)] = True
            return p.model.reducer(tokens, absent)[0].softmax(-1).numpy()

    def pids(self) -> dict[str, int]:
        return json.loads((self.run / "serve-pids.json").read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def served(trained: Path):
    server = Served(trained)
    try:
        with Client(server.endpoint) as client:
            wait_served(client, server.x[:2], server.columns, server.proc)
        yield server
    finally:
        code = server.stop()
        assert code == 0, (trained.parent / "serve.out").read_text()[-3000:]


# ---- `traci serve` on a finished run ----------------------------------------------------------


@pytest.mark.timeout(400)
def test_served_answers_equal_offline_answers(served: Served) -> None:
    x, columns = served.x[:50], served.columns
    with Client(served.endpoint) as client:
        pred = client.predict(x, columns)
        # columns in another order, plus one the model does not read: picked by name
        order = np.random.default_rng(0).permutation(len(columns))
        extra = np.column_stack([x[:, order], np.full(len(x), 7.0, np.float32)])
        shuffled = client.predict(extra, [columns[k] for k in order] + ["unused"])
    offline = served.offline(x)
    assert pred.outputs.shape == offline.shape
    np.testing.assert_allclose(pred.outputs, offline, atol=2e-6, rtol=0)
    np.testing.assert_allclose(shuffled.outputs, offline, atol=2e-6, rtol=0)
    assert pred.task == "classification" and pred.classes == tuple(str(k) for k in range(10))
    assert pred.experts == (0, 1, 2, 3)
    assert pred.expert_names == ("top_left", "top_right", "bottom_left", "bottom_right")
    assert pred.labels == [str(k) for k in offline.argmax(axis=1)]


@pytest.mark.timeout(200)
def test_dynamic_batching_groups_concurrent_requests(served: Served) -> None:
    """Eight connected clients ask at once (sent back to back from one thread, so they
    arrive within the experts' round trip on any machine): the first leaves at once (an idle
    cluster never holds a request), the rest wait while it is at the experts and travel
    together; each gets its own rows back."""
    from traci_ml import proto
    from traci_ml.core.link import dealer

    clients, rows = 8, 4
    context = zmq.Context.instance()
    socks = [dealer(context, served.endpoint, None) for _ in range(clients)]
    xs = [served.x[k * rows : (k + 1) * rows] for k in range(clients)]
    offline = served.offline(served.x[: clients * rows])

    def query(k: int, qid: int) -> list:
        tensor = proto.Tensor.from_numpy(xs[k])
        return proto.encode(proto.Query(qid, tuple(served.columns), (tensor,)))

    def reply(k: int, qid: int) -> proto.Reply:
        assert socks[k].poll(30_000), f"client {k}: no reply to {qid}"
        got = proto.decode(socks[k].recv_multipart())
        assert isinstance(got, proto.Reply) and got.qid == qid, got
        assert got.status == proto.SERVE_OK, (got.status, got.detail)
        return got

    try:
        for k in range(clients):  # connected and warm
            socks[k].send_multipart(query(k, 1))
            reply(k, 1)
        sizes: list[list[int]] = []
        for attempt in range(2, 7):  # one round is enough; a few guard a stalled scheduler
            for k in range(clients):
                socks[k].send_multipart(query(k, attempt))
            replies = [reply(k, attempt) for k in range(clients)]
            for k, got in enumerate(replies):  # ... and each got its own rows back
                out = np.array(got.tensors[0].numpy())
                np.testing.assert_allclose(out, offline[k * rows : (k + 1) * rows], atol=2e-6)
            sizes.append([got.batch_rows for got in replies])
            if max(sizes[-1]) > rows:
                break
    finally:
        for sock in socks:
            sock.close(linger=0)
    print(f"batch rows seen by {clients} concurrent requests of {rows} rows: {sizes}")
    assert max(sizes[-1]) > rows, sizes  # requests travelled together
    assert scrape(served.metrics_port, "traci_broker_serve_batch_requests_count") >= 1


@pytest.mark.timeout(200)
def test_bad_requests_get_error_replies_and_are_counted(served: Served) -> None:
    x, columns = served.x[:3], served.columns
    with Client(served.endpoint) as client:
        with pytest.raises(ServeError) as missing:
            client.predict(x[:, :-1], columns[:-1])
        nan = x.copy()
        nan[0, 0] = np.nan
        with pytest.raises(ServeError) as broken:
            client.predict(nan, columns)
        with pytest.raises(ServeError) as oversize:
            client.predict(np.repeat(x, 30, axis=0), columns)  # 90 rows > 64
        assert client.predict(x, columns).experts == (0, 1, 2, 3)  # still serving
    assert missing.value.status == "missing_columns" and columns[-1] in missing.value.detail
    assert broken.value.status == "bad_request" and "non_finite" in broken.value.detail
    assert oversize.value.status == "oversize"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.endpoint)
    sock.send_multipart([b"\xc1 not msgpack", b"junk"])
    assert sock.poll(10_000), "no error reply to garbage"
    from traci_ml import proto

    reply = proto.decode(sock.recv_multipart())
    assert isinstance(reply, proto.Reply) and reply.status == "bad_request"
    sock.close()
    ctx.term()
    port, name = served.metrics_port, "traci_broker_serve_requests_total"
    assert scrape(port, name, '{outcome="missing_columns"}') >= 1
    assert scrape(port, name, '{outcome="bad_request"}') >= 2
    assert scrape(port, name, '{outcome="oversize"}') >= 1
    assert scrape(port, "traci_broker_serve_latency_seconds_count") >= 1


@pytest.mark.timeout(200)
def test_traci_request_answers_a_csv(served: Served, tmp_path: Path) -> None:
    x = served.x[:3]
    rows = tmp_path / "rows.csv"
    lines = [",".join([*served.columns, "label"])]
    lines += [",".join([*(f"{v:.9g}" for v in row), "?"]) for row in x]
    rows.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([*TRACI, "request", "--endpoint", served.endpoint, "--input", str(rows)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, *body = proc.stdout.splitlines()
    assert header.split(",")[:3] == ["row", "prediction", "prob_0"] and len(body) == 3
    probs = np.array([[float(v) for v in line.split(",")[2:]] for line in body])
    np.testing.assert_allclose(probs, served.offline(x), atol=1e-6, rtol=0)
    assert "served by experts 0 (top_left), 1 (top_right)" in proc.stderr


@pytest.mark.timeout(200)
def test_sigkilled_expert_is_masked_and_replies_say_who_took_part(served: Served) -> None:
    x, columns = served.x[:20], served.columns
    os.kill(served.pids()["expert-2"], signal.SIGKILL)
    seen: list[tuple[int, ...]] = []
    with Client(served.endpoint) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pred = client.predict(x, columns)  # every request is answered meanwhile
            seen.append(pred.experts)
            if pred.experts == (0, 1, 3):
                break
    assert seen[-1] == (0, 1, 3), f"expert 2 never masked: {seen}"
    assert pred.expert_names == ("top_left", "top_right", "bottom_right")
    np.testing.assert_allclose(pred.outputs, served.offline(x, masked=(2,)), atol=2e-6, rtol=0)
    assert scrape(served.metrics_port, "traci_broker_serve_masked_total", '{expert="2"}') >= 1
    assert served.proc.poll() is None  # the rest goes on serving


# ---- beside training ----------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_serving_beside_training_leaves_training_intact(run_config) -> None:
    steps = 600
    path, cfg = run_config({"train": {"steps": steps, "batch_size": 32, "eval_every": 200}})
    run = Path(cfg["run_dir"])
    proc = subprocess.Popen([*TRACI, "up", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    columns = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    from sklearn.datasets import load_digits

    x = load_digits().data[:16].astype(np.float32)
    answered: list[tuple[float, tuple[int, ...]]] = []
    errors: dict[str, int] = {}
    with Client(f"tcp://127.0.0.1:{cfg['network']['serve_port']}") as client:
        while proc.poll() is None:
            try:
                pred = client.predict(x, columns, timeout=5)
                answered.append((time.time(), pred.experts))
            except ServeError as exc:  # before the start gate, and as the run ends
                errors[exc.status] = errors.get(exc.status, 0) + 1
                time.sleep(0.2)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    print(f"served {len(answered)} requests during training; errors {errors}")
    assert len(answered) >= 5
    assert set(errors) <= {"no_expert", "no_reducer", "shutdown", "timeout"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_times = [r["time"] for r in records if r["kind"] == "train"]
    first = answered[0][0]
    assert any(t > first for t in train_times), "no training step after the first answer"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["steps_skipped"] == 0
    for i in range(4):
        acc = json.loads((run / "experts" / f"expert-{i}.json").read_text())
        assert acc["applied"] == steps and acc["dropped"] == 0 and acc["rejected"] == 0
        assert acc["sent"] == acc["applied"] + acc["acked"] + acc["dropped"] + acc["inflight"]
        ledger = [int(s) for s in (run / "experts" / f"expert-{i}.applied").read_text().split()]
        assert len(ledger) == steps and ledger == sorted(set(ledger))
