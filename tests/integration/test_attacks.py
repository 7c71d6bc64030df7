"""Attacks on a live cluster, as an outsider or a broken party would make them (issue 9).

One clean `traci up` run, then the same run with a hostile expert (expert 1 sends 3e38 and
NaN embeddings, tests/helpers/hostile.py) while strangers on loopback try to take routes with
libzmq's predictable routing ids, register as held experts and the reducer, send a 3e38 EMB
and a 1e30 GRAD, and ask the front door to serve rows of 3e38. Every attempt must be refused
and counted, no stranger may receive a GRAD, a BATCH or a QUERY, no service may crash or
restart, the run must finish within a point of the clean run's accuracy, and no parameter or
optimizer state may be non-finite. A second test puts a hostile *reducer* (1e30 and NaN
gradients) in front of real experts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tests.helpers.cluster import TRACI, Cluster
from traci_ml import proto
from traci_ml.app.client import Client, ServeError
from traci_ml.core.config import load_config
from traci_ml.core.link import BrokerLink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]  # tests.helpers.hostile, for the experts
STEPS = 1500
RUN = {"train": {"steps": STEPS, "eval_every": 500, "checkpoint_every": 500}}
HOSTILE = {
    "expert": {
        "model": {
            "module": "tests.helpers.hostile:PoisonNet",
            "kwargs": {"victim": 1, "batch": 64},
        },
    }
}
# libzmq's automatic routing ids, the same in every run: 00 + glibc rand() with its seed
FIRST_IDS = {"expert": 0x6B8B4567, "reducer": 0xE43C9869, "client": 0xF4B0DC51}


def scrape(port: int) -> dict[tuple[str, str], float]:
    """{(metric name, labels text): value} from a metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def rejections(samples: dict, reason: str) -> float:
    return samples.get(("traci_broker_rejections_total", f'{{reason="{reason}"}}'), 0.0)


def all_finite(path: Path) -> bool:
    """Every tensor in a checkpoint (weights and optimizer state) is finite."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    found: list[torch.Tensor] = []

    def walk(node: object) -> None:
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(state)
    assert found, f"{path} holds no tensors"
    return all(bool(torch.isfinite(t.float()).all()) for t in found if t.is_floating_point())


class Stranger:
    """A DEALER on loopback that is not part of the run; records all it receives."""

    def __init__(self, ctx: zmq.Context, port: int, routing_id: bytes | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.got: list[proto.Message] = []

    def send(self, msg: proto.Message) -> None:
        self.sock.send_multipart(proto.encode(msg), copy=False)


def collect_all(strangers: list[Stranger], seconds: float) -> None:
    """What every stranger receives within ``seconds``, all polled at once (one after
    another took 0.3 s each: seconds in which a fast run could end)."""
    poller = zmq.Poller()
    by_sock = {s.sock: s for s in strangers}
    for sock in by_sock:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000) + 1):
            msg = proto.decode(sock.recv_multipart(), check_finite=False)
            by_sock[sock].got.append(msg)


def tensor(value: float, rows: int = 64, cols: int = 64) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, cols), value, dtype=np.float32))


def attack_routes(cfg: dict, ctx: zmq.Context) -> list[Stranger]:
    """Sixteen DEALERs with the first eight ids of the expert and the reducer socket (this
    aborted the broker inside libzmq under ROUTER_HANDOVER), four on the front door; each
    says HEARTBEAT and sends what its route would carry, with poisoned values."""
    net = cfg["network"]
    strangers = []
    for socket, port in (("expert", net["expert_port"]), ("reducer", net["reducer_port"]),
                         ("client", net["serve_port"])):  # fmt: skip
        for k in range(8 if socket != "client" else 4):
            rid = b"\x00" + (FIRST_IDS[socket] + k).to_bytes(4, "big")
            s = Stranger(ctx, port, rid)
            s.send(proto.Heartbeat())
            if socket == "expert":
                s.send(proto.Emb(600 + k, k % 4, "train", tensor(3e38)))
            elif socket == "reducer":
                s.send(proto.Grad(600 + k, -1, tuple(tensor(1e30) for _ in range(4))))
            strangers.append(s)
    return strangers


class Scrapes:
    """The broker's metrics, read every 0.25 s until ``stop``: the last good read and when.
    The run may end (and its endpoint with it) soon after the attacks on a fast machine;
    its counters only grow, so the last read before it ended holds every rejection."""

    def __init__(self, port: int) -> None:
        self.port, self.last, self.at = port, {}, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last, self.at = scrape(self.port), time.monotonic()
            except OSError:  # not up, or gone: keep the last good read
                pass
            self._stop.wait(0.25)

    def stop(self) -> dict[tuple[str, str], float]:
        self._stop.set()
        self._thread.join(10)
        return self.last


def clean_accuracy(run_config, tmp_path: Path) -> float:
    path, cfg = run_config({**RUN, "run_dir": str(tmp_path / "clean")})
    with Cluster(path, cfg) as cluster:
        code, out = cluster.finish(timeout=400)
        assert code == 0, out[-3000:]
        return cluster.summary()["test_accuracy"]


def test_attacks_on_a_live_cluster_are_refused_and_the_run_is_not_poisoned(
    run_config, tmp_path: Path, monkeypatch
) -> None:
    clean = clean_accuracy(run_config, tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    path, cfg = run_config({**RUN, **HOSTILE, "run_dir": str(tmp_path / "attacked")}, metrics=True)
    ctx = zmq.Context()
    try:
        with Cluster(path, cfg) as cluster:
            cluster.wait_for_step(100)
            scrapes = Scrapes(cfg["metrics"]["broker_port"])
            strangers = attack_routes(cfg, ctx)
            # registering as a live expert or the reducer with a valid-looking HELLO
            held = []
            for port, hello in (
                (cfg["network"]["expert_port"],
                 proto.Hello("expert", cfg["run_id"], cfg["embed_dim"], "float32", expert_id=2)),
                (cfg["network"]["reducer_port"],
                 proto.Hello("reducer", cfg["run_id"], cfg["embed_dim"], "float32", n_experts=4)),
            ):  # fmt: skip
                s = Stranger(ctx, port)
                s.send(hello)
                held.append(s)
            # the front door: rows of 3e38 get a named error, not a timeout
            columns = json.loads((cluster.run_dir / "preprocess.json").read_text())["columns"]
            client = Client.from_config(load_config(path), timeout=10)
            with pytest.raises(ServeError) as served:
                client.predict(np.full((2, len(columns)), 3e38, np.float32), columns)
            assert served.value.status == "expert_error", served.value
            assert "too_large" in str(served.value) or "non_finite" in str(served.value)
            with pytest.raises(ServeError) as served:
                client.predict(np.full((1, len(columns)), np.nan, np.float32), columns)
            assert served.value.status == "bad_request" and "non_finite" in str(served.value)
            client.close()
            collect_all([*strangers, *held], 0.3)
            attacked = time.monotonic()  # every attack answered, so counted
            time.sleep(2.0)
            collect_all([*strangers, *held], 0.1)
            code, out = cluster.finish(timeout=500)
            samples = scrapes.stop()
            assert scrapes.at > attacked, "the broker's metrics were never read after the attacks"
            assert code == 0, out[-4000:]
            summary = cluster.summary()
    finally:
        ctx.destroy(linger=0)

    # No stranger got anything of the run; each was told it is unregistered (or refused)
    for s in strangers:
        kinds = {m.KIND for m in s.got}
        assert kinds <= {"GOODBYE", "REPLY", "HEARTBEAT"}, kinds
        assert not any(isinstance(m, proto.Grad | proto.Batch | proto.Query) for m in s.got)
    for s in held:
        [welcome] = [m for m in s.got if isinstance(m, proto.Welcome)]
        assert not welcome.ok and welcome.reason.startswith(proto.HELD), welcome
    assert rejections(samples, "unregistered") >= 16
    assert rejections(samples, "held") >= 2
    # the hostile expert's poison was refused with its reason, and counted
    assert rejections(samples, "too_large") >= 1 and rejections(samples, "non_finite") >= 1
    log = (cluster.run_dir / "logs" / "expert-1.log").read_text()
    assert "too_large" in log and "non_finite" in log
    assert "restart" not in out and "exited with" not in out
    # the run is not poisoned
    assert summary["test_accuracy"] >= clean - 0.01, (summary["test_accuracy"], clean)
    for ckpt in sorted((cluster.run_dir / "checkpoints").glob("*.pt")):
        assert all_finite(ckpt), f"{ckpt.name} holds a non-finite value"
    print(f"\nattacks: clean accuracy {clean:.4f}, attacked {summary['test_accuracy']:.4f}; "
          f"rejections: " + ", ".join(f"{r} {rejections(samples, r):.0f}" for r in
          ("unregistered", "held", "too_large", "non_finite")))  # fmt: skip


# ---- a hostile reducer in front of real experts --------------------------------------


def test_a_hostile_reducer_cannot_poison_the_experts(tmp_path: Path, run_config) -> None:
    """A registered reducer answering with 1e30 and NaN gradients: the broker refuses them
    (the step is DROPped to its experts, never forwarded), the experts keep finite weights
    and Adam state, their accounts balance and the run finishes."""
    path, cfg = run_config(
        {"data": {"views": "halves"}, "train": {"steps": 120, "eval_every": 0,
         "checkpoint_every": 0}, "run_dir": str(tmp_path / "run")}, metrics=True)  # fmt: skip
    config = load_config(path)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    ctx = zmq.Context()
    try:
        for name, args in (("broker", ["broker"]), ("expert-0", ["expert", "--id", "0"]),
                           ("expert-1", ["expert", "--id", "1"])):  # fmt: skip
            with (logs / f"{name}.log").open("w") as log:
                procs.append(subprocess.Popen([*TRACI, *args, "--config", str(path)],
                                              stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        net = config.network
        hello = lambda: proto.Hello("reducer", config.run_id, config.embed_dim, "float32",  # noqa: E731
                                    n_experts=2)  # fmt: skip
        link = BrokerLink(ctx, f"tcp://127.0.0.1:{net.reducer_port}", hello,
                          heartbeat_interval=net.heartbeat_interval, liveness=net.liveness,
                          name="hostile-reducer")  # fmt: skip
        link.connect(timeout=60)
        answered, poisoned, total = 0, 0, None
        deadline = time.monotonic() + 120
        last = -1
        while time.monotonic() < deadline:
            msg = link.recv(0.2)
            if not isinstance(msg, proto.Batch):
                continue
            last = msg.seq
            if msg.phase == "eval":
                link.send(proto.Ack(msg.seq))
                continue
            shape = msg.tensors[0].shape
            value = 1e30 if msg.seq % 3 == 0 else float("nan") if msg.seq % 3 == 1 else 1e-3
            poisoned += msg.seq % 3 != 2
            grads = tuple(proto.Tensor.from_numpy(np.full(shape, value, np.float32))
                          for _ in msg.tensors)  # fmt: skip
            link.send(proto.Grad(msg.seq, -1, grads))
            answered += 1
            total = msg.seq
            if answered >= 60:
                break
        assert answered >= 60, f"only {answered} training steps reached the reducer"
        samples = scrape(cfg["metrics"]["broker_port"])
        link.send(proto.Goodbye("done"))
        link.close()
        for p in procs:
            assert p.wait(timeout=60) == 0, (logs / "broker.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        ctx.destroy(linger=0)
    assert total is not None and last >= total
    dropped = samples.get(("traci_broker_steps_dropped_total", '{reason="grad_rejected"}'), 0)
    assert dropped >= poisoned - 2  # the last ones may still be in flight at the scrape
    assert rejections(samples, "too_large") >= 1 and rejections(samples, "non_finite") >= 1
    run_dir = Path(cfg["run_dir"])
    for i in range(2):
        assert all_finite(run_dir / "checkpoints" / f"expert-{i}.pt")
        acc = json.loads((run_dir / "experts" / f"expert-{i}.json").read_text())
        assert acc["sent"] == acc["applied"] + acc["acked"] + acc["dropped"] + acc["inflight"]
        assert acc["applied"] <= answered - poisoned + 2
