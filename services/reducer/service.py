"""The reducer loop: for each BATCH (in seq order) run the Transformer, and for training
steps return dL/dtoken per present expert before stepping its own optimizer, so experts
work on the gradient while the reducer updates. Evaluation steps are answered with ACK.

Loop shape: poll -> decode -> on_<kind> -> tick, on ``time.monotonic()``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
import zmq
from torch.nn.utils import get_total_norm

from traci_ml import proto
from traci_ml.core import checkpoint, fits
from traci_ml.core.config import Config
from traci_ml.core.data import load_dataset, write_preprocess
from traci_ml.core.errors import CheckpointError, PeerTimeout
from traci_ml.core.files import write_json_atomic
from traci_ml.core.link import BrokerLink
from traci_ml.core.models.optim import set_weight_decay, weight_decay_for
from traci_ml.core.models.reducer import build_reducer, dropout_mask, loss_and_metric
from traci_ml.core.models.shards import ShardedStep
from traci_ml.core.rundir import RunDir
from traci_ml.core.schedule import Step, schedule_for, set_lr
from traci_ml.core.security import peer_keys, tcp_endpoint
from traci_ml.core.tensors import (
    TORCH_DTYPES,
    copy_into,
    host_buffer,
    resolve_device,
    to_wire,
)
from traci_ml.core.tracking import Tracking
from traci_ml.services.reducer.aligning import AlignDesk, LabelHolder
from traci_ml.services.reducer.evaluation import Evaluation
from traci_ml.services.reducer.metrics import ReducerMetrics
from traci_ml.services.reducer.runlog import MetricsLog, metric_name
from traci_ml.services.reducer.selection import ReducerSelection
from traci_ml.services.reducer.serving import (
    ServeSpec,
    absent_rows,
    answer,
    traced_for_serving,
)

log = logging.getLogger(__name__)
EMA = 0.9
CPU = torch.device("cpu")


class ReducerService:
    def __init__(
        self,
        config: Config,
        *,
        resume: bool = False,
        context: zmq.Context | None = None,
        metrics: ReducerMetrics | None = None,
        stop: threading.Event | None = None,
        serve: bool = False,
    ) -> None:
        self.config = config
        self.serving = serve  # `traci serve`: the checkpoint answers QBATCHes, no training
        self.resume = resume
        self.dataset = ds = load_dataset(config)
        self.schedule = schedule_for(config, ds)
        self.n = ds.n_experts
        self.device = resolve_device(config.reducer.device)
        self.wire_dtype = config.expert.dtype
        self.wire_max = torch.finfo(TORCH_DTYPES[self.wire_dtype]).max
        self.metrics = metrics or ReducerMetrics(self.n)
        self.stop_event = stop or threading.Event()
        self.labels = {  # by Step.source: train and val steps index the train split
            "train": torch.from_numpy(ds.y_train).to(self.device),
            "test": torch.from_numpy(ds.y_test).to(self.device),
        }
        self.model, self.optimizer = build_reducer(
            config, n_experts=self.n, out_dim=ds.out_dim, device=self.device,
            train_rows=len(self.schedule.fit_rows),
        )  # fmt: skip
        shards = config.reducer.shards
        self.sharded = ShardedStep(self.model, shards) if shards > 1 else None
        self.run_dir = RunDir(config.run_path)
        self.ckpt_path = self.run_dir.reducer_checkpoint
        self.last_seq = -1
        self.train_steps = 0
        self.participated = [0] * self.n  # train steps each expert's token was present in
        self.skipped = 0
        self.wire_train_bytes = 0  # BATCH + GRAD tensor bytes of the train steps taken
        self.wall_before = 0.0  # wall seconds of earlier lives (resume)
        # eval rounds and their history; the final round also row by row
        self.evaluation = Evaluation(ds, self.run_dir.eval_predictions, self.metrics)
        # model selection on the validation rounds: best weights, early stopping, test model
        self.selection = ReducerSelection(config, self.schedule, self.run_dir)
        self.ema: dict[str, float] = {}
        self.att_train = torch.zeros(self.n)
        # parties (docs/parties.md): answers the experts' ALIGN requests, in a thread
        self.holder = self._label_holder() if config.data.source == "parties" else None
        self.aligning = AlignDesk(
            self.holder, [v.name for v in ds.views], len(ds.y_train) + len(ds.y_test),
            barrier_timeout=config.network.connect_timeout, reject=self._reject,
            source=config.data.source,
        )  # fmt: skip
        self.rows_skipped: dict[str, int] = {}  # "<phase>/<reason>" -> labelled rows left out
        self.started_at: float | None = None
        self.window_start = (time.monotonic(), 0)  # for samples/s between log records
        if serve and not self.ckpt_path.exists():
            raise CheckpointError(f"{self.ckpt_path} is missing: train the run before serving")
        if (resume or serve) and self.ckpt_path.exists():
            self._restore()
        if serve:  # nothing is trained: eval mode once, not around every query
            self.model.eval()
        self._served: torch.nn.Module | None = None  # serve: the traced best model
        if resume and not serve:  # a best round the checkpoint missed; early stopping
            self.last_seq = self.selection.reconcile(self.last_seq)
        self.serve_spec = ServeSpec(
            n_experts=self.n, embed_dim=config.embed_dim, wire_dtype=self.wire_dtype,
            task=ds.task, classes=tuple(ds.classes) if ds.task == "classification" else (),
            y_mean=ds.y_mean, y_std=ds.y_std,
        )  # fmt: skip
        self.records = MetricsLog(self.run_dir.metrics)
        self.tracking: Tracking | None = None  # tracking.*: TensorBoard / MLflow, from run()
        self.context = context or zmq.Context.instance()
        net = config.network
        self.link = BrokerLink(
            self.context,
            tcp_endpoint(net.broker_host, net.reducer_port),
            self._hello,
            heartbeat_interval=net.heartbeat_interval,
            liveness=net.liveness,
            on_reject=self.metrics.reject,
            name="reducer",
            stop=self.stop_event,
            curve=peer_keys(config, "reducer"),  # None unless security.curve_dir is set
            checks_values=(proto.Batch, proto.QBatch),  # _validate, on_qbatch
        )

    def _label_holder(self) -> LabelHolder:
        ds, labels = self.dataset, self.config.data.labels
        assert ds.ids_train is not None and ds.ids_test is not None and labels is not None
        ids = np.concatenate([ds.ids_train, ds.ids_test])
        where = f"{labels.path} (id column {labels.id or self.config.data.id!r})"
        return LabelHolder(ids, "int" if ids.dtype.kind in "iu" else "str", len(ds.y_train),
                           len(ds.y_test), mode=self.config.data.align,
                           run_id=self.config.run_id, where=where)  # fmt: skip

    def _hello(self) -> proto.Hello:
        return proto.Hello(
            role="reducer",
            run_id=self.config.run_id,
            embed_dim=self.config.embed_dim,
            dtype=self.wire_dtype,
            n_experts=self.n,
            next_seq=self.last_seq + 1,
            **self.selection.decision.fields(),  # a restarted broker learns it from here
        )

    # -- main loop --------------------------------------------------------------------

    def run(self) -> int:
        if not self.serving:  # serving leaves the run's files as training wrote them
            write_json_atomic(self.run_dir.config_json, self.config.to_dict())
            if self.holder is None:  # parties: each expert keeps its own statistics
                write_preprocess(self.config, self.run_dir)  # for `traci predict`, serving
            if not self.resume:
                self.selection.fresh()
            self._start_tracking()
        if self.serving:
            self._served_model()  # traced before the first query, not during it
        self.link.connect(timeout=self.config.network.connect_timeout)
        # a resumed run that had ended (its steps, or early stopping): nothing left to do
        finished = not self.serving and self.last_seq >= self.schedule.total - 1
        try:
            while not finished and not self.stop_event.is_set():
                msg = self.link.recv(self.config.network.heartbeat_interval / 2)
                if msg is not None:
                    finished = self._guarded(msg)
                self._tick()
        finally:
            self._close(finished)
        return 0

    def _tick(self) -> None:
        for reply in self.aligning.tick(time.monotonic()):
            self.link.send(reply)
        try:
            self.link.tick()
        except PeerTimeout as exc:
            log.warning("reducer: %s; reconnecting", exc)
            self.link.connect(timeout=self.config.network.connect_timeout)

    # -- one step ---------------------------------------------------------------------

    def _guarded(self, msg: proto.Message) -> bool:
        """Dispatch one message; a bug it triggers is counted and logged, never fatal."""
        try:
            if isinstance(msg, proto.QBatch):
                self.on_qbatch(msg)
            elif isinstance(msg, proto.Batch) and self.serving:
                self._reject("unexpected_kind", "serving: no training steps", msg)
            elif isinstance(msg, proto.Batch):
                self.metrics.wire.labels(direction="received").inc(
                    sum(t.nbytes for t in msg.tensors))  # fmt: skip
                return self.on_batch(msg)
            elif isinstance(msg, proto.Align):
                self.on_align(msg)
            elif isinstance(msg, proto.Goodbye):
                log.warning("reducer: broker says goodbye (%s); registering again", msg.reason)
                self.link.connect(timeout=self.config.network.connect_timeout)
            elif not isinstance(msg, proto.Heartbeat):
                self._reject("unexpected_kind", f"{msg.KIND} is not for the reducer")
        except Exception:
            log.exception("reducer: internal error on %s", msg.KIND)
            self._reject("internal", "see the traceback above", msg)
        return False

    def on_align(self, msg: proto.Align) -> None:
        """An expert's ALIGN: a request (answered from a thread, ``AlignDesk``) or the
        notice of how many labelled rows it holds."""
        for reply in self.aligning.on_align(msg, time.monotonic()):
            self.link.send(reply)
        if msg.stage == "held" and 0 <= msg.expert_id < self.n:
            held = self.aligning.overlap.get(self.dataset.views[msg.expert_id].name)
            if held is not None:
                self.metrics.overlap.labels(expert=str(msg.expert_id)).set(held["overlap"])

    def on_qbatch(self, msg: proto.QBatch) -> None:
        """A served query (docs/serving.md): eval mode, no grad, outputs back; the training
        state (mode, optimizer, seq, records) is left as it was."""
        t0 = time.monotonic()
        problem = proto.value_problem(msg.tensors, self.config.security.max_abs_value)
        try:
            if problem is not None:  # the broker checks QEMBs; never feed the model such values
                out = proto.QOut(msg.qid, problem[0], problem[1], self.serve_spec.task, (), ())
            else:
                # `traci serve` answers with the best validation round's weights, as `traci
                # predict` does; a training run with its current ones.
                model = self._served_model() if self.serving else self.model
                out = answer(model, msg, self.serve_spec, self.device)
        except Exception as exc:  # the client gets reducer_error, never silence
            log.exception("reducer: internal error on QBATCH %d", msg.qid)
            out = proto.QOut(msg.qid, "internal", repr(exc)[:200], self.serve_spec.task, (), ())
        spent = time.monotonic() - t0
        self.link.send(replace(out, compute_us=round(spent * 1e6)))  # the broker's hops
        self.metrics.served(out.status, spent)

    def _served_model(self) -> torch.nn.Module:
        """`traci serve`: the best round's model, traced once (``traced_for_serving``)."""
        if self._served is None:
            best = self.selection.test_model(self.model)
            self._served, how = traced_for_serving(best, self.serve_spec, self.device)
            log.info("reducer: serving the %s model (%s)",
                     "best round's" if best is not self.model else "last", how)  # fmt: skip
        return self._served

    def on_batch(self, msg: proto.Batch) -> bool:
        """Process one BATCH; True when it was the last step of the run."""
        t0 = time.monotonic()
        tokens = self._validate(msg)
        if tokens is None:
            return False
        if self.started_at is None:
            self.started_at = t0
            self.aligning.open_barrier("training has begun")  # nobody waits for the others
        step = self.schedule.step(msg.seq)
        self.skipped += msg.seq - self.last_seq - 1
        self.metrics.skipped.inc(msg.seq - self.last_seq - 1)
        self.last_seq = msg.seq
        rows = torch.as_tensor(self.schedule.rows(step), device=self.device)
        # (B, N) from the BATCH's fields: decided on the host, no device sync per step
        absent = absent_rows(msg.present, msg.rows, len(rows), CPU)
        keep = self._rows_kept(step.phase, absent)
        if keep is not None:
            absent, keep = absent[keep], keep.to(self.device)
            tokens, rows = tokens[:, keep], rows[keep]
        absent = absent.to(self.device)
        y = self.labels[step.source][rows]
        if step.phase == "train" and not len(rows):
            self._refuse(msg.seq, "no_rows", "no row of this step is held by the experts")
        elif step.phase == "train":
            self._train_step(msg, step.index, tokens, absent, y, keep)
        else:
            self._eval_step(msg, step, tokens, absent, y, rows)
        self.metrics.steps.labels(phase=step.phase).inc()
        self.metrics.step_time.labels(phase=step.phase).observe(time.monotonic() - t0)
        self.metrics.present.set(sum(msg.present))
        return msg.seq == self.schedule.total - 1

    def _participation(self, present: tuple[bool, ...]) -> None:
        """Count the experts of a train step (the deadline join masks a late one)."""
        steps = max(self.train_steps, 1)
        for i, p in enumerate(present):
            self.participated[i] += p
            self.metrics.participation.labels(expert=str(i)).set(self.participated[i] / steps)

    def _rows_kept(self, phase: str, absent: torch.Tensor) -> torch.Tensor | None:
        """The rows of a step that count (None: all of them): not those no expert holds,
        and in training with ``data.train_rows: shared`` only those every expert holds."""
        if not bool(absent.any()):
            return None
        held = ~absent
        keep = held.any(dim=1)
        self._skip_rows(phase, "no_expert", int((~keep).sum()))
        if phase == "train" and self.config.data.train_rows == "shared":
            shared = held.all(dim=1)
            self._skip_rows(phase, "not_shared", int((keep & ~shared).sum()))
            keep = shared
        return None if bool(keep.all()) else keep

    def _skip_rows(self, phase: str, reason: str, n: int) -> None:
        if n:
            key = f"{phase}/{reason}"
            self.rows_skipped[key] = self.rows_skipped.get(key, 0) + n
            self.metrics.rows_skipped.labels(phase=phase, reason=reason).inc(n)

    def _validate(self, msg: proto.Batch) -> torch.Tensor | None:
        """Checks the BATCH against the schedule; returns tokens (N, B, d) on the device."""
        problem = proto.value_problem(msg.tensors, self.config.security.max_abs_value)
        if problem is not None:  # NaN/Inf or absurd tokens would poison the weights
            return self._reject(*problem, msg)
        if msg.seq <= self.last_seq:
            return self._reject("replay", f"BATCH seq {msg.seq} <= last {self.last_seq}", msg)
        if msg.seq >= self.schedule.total:
            return self._reject("unknown_step", f"BATCH seq {msg.seq} beyond the schedule", msg)
        step = self.schedule.step(msg.seq)
        want = (len(self.schedule.rows(step)), self.config.embed_dim)
        if msg.phase != step.phase or len(msg.present) != self.n:
            return self._reject("conflict", f"phase {msg.phase} / {len(msg.present)} experts", msg)
        if msg.tensors[0].shape != want or msg.tensors[0].dtype != self.wire_dtype:
            return self._reject("conflict", f"tokens {msg.tensors[0].shape}, want {want}", msg)
        host = host_buffer((self.n, *want), TORCH_DTYPES[self.wire_dtype], self.device)
        host.zero_()
        for i, t in zip((i for i, p in enumerate(msg.present) if p), msg.tensors, strict=True):
            copy_into(host[i], t)
        return host.to(self.device, non_blocking=True).float()  # (N, B, d)

    def _train_step(
        self,
        msg: proto.Batch,
        index: int,
        tokens: torch.Tensor,
        absent: torch.Tensor,
        y: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> None:
        """One train step over the kept rows; ``keep`` (B,) says which rows of the BATCH
        those are (None: all): the GRAD covers every row, zero for the others."""
        self.model.train()
        masked = dropout_mask(self.config, absent, msg.seq)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded is not None and len(y) >= 2 * self.sharded.shards:
            loss, metric, att, grads = self.sharded(self.dataset.task, tokens, masked, y)
        else:
            tokens.requires_grad_(True)
            logits, att = self.model(tokens.transpose(0, 1), masked)  # (B, out), (B, N)
            loss, metric = loss_and_metric(self.dataset.task, logits, y)
            loss.backward()
            grads = tokens.grad  # (N, B_kept, d)
        if keep is not None:
            full = grads.new_zeros(grads.shape[0], len(keep), grads.shape[2])
            full[:, keep] = grads
            grads = full
        problem = self._grad_problem(loss, grads)
        if problem is not None:
            self._refuse(msg.seq, *problem)
            return
        wire = tuple(to_wire(grads[i], self.wire_dtype) for i, p in enumerate(msg.present) if p)
        self.link.send(proto.Grad(msg.seq, -1, wire))
        sent = sum(t.nbytes for t in wire)
        self.metrics.wire.labels(direction="sent").inc(sent)
        self.wire_train_bytes += sent + sum(t.nbytes for t in msg.tensors)
        set_lr(self.optimizer, self.config.reducer.lr, index, self.config.train)
        self.optimizer.step()  # after the send: experts apply their slices meanwhile
        self.train_steps += 1
        self.metrics.samples.inc(len(y))
        self._participation(msg.present)  # before the record that reports it
        self._track(loss.item(), metric, att, masked)
        every = self.config.train.checkpoint_every
        if every and self.train_steps % every == 0:
            self.save()

    def _grad_problem(self, loss: torch.Tensor, grads: torch.Tensor) -> tuple[str, str] | None:
        """Why this step must not be applied, or None: a non-finite loss, a non-finite
        gradient (of a token or a parameter), a token gradient beyond the bound every peer
        holds values to (``security.max_abs_value``). One device sync for all of it."""
        params = get_total_norm(  # max |dL/dparam| per tensor, no copy of the gradients
            [p.grad for p in self.model.parameters() if p.grad is not None], norm_type=math.inf
        )
        worst = torch.stack(
            [loss.detach().abs(), grads.detach().abs().amax(), params]
        ).tolist()  # (|loss|, max |dL/dtoken|, max |dL/dparam|); NaN propagates
        # beyond the wire dtype's range a value would arrive as Inf (float16: 65504)
        bound = min(self.config.security.max_abs_value, self.wire_max)
        if not math.isfinite(worst[0]):
            return "non_finite_loss", f"loss {worst[0]}"
        if not (math.isfinite(worst[1]) and math.isfinite(worst[2])):
            return "non_finite_grad", f"max |grad| token {worst[1]}, parameter {worst[2]}"
        if worst[1] > bound:
            return "too_large", f"token gradient {worst[1]:.3g} beyond the bound {bound:.3g}"
        return None

    def _refuse(self, seq: int, reason: str, detail: str) -> None:
        """Skip a computed train step: no GRAD, no optimizer step (weights and Adam state as
        they were), DROP so the experts free the step at once. The run goes on."""
        self.optimizer.zero_grad(set_to_none=True)
        self.metrics.refused.labels(reason=reason).inc()
        log.warning("reducer step seq %d not applied (%s): %s; DROP sent", seq, reason, detail)
        self.link.send(proto.Drop(seq, reason))

    def _eval_step(
        self,
        msg: proto.Batch,
        step: Step,
        tokens: torch.Tensor,
        absent: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """A validation batch (the model), or a test batch (the best round's model). The
        ACK goes at once, but a validation round's last waits for the round's decision,
        which it carries (docs/protocol.md "Model selection")."""
        test = step.split == "test" and step.round == self.schedule.test_round
        model = self.selection.test_model(self.model) if test else self.model
        model.eval()
        x = tokens.transpose(0, 1)  # (B, N, d)
        with torch.no_grad():
            logits, att = model(x, absent)
        decides = step.split == "val" and step.last_in_round
        if step.split == "val":
            self.selection.saw(step, msg.present)
        if not decides:
            self.link.send(self.selection.ack(msg.seq))
        self.evaluation.add(logits, y, att, absent, rows, (step.split, step.round))
        if test:  # graceful degradation: the same rows with each single expert masked
            self.evaluation.add_missing(model, x, absent, y)
        if step.last_in_round:
            self._finish_eval_round(step, test=test)
        if decides:
            self.save()  # the decision, on disk before any expert hears it
            self.link.send(self.selection.ack(msg.seq))

    # -- records ----------------------------------------------------------------------

    def _track(self, loss: float, metric: float, att: torch.Tensor, absent: torch.Tensor) -> None:
        for key, value in (("loss", loss), ("metric", metric)):
            self.ema[key] = (
                value if key not in self.ema else EMA * self.ema[key] + (1 - EMA) * value
            )
        present = (~absent).float()
        att_now = ((att.detach() * present).sum(0) / present.sum(0).clamp(min=1)).cpu()
        self.att_train = (
            att_now if self.train_steps == 1 else EMA * self.att_train + (1 - EMA) * att_now
        )
        self.metrics.loss.set(self.ema["loss"])
        self.metrics.train_metric.set(self.ema["metric"])
        if self.train_steps % self.config.train.log_every == 0:
            now = time.monotonic()
            t_prev, s_prev = self.window_start
            sps = (
                (self.train_steps - s_prev) * self.config.train.batch_size / max(now - t_prev, 1e-9)
            )
            self.window_start = (now, self.train_steps)
            for i, a in enumerate(self.att_train.tolist()):
                self.metrics.attention.labels(expert=str(i), phase="train").set(a)
            self.records.write(
                {
                    "kind": "train",
                    "step": self.train_steps,
                    "seq": self.last_seq,
                    "loss": loss,
                    "loss_avg": self.ema["loss"],
                    f"train_{metric_name(self.dataset.task)}": self.ema["metric"],
                    "samples_per_sec": sps,
                    "wall_seconds": self.wall_seconds(),
                    "skipped": self.skipped,
                    "attention": [round(a, 6) for a in self.att_train.tolist()],
                    # share of the train steps so far each expert took part in
                    "participation": [round(n / self.train_steps, 6) for n in self.participated],
                }
            )

    def _finish_eval_round(self, step: Step, *, test: bool = False) -> None:
        judge = None
        if step.split == "val":
            judge = partial(self.selection.decide, step, model=self.model,
                            train_steps=self.train_steps, seq=self.last_seq)  # fmt: skip
        record = self.evaluation.finish(
            self.records, step=self.train_steps, seq=self.last_seq,
            wall_seconds=self.wall_seconds(), test=test, judge=judge,
            kind="test" if test and self.schedule.selecting else "eval",
        )  # fmt: skip
        name = metric_name(self.dataset.task)
        log.info("reducer %s after step %d: loss %.4f %s %.4f%s", record["kind"],
                 self.train_steps, record["loss"], name, record[name],
                 " (best so far)" if record.get("best") else "")  # fmt: skip

    def _start_tracking(self) -> None:
        """TensorBoard / MLflow copies of the records (docs/tracking.md); a resume continues
        the same MLflow run and TensorBoard directory from the restored step."""
        failures = self.metrics.tracking_failures
        self.tracking = Tracking.for_run(
            self.config, self.run_dir, experts=[v.name for v in self.dataset.views],
            first_step=self.train_steps, resume=self.resume,
            on_failure=lambda name: failures.labels(tracker=name).inc(),
        )  # fmt: skip
        if self.tracking is not None:
            self.records.sinks.append(self.tracking.record)

    def wall_seconds(self) -> float:
        since = 0.0 if self.started_at is None else time.monotonic() - self.started_at
        return self.wall_before + since

    def summary(self) -> dict[str, Any]:
        out = self.evaluation.summary(
            run_id=self.config.run_id, steps=self.train_steps, skipped=self.skipped,
            wall=self.wall_seconds(), batch_size=self.config.train.batch_size,
            attention_train=self.att_train.tolist(), overlap=self.aligning.overlap,
            rows_skipped=self.rows_skipped,
        )  # fmt: skip
        # BATCH + GRAD tensor bytes per train step (docs/compression.md)
        out["wire_bytes_per_step"] = self.wire_train_bytes / max(self.train_steps, 1)
        # share of train steps each expert took part in (the deadline join masks late ones)
        steps = max(self.train_steps, 1)
        out["participation"] = {str(i): n / steps for i, n in enumerate(self.participated)}
        out.update(self.selection.summary())  # best round, stop_reason
        return out

    # -- checkpoints and exit ---------------------------------------------------------

    def save(self) -> None:
        checkpoint.save_atomic(
            {
                "run_id": self.config.run_id,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "last_seq": self.last_seq,
                "train_steps": self.train_steps,
                "skipped": self.skipped,
                "wall_seconds": self.wall_seconds(),
                "history": self.evaluation.history,
                "test": self.evaluation.test,
                "selection": self.selection.state(),
                "overlap": self.aligning.overlap,
                "rows_skipped": self.rows_skipped,
                "wire_train_bytes": self.wire_train_bytes,
                "participated": self.participated,
            },
            self.ckpt_path,
        )

    def _restore(self) -> None:
        state = checkpoint.load(self.ckpt_path, run_id=self.config.run_id)
        # one line naming what differs (a changed data.views ...): exit 2, never restarted
        fix = fits.remedy(self.config, serve=self.serving)
        fits.reducer_weights(self.config, state, self.ckpt_path, self.model, fix=fix)
        checkpoint.load_into(self.optimizer, state, "optimizer", self.ckpt_path)
        # the configured penalty, not the saved one (as the experts take theirs when aligned)
        set_weight_decay(self.optimizer, weight_decay_for(self.config.reducer.weight_decay,
                                                          len(self.schedule.fit_rows)))  # fmt: skip
        self.last_seq, self.train_steps = state["last_seq"], state["train_steps"]
        self.skipped, self.wall_before = state["skipped"], state["wall_seconds"]
        self.evaluation.history = state["history"]
        self.evaluation.test = state.get("test")
        self.selection.restore(state.get("selection"))
        self.aligning.overlap = state.get("overlap", {})
        self.rows_skipped = state.get("rows_skipped", {})
        self.wire_train_bytes = state.get("wire_train_bytes", 0)
        self.participated = list(state.get("participated", [0] * self.n))
        log.info("reducer resumed from %s at seq %d", self.ckpt_path, self.last_seq)

    def _close(self, finished: bool) -> None:
        self.aligning.close()
        if self.sharded is not None:
            self.sharded.close()
        if not self.serving:
            self.save()
        summary = self.summary() if finished and not self.serving else None
        if self.tracking is not None:  # a bounded wait; the report goes into summary.json
            report = self.tracking.close(summary, finished=finished)
            if summary is not None:
                summary["tracking"] = report
        if summary is not None:
            write_json_atomic(self.run_dir.summary, summary)
        try:
            self.link.send(proto.Goodbye("done" if finished else "shutdown"))
        except zmq.ZMQError:
            pass
        self.link.close()
        self.records.close()
        log.info("reducer stopped after %d train steps (finished=%s)", self.train_steps, finished)

    def _reject(self, reason: str, what: str, msg: proto.Message | None = None) -> None:
        """Count and log; a refused BATCH is answered DROP so the broker frees the experts."""
        self.metrics.reject(reason)
        if isinstance(msg, proto.Batch):
            log.warning("reducer rejected BATCH seq %d (%s): %s", msg.seq, reason, what)
            self.link.send(proto.Drop(msg.seq, reason))
        else:
            log.warning("reducer rejected a message (%s): %s", reason, what)
        return None
