"""The expert loop: send target embeddings for steps in order, keep at most ``window`` in
flight, apply each gradient once to the online net of the step it belongs to, soft-update.

Loop shape: produce (fill the window) -> poll -> decode -> on_<kind> -> tick (heartbeats,
in-flight timeouts, checkpoints), all on ``time.monotonic()``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import zmq

from traci_ml import proto
from traci_ml.core import checkpoint, fits
from traci_ml.core.align import IdIndex, RowMap
from traci_ml.core.config import Config
from traci_ml.core.data import fit_positions, load_expert_data
from traci_ml.core.errors import CheckpointError, DataError, PeerTimeout
from traci_ml.core.feedback import ErrorFeedback
from traci_ml.core.files import write_json_atomic
from traci_ml.core.link import BrokerLink
from traci_ml.core.models.expert import build_expert, input_noise, input_noise_for, polyak_update
from traci_ml.core.models.optim import set_weight_decay, weight_decay_for
from traci_ml.core.rundir import RunDir
from traci_ml.core.schedule import Schedule, Step, make_schedule, set_lr
from traci_ml.core.security import peer_keys, tcp_endpoint
from traci_ml.core.selection import Decision
from traci_ml.core.stream import Stream
from traci_ml.core.tensors import from_wire, resolve_device, to_wire
from traci_ml.services.expert.aligning import Aligner
from traci_ml.services.expert.ledger import Accounts, InFlight, Ledger
from traci_ml.services.expert.metrics import ExpertMetrics
from traci_ml.services.expert.selection import ExpertSelection
from traci_ml.services.expert.serving import QueryView

log = logging.getLogger(__name__)
ALIGN_RESEND = 60.0  # seconds without an answer before an ALIGN request is sent again


class ExpertService:
    def __init__(
        self,
        config: Config,
        expert_id: int,
        *,
        resume: bool = False,
        context: zmq.Context | None = None,
        metrics: ExpertMetrics | None = None,
        stop: threading.Event | None = None,
        serve: bool = False,
    ) -> None:
        # This expert's own rows (parties: its own file; one table: its view's columns)
        self.data = load_expert_data(config, expert_id)
        self.config, self.id = config, expert_id
        self.name = f"expert-{expert_id}"
        self.device = resolve_device(config.expert.device)
        self.wire_dtype = config.expert.dtype
        # error feedback on the embeddings sent (docs/compression.md): a residual per own row
        self.feedback = (ErrorFeedback(len(self.data.table), config.embed_dim)
                         if config.expert.error_feedback else None)  # fmt: skip
        self.metrics = metrics or ExpertMetrics(expert_id)
        self.stop_event = stop or threading.Event()
        # Set by _adopt once the rows are aligned (parties: after ALIGN, in run()).
        self.schedule: Schedule | None = None
        self.rows: RowMap | None = None
        self.table: torch.Tensor | None = None  # (n, F_i) standardised, on the device
        self.noise = 0.0  # sd of the train steps' input noise, known once aligned (_adopt)
        self.id_index: IdIndex | None = None  # served queries by id: built on the first
        self.online, self.target, self.optimizer = build_expert(
            config, expert_id, self.data.table.shape[1], self.device
        )
        self.inflight: OrderedDict[int, InFlight] = OrderedDict()
        self.accounts = Accounts()
        self.seq_next = 0
        # Skipping ahead when late (DROP(late) names the others' frontier): where the frontier
        # was last seen, how fast it moves (steps/s), and how long one EMB takes to produce.
        self._frontier: tuple[int, float] | None = None
        self._frontier_rate = 0.0
        self._emb_seconds = 0.0
        # The compute stream (``core/stream.py``): the nets' work, in order, beside this
        # thread's messages. ``_epoch`` bumps with every registration (queued EMBs of an
        # older one are not sent); (seq, weights version, online output): _forward_ahead's.
        self.stream = Stream(f"{self.name}-compute", lambda exc: self._reject("internal"))
        self._epoch = 0
        self._ahead: tuple[int, int, torch.Tensor] | None = None
        self._ahead_asked: InFlight | None = None
        self._save_due = False
        self.run_dir = RunDir(config.run_path)
        self.ckpt_path = self.run_dir.expert_checkpoint(expert_id)
        # model selection: candidates, the best round's target, the reducer's decision
        self.selection = ExpertSelection(config, expert_id, self.run_dir)
        self.resume = resume
        # The applied ledger: one line per gradient applied, across restarts. It proves
        # "at most once". Opened by run().
        self.ledger = Ledger(self.run_dir.ledger(expert_id), self.name)
        # Its length in bytes that agrees with the model: the checkpoint's, or 0 when the
        # nets are fresh. run() cuts the file to it before appending (None: leave it as is).
        self.ledger_at: int | None = 0
        self.restored = False
        # serve: `traci serve` -- the latest checkpoint answers QUERYs, nothing is trained
        self.serving = serve
        self.query_view: QueryView | None = None  # built for the first QUERY
        if serve and not self.ckpt_path.exists():
            raise CheckpointError(f"{self.ckpt_path} is missing: train the run before serving")
        if (resume or serve) and self.ckpt_path.exists():
            self._restore()
        if self.data.rows is not None:  # one table: aligned by row number already
            self._adopt(self.data.rows)
        elif serve:  # parties: standardised as in training (the checkpoint's statistics)
            self._adopt(None)
        if serve:  # now, not on the first query
            self.query_view = self._query_view()
        self.context = context or zmq.Context.instance()
        net = config.network
        self.link = BrokerLink(
            self.context,
            tcp_endpoint(net.broker_host, net.expert_port),
            self._hello,
            heartbeat_interval=net.heartbeat_interval,
            liveness=net.liveness,
            on_reject=self._reject,
            name=self.name,
            stop=self.stop_event,
            curve=peer_keys(config, self.name),  # None unless security.curve_dir is set
            checks_values=(proto.Grad, proto.Query),  # on_grad, on_query
        )

    def _hello(self) -> proto.Hello:
        return proto.Hello(
            role="expert",
            run_id=self.config.run_id,
            embed_dim=self.config.embed_dim,
            dtype=self.wire_dtype,
            expert_id=self.id,
            window=self.config.expert.window,
            next_seq=self.seq_next,
        )

    # -- main loop --------------------------------------------------------------------

    def run(self) -> int:
        if not self.serving:
            if not self.resume:
                self.selection.fresh()
            self._open_ledger()
        self._register()
        finished = False
        try:
            if self.schedule is None and not self.serving:
                self._align()
            while not finished and not self.stop_event.is_set():
                self._produce()
                self._forward_ahead()  # the next gradient's forward, while it travels
                wait = 0.0 if self._can_send() else self.config.network.heartbeat_interval / 2
                msg = self.link.recv(wait)
                if msg is not None:
                    finished = self._guarded(msg)
                if self._save_due:  # checkpoint_every: at a quiet point of the stream
                    self._save_due = False
                    self.stream.drain()
                    self.save()
                finished = finished or self._tick()
        finally:
            self._close()
        return 0

    def _register(self) -> None:
        welcome = self.link.connect(timeout=self.config.network.connect_timeout)
        self._drop_all("broker_lost")
        if welcome is not None:  # None: stopped while waiting
            self.seq_next = welcome.start_seq

    def _can_send(self) -> bool:
        if (
            self.schedule is None
            or len(self.inflight) >= self.config.expert.window
            or self.seq_next >= self.schedule.total
            or self.serving
        ):
            return False
        # An eval batch waits until every train step in flight is applied, so an evaluation
        # round (and the final one) sees the target after all training before it: the same
        # weights the final checkpoint holds (docs/predict.md, "Exactness"). The window only
        # drains at eval boundaries, so this costs almost nothing.
        if self.selection.blocked(self.seq_next, self.schedule, self.inflight.values()):
            return False  # it waits for the reducer's decision on the round before
        if self.schedule.step(self.seq_next).phase == "eval":
            return all(p.step.phase == "eval" for p in self.inflight.values())
        return True

    def _produce(self) -> None:
        """Fill the window: target embeddings for the next steps, in seq order (made and
        sent by the compute stream, in the order asked)."""
        while self._can_send():
            assert self.schedule is not None and self.rows is not None  # _can_send says so
            step = self.schedule.step(self.seq_next)
            local, present = self.rows.lookup(step.source, self.schedule.rows(step))
            rows = torch.as_tensor(local, device=self.device)
            held = self._held(present)
            # Account first, then send: the books balance at every instant.
            self.inflight[step.seq] = InFlight(step, rows, held, time.monotonic(),
                                               self.accounts.applied)  # fmt: skip
            self.accounts.sent += 1
            self.metrics.sent.labels(expert=str(self.id), phase=step.phase).inc()
            self.seq_next += 1
            self.stream.submit(self._send_emb, step, local, present, rows, held, self._epoch)
        self.metrics.inflight.set(len(self.inflight))
        self.metrics.seq.set(self.seq_next)

    def _send_emb(self, step: Step, local: np.ndarray, present: np.ndarray | None,
                  rows: torch.Tensor, held: torch.Tensor | None, epoch: int) -> None:  # fmt: skip
        """(stream) The target embedding of ``step``'s rows, sent as its EMB -- unless the
        expert registered again meanwhile (``epoch``): that step is gone."""
        t0 = time.perf_counter()
        net = self.target
        assert self.schedule is not None  # a step was made from it
        if step.split == "val":  # its target of this round, on disk before the reducer sees it
            self.selection.candidate(step, self.target, self.schedule)
        elif step.split == "test" and self.schedule.selecting:
            net = self.selection.test_net(self.target)  # the best round's
        with torch.no_grad():
            noisy = step.seq if step.phase == "train" else None  # input noise: train only
            emb = self._embed(net, rows, held, noisy)  # (B, d), zeros where absent
        wire = self._emb_wire(step.phase, local, present, emb)
        if epoch != self._epoch:
            return
        bits = b"" if present is None else proto.pack_rows(present)
        self.link.post(proto.Emb(step.seq, self.id, step.phase, wire, bits))
        self._emb_seconds += 0.2 * (time.perf_counter() - t0 - self._emb_seconds)

    def _emb_wire(self, phase: str, local: np.ndarray, present: np.ndarray | None,
                  emb: torch.Tensor) -> proto.Tensor:  # fmt: skip
        """The wire tensor of a step's embedding ``emb`` of own rows ``local``; with error
        feedback (train steps), each held row's residual added first (docs/compression.md).
        Its bytes are counted."""
        if self.feedback is not None and phase == "train":
            wire = self.feedback.compress(local, emb, self.wire_dtype, present)
        else:
            wire = to_wire(emb, self.wire_dtype)
        self.metrics.wire_bytes("sent", wire.nbytes)
        return wire

    def _forward_ahead(self) -> None:
        """Queue the online forward (with its graph) of the oldest train step in flight,
        whose GRAD comes next (the broker answers in seq order), behind the EMBs: while the
        gradient travels the stream computes it, and applying it is then the backward only.
        Once per step in flight."""
        if not self.inflight:
            return
        seq, pending = next(iter(self.inflight.items()))
        if pending.step.phase == "train" and self._ahead_asked is not pending:
            self._ahead_asked = pending
            self.stream.submit(self._ahead_of, seq, pending)

    def _ahead_of(self, seq: int, pending: InFlight) -> None:
        """(stream) The online output for step ``seq``, kept with the weights' version
        (``accounts.applied``): valid only if no gradient is applied before its own --
        always at window 1, where it takes one pass off every step."""
        if self._ahead_valid(self._ahead, seq):
            return
        if len(pending.held_rows):
            self.online.train()
            x = self._inputs(pending.rows, pending.held, seq)
            self._ahead = (seq, self.accounts.applied, self.online(x))

    def _ahead_valid(self, ahead: tuple[int, int, torch.Tensor] | None, seq: int) -> bool:
        """Whether ``ahead`` is step ``seq``'s online output under the current weights."""
        return ahead is not None and ahead[:2] == (seq, self.accounts.applied)

    def _held(self, present: np.ndarray | None) -> torch.Tensor | None:
        """The positions of the held rows, found on the host (no device sync per step)."""
        return None if present is None else torch.as_tensor(np.flatnonzero(present),
                                                             device=self.device)  # fmt: skip

    def _inputs(self, rows: torch.Tensor, held: torch.Tensor | None,
                noisy: int | None = None) -> torch.Tensor:  # fmt: skip
        """The net's inputs for own rows ``rows`` (B,), only the ``held`` positions (None:
        all); with ``noisy``, a train step's seq, plus that step's input noise
        (``expert.input_noise``: the same draw for its EMB and its online pass)."""
        assert self.table is not None
        if noisy is None or not self.noise:  # one gather, as before there was noise
            return self.table[rows if held is None else rows[held]]
        x = self.table[rows]  # every row of the step draws its noise, held or not
        x = x + input_noise(self.noise, self.config.seed, self.id, noisy, tuple(x.shape),
                            self.device)  # fmt: skip
        return x if held is None else x[held]

    def _embed(self, net: torch.nn.Module, rows: torch.Tensor, held: torch.Tensor | None,
               noisy: int | None = None):  # fmt: skip
        """``net`` on own rows ``rows`` (B,); rows not ``held`` (positions in ``rows``) are
        zeros and never reach the net (batch statistics see only real rows). ``noisy``: the
        train step whose input noise the rows carry."""
        if held is None:
            return net(self._inputs(rows, None, noisy))
        out = torch.zeros(len(rows), self.config.embed_dim, device=self.device)
        if len(held):
            out[held] = net(self._inputs(rows, held, noisy)).to(out.dtype)
        return out

    # -- alignment (parties, docs/parties.md) -------------------------------------------

    def _adopt(self, rows: RowMap | None) -> None:
        """Take the aligned rows: the table on the device and the schedule over the label
        holder's rows (``None``: serving, which needs the table only)."""
        self.table = torch.from_numpy(self.data.table).to(self.device)
        if rows is None:
            return
        self.rows = rows
        self.schedule = make_schedule(self.config, rows.n_train, rows.n_test)
        self.selection.apply(self.schedule)  # a restored early stop
        # expert.weight_decay "auto" scales by the rows training draws from, known only now
        set_weight_decay(self.optimizer, weight_decay_for(self.config.expert.weight_decay,
                                                          len(self.schedule.fit_rows)))  # fmt: skip
        self.noise = input_noise_for(self.config.expert.input_noise, len(self.schedule.fit_rows),
                                     self.config.task)  # fmt: skip
        held_train, held_test = rows.held()
        self.metrics.rows_held.labels(expert=str(self.id), split="train").set(held_train)
        self.metrics.rows_held.labels(expert=str(self.id), split="test").set(held_test)
        self.metrics.overlap.set((held_train + held_test) / max(rows.n_train + rows.n_test, 1))

    def _align(self) -> None:
        """Learn which of this party's rows are labelled, through the broker (plain or psi,
        ``data.align``); the hashing and blinding run in a thread so heartbeats go on. A
        refusal (id types differ, no overlap) is a DataError: the process exits 3, for good."""
        aligner = Aligner(self.id, self.data.ids, self.data.id_type, self.config.data.align,
                          self.config.run_id)  # fmt: skip
        t0 = time.monotonic()
        request = self._background(aligner.request)
        rows, resend_at = None, t0
        while rows is None:
            if self.stop_event.is_set():
                return
            if time.monotonic() >= resend_at:
                self.link.send(request)
                resend_at = time.monotonic() + ALIGN_RESEND
            msg = self.link.recv(self.config.network.heartbeat_interval / 2)
            if isinstance(msg, proto.Align) and msg.expert_id == self.id:
                if msg.stage == proto.ALIGN_WAIT:  # no reducer yet: ask again soon
                    resend_at = min(resend_at, time.monotonic() + 1.0)
                elif msg.stage == "error":
                    raise DataError(
                        f"{self.name} ({self.data.name}, {self.data.source}): "
                        f"the label holder refused the alignment: {msg.detail}"
                    )
                elif msg.stage == "answer":
                    rows = self._background(aligner.rows, msg)
            elif isinstance(msg, proto.Goodbye) and msg.reason != "done":
                self._register()
                resend_at = time.monotonic()
            elif msg is not None and not isinstance(msg, (proto.Heartbeat, proto.Welcome)):
                self._reject("unexpected_kind", f"{msg.KIND} while aligning")
            self._tick_link()
        # standardised on its own rows among those training fits on (no validation row)
        self.data.align(rows, fit_positions(rows.n_train, self.config))
        self._adopt(rows)
        held_train, held_test = rows.held()
        log.info("%s aligned (%s) in %.1fs: holds %d of %d train rows and %d of %d test rows "
                 "(%d rows in %s)", self.name, self.config.data.align, time.monotonic() - t0,
                 held_train, rows.n_train, held_test, rows.n_test, len(self.data.ids),
                 self.data.source)  # fmt: skip
        self.link.send(proto.Align(self.id, "held", self.config.data.align,
                                   (held_train, held_test, len(self.data.ids))))  # fmt: skip

    def _background(self, fn, *args):  # noqa: ANN001, ANN202
        """``fn(*args)`` in a thread while this thread keeps the link alive."""
        with ThreadPoolExecutor(1, thread_name_prefix="align") as pool:
            job = pool.submit(fn, *args)
            while not job.done():
                msg = self.link.recv(self.config.network.heartbeat_interval / 2)
                if isinstance(msg, proto.Goodbye) and msg.reason != "done":
                    self._register()
                self._tick_link()
            return job.result()

    def _tick_link(self) -> None:
        try:
            self.link.tick()
        except PeerTimeout as exc:
            log.warning("%s: %s; reconnecting", self.name, exc)
            self._register()

    def on_align_late(self, msg: proto.Align) -> None:
        """ALIGN after alignment: the broker's "wait" for the held notice, a late answer."""
        if msg.stage not in (proto.ALIGN_WAIT, "answer"):
            self._reject("unexpected_kind", f"ALIGN {msg.stage} after alignment")

    def _guarded(self, msg: proto.Message) -> bool:
        """``_dispatch``, but a bug triggered by one message never ends the run."""
        try:
            return self._dispatch(msg)
        except Exception:
            log.exception("%s: internal error on %s", self.name, msg.KIND)
            self._reject("internal")
            return False

    def _dispatch(self, msg: proto.Message) -> bool:
        """Handle one message; True when the run is over."""
        if isinstance(msg, proto.Grad):
            self.metrics.wire_bytes("received", sum(t.nbytes for t in msg.tensors))
            self.on_grad(msg)
        elif isinstance(msg, proto.Ack):
            self.on_ack(msg)
            self._hear(msg)
        elif isinstance(msg, proto.Drop):
            self.on_drop(msg)
        elif isinstance(msg, proto.Goodbye):
            return self.on_goodbye(msg)
        elif isinstance(msg, proto.Welcome):
            self.on_welcome(msg)
        elif isinstance(msg, proto.Query):  # training: in order with the nets' updates
            (self.on_query if self.serving else partial(self.stream.submit, self.on_query))(msg)
        elif isinstance(msg, proto.Align):
            self.on_align_late(msg)
        elif isinstance(msg, proto.Heartbeat):  # the broker's carries the reducer's decision
            self._hear(msg)
        else:
            self._reject("unexpected_kind", f"{msg.KIND} is not for experts")
        if self.serving or self.schedule is None:  # serves until stopped
            return False
        return self.seq_next >= self.schedule.total and not self.inflight

    # -- handlers ---------------------------------------------------------------------

    def _hear(self, msg: proto.Ack | proto.Heartbeat) -> None:
        """Model selection's decision, as the message carries it (serving: the run's files
        are left as training wrote them)."""
        if not self.serving:
            self.selection.hear(Decision.of(msg), self.schedule)

    def on_grad(self, msg: proto.Grad) -> None:
        pending = self.inflight.get(msg.seq)
        problem = proto.value_problem(msg.tensors, self.config.security.max_abs_value)
        if problem is not None:  # never applied; if it is our step, that step is over now
            reason, detail = problem
            ours = msg.expert_id == self.id and pending is not None
            if ours and pending.step.phase == "train":
                del self.inflight[msg.seq]
                self._count_drop(reason)
                self.metrics.inflight.set(len(self.inflight))
            what = "step dropped, weights untouched" if ours else "not a step of ours"
            log.warning("%s step %d: GRAD refused (%s): %s; %s", self.name, msg.seq, reason,
                        detail, what)  # fmt: skip
            return self._reject(reason)
        if msg.expert_id != self.id:
            return self._reject("misrouted", f"GRAD for expert {msg.expert_id}", msg.seq)
        if pending is None:
            return self._reject("unknown_step", "GRAD for a step not in flight", msg.seq)
        if pending.step.phase != "train":
            return self._reject("unexpected_kind", "GRAD for an eval step", msg.seq)
        grad = msg.tensors[0]
        if (
            grad.shape != (len(pending.rows), self.config.embed_dim)
            or grad.dtype != self.wire_dtype
        ):
            return self._reject("conflict", f"GRAD {grad.dtype}{list(grad.shape)}", msg.seq)
        del self.inflight[msg.seq]
        self.stream.submit(self._apply, msg.seq, pending, grad)

    def _apply(self, seq: int, pending: InFlight, grad: proto.Tensor) -> None:
        """(stream) Apply the checked gradient of step ``seq`` to the online net, Adam,
        soft-update the target, write the ledger line."""
        assert self.table is not None  # a step in flight means the rows are adopted
        # The online output with the current weights (with window > 1 the weights have moved
        # since the send: computed now, or while idle if no weight changed since), then
        # backprop the slice: the rows this expert holds only (an absent row's gradient is
        # not its own).
        ahead, self._ahead = self._ahead, None
        g = from_wire(grad, self.device)
        if pending.held is not None:
            g = g[pending.held]
        if len(pending.held_rows):
            if self._ahead_valid(ahead, seq):
                out = ahead[2]  # the graph built while the gradient travelled: still valid
            else:
                self.online.train()
                out = self.online(self._inputs(pending.rows, pending.held, seq))  # (B_held, d)
            self.optimizer.zero_grad(set_to_none=True)
            out.backward(g.to(out.dtype))
            set_lr(self.optimizer, self.config.expert.lr, pending.step.index, self.config.train)
            self.optimizer.step()
            polyak_update(self.target, self.online, self.config.expert.tau)
        self.ledger.write(seq)
        self._answered(pending, "applied")
        self.metrics.staleness.observe(self.accounts.applied - 1 - pending.applied_at_send)
        every = self.config.train.checkpoint_every
        if every and self.accounts.applied % every == 0:
            self._save_due = True  # by the main thread, the stream drained

    def on_ack(self, msg: proto.Ack) -> None:
        pending = self.inflight.get(msg.seq)
        if pending is None:
            return self._reject("unknown_step", "ACK for a step not in flight", msg.seq)
        if pending.step.phase != "eval":  # a train step is answered by its GRAD only
            return self._reject("unexpected_kind", "ACK for a train step", msg.seq)
        del self.inflight[msg.seq]
        self._answered(pending, "acked")

    def on_drop(self, msg: proto.Drop) -> None:
        pending = self.inflight.pop(msg.seq, None)
        if pending is None:
            return self._reject("unknown_step", "DROP for a step not in flight", msg.seq)
        self.selection.void(pending.step)
        self._count_drop(msg.reason)
        if msg.reason == "late" and msg.frontier >= 0:  # the others went on without us
            log.debug("%s step %d late; the others are at %d", self.name, msg.seq, msg.frontier)
            self._skip_ahead(msg.frontier)
            return
        log.warning("%s step %d dropped by the broker: %s", self.name, msg.seq, msg.reason)

    def _skip_ahead(self, frontier: int) -> None:
        """A late expert does not fall ever further behind: its next step is where the other
        experts will be once its EMB is made (the frontier, plus how far the frontier moves in
        one EMB's time). Train steps only: it never skips an eval step (those wait for every
        expert) nor past the schedule's end. Skipped steps are never sent (``skipped``)."""
        assert self.schedule is not None  # a step was in flight
        now = time.monotonic()
        if self._frontier is not None:
            seen, at = self._frontier
            if frontier > seen and now > at:
                rate = (frontier - seen) / (now - at)
                self._frontier_rate += 0.3 * (rate - self._frontier_rate)
        self._frontier = (frontier, now)
        target = frontier + math.ceil(self._frontier_rate * self._emb_seconds)
        target = min(target, self.schedule.next_eval_seq(self.seq_next))
        if target > self.seq_next:
            n = target - self.seq_next
            self.accounts.skipped += n
            self.metrics.skipped.inc(n)
            self.seq_next = target

    def on_welcome(self, msg: proto.Welcome) -> None:
        """An unsolicited WELCOME is a resync: the broker starts the run elsewhere."""
        if not msg.ok:
            log.error("%s: broker withdrew registration: %s", self.name, msg.reason)
            self._register()
            return
        log.info("%s: resync to seq %d", self.name, msg.start_seq)
        self._drop_all("resync")
        self.seq_next = msg.start_seq

    def on_query(self, msg: proto.Query) -> None:
        """A served query (docs/serving.md): this view's columns of the raw rows, standardised
        as in training, through the target net. Touches no training state."""
        t0 = time.monotonic()
        if msg.ids:
            return self.on_query_ids(msg, t0)
        if self.query_view is None:
            self.query_view = self._query_view()
        view = self.query_view
        pick = view.pick(msg.columns)
        # Raw rows: finite is the only bound (a raw column may be large); the embedding they
        # make is held to security.max_abs_value below, as in training.
        problem = proto.value_problem(msg.tensors, float("inf"))
        if problem is not None:  # the broker masks this expert for the query
            return self._answer(msg.qid, t0, problem[0], f"rows: {problem[1]}")
        if isinstance(pick, list):
            shown = ", ".join(pick[:10]) + (f" (+{len(pick) - 10} more)" if len(pick) > 10 else "")
            return self._answer(msg.qid, t0, "missing_columns",
                                f"{self.name} lacks column(s) {shown}")  # fmt: skip
        try:
            x = torch.from_numpy(view.inputs(msg.tensors[0].numpy(), pick)).to(self.device)
            net = self._served_net()  # resolved (maybe loaded) outside inference mode
            with torch.inference_mode():
                emb = net(x)  # (R, d); the target is always in eval mode
            self._answer_embedding(msg.qid, t0, emb, b"")
        except Exception as exc:  # the broker masks this expert for the query
            log.exception("%s: internal error on QUERY %d", self.name, msg.qid)
            self._answer(msg.qid, t0, "internal", repr(exc)[:200])
        return None

    def _served_net(self) -> torch.nn.Module:
        """The net a served query is embedded with: `traci serve` answers with the best
        validation round's target (as `traci predict` does), a training run with its current
        target."""
        return self.selection.test_net(self.target) if self.serving else self.target

    def on_query_ids(self, msg: proto.Query, t0: float) -> None:
        """A served query by row id: this party's own rows of those ids (a row it lacks is
        masked for that row: zeros and a cleared bit in QEMB.rows)."""
        try:
            if self.table is None:
                raise DataError("rows not aligned yet: no table to look ids up in")
            if self.id_index is None:
                self.id_index = IdIndex(self.data.ids)
            local = self.id_index.find(np.array(msg.ids))
            present = local >= 0
            rows = torch.as_tensor(np.where(present, local, 0), device=self.device)
            net = self._served_net()  # resolved (maybe loaded) outside inference mode
            with torch.inference_mode():
                emb = self._embed(net, rows, self._held(present))
            self._answer_embedding(msg.qid, t0, emb, proto.pack_rows(present))
        except Exception as exc:  # the broker masks this expert for the query
            log.exception("%s: internal error on QUERY %d (ids)", self.name, msg.qid)
            self._answer(msg.qid, t0, "internal", repr(exc)[:200])

    def _answer_embedding(self, qid: int, t0: float, emb: torch.Tensor, rows: bytes) -> None:
        """QEMB ok with ``emb`` on the wire, or the bound it breaks (rows out of the trained
        range?): held to security.max_abs_value as in training."""
        wire = to_wire(emb, self.wire_dtype)
        bad = proto.value_problem((wire,), self.config.security.max_abs_value)
        if bad is None:
            self._answer(qid, t0, proto.SERVE_OK, "", (wire,), rows)
        else:
            self._answer(qid, t0, bad[0], f"embedding of the rows: {bad[1]} (rows out of the "
                         "trained range?)")  # fmt: skip

    def _answer(self, qid: int, t0: float, status: str, detail: str,
                tensors: tuple[proto.Tensor, ...] = (), rows: bytes = b"") -> None:  # fmt: skip
        """Send a served query's QEMB (training: from the compute stream, through post),
        with the time spent on it since ``t0`` (the broker's per-hop latency)."""
        spent = time.monotonic() - t0
        answer = proto.QEmb(qid, self.id, status, detail, tensors, rows, round(spent * 1e6))
        (self.link.post if self.stream.on_thread() else self.link.send)(answer)
        self.metrics.served(status, spent)

    def _query_view(self) -> QueryView:
        """Served raw rows: the one table's statistics (preprocess.json), or, for a party,
        its own (standardised on its own training rows)."""
        if self.config.data.source == "parties":
            if self.data.mean is None or self.data.std is None:
                raise DataError(f"{self.name}: no standardisation yet (not aligned)")
            return QueryView(self.data.columns, self.data.mean, self.data.std)
        return QueryView.for_expert(self.config, self.run_dir.path, self.id)

    def on_goodbye(self, msg: proto.Goodbye) -> bool:
        if msg.reason == "done":
            log.info("%s: broker says the run is done", self.name)
            return True
        log.warning("%s: broker says goodbye (%s); registering again", self.name, msg.reason)
        self._register()
        return False

    # -- housekeeping -----------------------------------------------------------------

    def _tick(self) -> bool:
        now = time.monotonic()
        timeout = self.config.expert.step_timeout
        while self.inflight:
            seq, oldest = next(iter(self.inflight.items()))
            if now - oldest.sent_at <= timeout:
                break
            del self.inflight[seq]
            self.selection.void(oldest.step)
            log.warning("%s step %d got no reply in %.0fs: dropped", self.name, seq, timeout)
            self._count_drop("timeout")
        self._tick_link()
        return False

    def _answered(self, pending: InFlight, how: str) -> None:
        self.metrics.roundtrip.observe(time.monotonic() - pending.sent_at)
        if how == "applied":
            self.accounts.applied += 1
            self.metrics.applied.inc()
        else:
            self.accounts.acked += 1
            self.metrics.acked.inc()
        self.metrics.inflight.set(len(self.inflight))

    def _count_drop(self, reason: str, n: int = 1) -> None:
        self.accounts.dropped += n
        self.metrics.drop(reason, n)

    def _drop_all(self, reason: str) -> None:
        self._epoch += 1
        if self.inflight:
            log.warning("%s drops %d in-flight steps (%s)", self.name, len(self.inflight), reason)
            self._count_drop(reason, len(self.inflight))
            self.inflight.clear()

    def _reject(self, reason: str, what: str = "", seq: int | None = None) -> None:
        self.accounts.rejected += 1
        self.metrics.reject(reason)
        if what:
            log.warning("%s rejected a message (%s): %s, step %s", self.name, reason, what, seq)

    # -- checkpoints ------------------------------------------------------------------

    def save(self) -> None:
        checkpoint.save_atomic(
            {
                "run_id": self.config.run_id,
                "expert_id": self.id,
                "online": self.online.state_dict(),
                "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "seq_next": self.seq_next,
                "accounts": asdict(self.accounts),
                # steps sent and not answered: a restore counts them dropped (lost_in_restart)
                "inflight": len(self.inflight),
                # the ledger's length now (every line flushed): a restore cuts it back to this
                "ledger_bytes": self.ledger.size(),
                # parties: this party's standardisation (its own training rows), for serving
                "mean": None if self.data.mean is None else torch.from_numpy(self.data.mean),
                "std": None if self.data.std is None else torch.from_numpy(self.data.std),
                # error feedback's residuals (docs/compression.md); None without it
                "feedback": None if self.feedback is None else self.feedback.state_dict(),
                # model selection: the reducer's decision as last heard
                "selection": self.selection.state(self.schedule),
            },
            self.ckpt_path,
        )

    def _restore(self) -> None:
        state = checkpoint.load(self.ckpt_path, run_id=self.config.run_id, expert_id=self.id)
        # one line naming what differs (a changed view ...): exit 2, never restarted
        nets = {"online": self.online, "target": self.target}
        fix = fits.remedy(self.config, serve=self.serving)
        fits.expert_weights(self.config, self.id, state, self.ckpt_path, nets, fix=fix)
        checkpoint.load_into(self.optimizer, state, "optimizer", self.ckpt_path)
        if self.feedback is not None and state.get("feedback") is not None:
            checkpoint.load_into(self.feedback, state, "feedback", self.ckpt_path)
        if self.data.rows is None and state.get("mean") is not None:  # parties
            self.data.standardise(state["mean"].numpy(), state["std"].numpy())
        self.accounts = Accounts(**state["accounts"])
        self.seq_next = self.selection.restore(state.get("selection"), state["seq_next"])
        self.restored = True
        self.ledger_at = state.get("ledger_bytes")  # None: a checkpoint written without one
        lost = state.get("inflight", 0)
        if lost and not self.serving:  # their replies went to the life that saved them
            self.accounts.dropped += lost
            log.warning("%s: %d steps in flight at the checkpoint dropped (lost_in_restart)",
                        self.name, lost)  # fmt: skip
        log.info(
            "%s resumed from %s (applied %d)", self.name, self.ckpt_path, self.accounts.applied
        )

    def _open_ledger(self) -> None:
        """Open the ledger cut back to what the model holds (``Ledger.open``); the cut lines
        count as rolled back, and a checkpoint records the cut (so a second crash does not
        count them again)."""
        cut = self.ledger.open(self.ledger_at)
        self.accounts.rolled_back += len(cut)
        if cut or self.restored:
            self.save()  # the cut, the drops of the restore and the ledger's length, on disk

    def _close(self) -> None:
        self.stream.close()  # what it was given runs first: the gradients received are applied
        self._drop_all("shutdown")
        # serving leaves the run's checkpoints and accounts alone; so does a party that
        # never aligned (nothing trained; its error must not leave a checkpoint behind)
        if not self.serving and self.schedule is not None:
            self.save()
            self._write_accounts()
        done = (
            self.schedule is not None and self.seq_next >= self.schedule.total and not self.serving
        )
        try:
            self.link.send(proto.Goodbye("done" if done else "shutdown"))
        except zmq.ZMQError:
            pass
        self.link.close()
        self.ledger.close()
        log.info("%s stopped: %s", self.name, self.accounts)

    def _write_accounts(self) -> None:
        path = self.run_dir.accounts(self.id)
        accounts = {"expert_id": self.id, **asdict(self.accounts), "inflight": len(self.inflight)}
        write_json_atomic(path, accounts)
